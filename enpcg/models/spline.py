"""Tabulated spline model (kind ``"spline"``): pair, bond, angle and dihedral energies from tables.

Each type has an energy table (kJ/mol) on a uniform grid, interpolated by a natural cubic spline (periodic for
dihedrals) exactly as OpenMM's ``Continuous1DFunction`` (see :mod:`enpcg.models.tables`), so the torch model,
a TorchForce of it and the native export (:meth:`SplineModel.native_forces`) agree to round-off.

* pair type "A-B": table of r (nm) on [min, max] with max <= ``cutoff``, acting between non-excluded pairs
  with r < cutoff; zero beyond the table (OpenMM tabulated functions are zero outside their range), so a pair
  table should end at 0 kJ/mol with zero slope at ``cutoff``;
* bond type "A-B": table of r (nm), zero outside [min, max] (make it wide enough that no bond leaves it);
* angle type "A-B-C": table of theta (rad) on [0, pi];
* dihedral type "A-B-C-D": periodic table of phi (rad) on [-pi, pi] whose first and last values are equal;
  with ``dihedral_damping`` = theta_s (rad) its energy is multiplied by f(theta_1) f(theta_2) of the two
  angles (p1, p2, p3) and (p2, p3, p4): f = 1 below theta_s, falling to 0 at pi as 1 - S(t),
  S(t) = t^3 (10 - 15 t + 6 t^2), t = (theta - theta_s) / (pi - theta_s). The dihedral force grows as
  1 / sin(theta) near a straight angle; f ~ (pi - theta)^3 cancels it (the force vanishes at pi, as for any
  energy smooth in the bead positions), so a straight angle cannot blow up the dihedral force.

Config (JSON)::

    {"periodic": true, "cutoff": 1.0,
     "pairs": {"A-A": {"min": 0.0, "max": 1.0, "values": [...]}},
     "bonds": {"A-A": {"min": 0.0, "max": 0.8, "values": [...]}},
     "angles": {}, "dihedrals": {}}

Values and spline second derivatives are also buffers (``<family>_values``, ``<family>_d2``, T x n_max).
"""
import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import EnpcgError
from ..geometry import bond_angles, bond_lengths, dihedral_angles
from ..neighbors import PairList, frame_sum, parse_pair_list
from .base import CGModel, register_model
from .tables import TableSet, continuous_function, evaluate_tables

FAMILIES = ("pairs", "bonds", "angles", "dihedrals")
_PERIODIC = {"pairs": False, "bonds": False, "angles": False, "dihedrals": True}


def dihedral_damping(theta: Tensor, start: float) -> Tensor:
    """f(theta) of the module docstring: 1 below ``start`` (rad), 1 - S(t) above, 0 with zero slope at pi."""
    t = ((theta - start) / (math.pi - start)).clamp(0.0, 1.0)
    return 1.0 - t * t * t * (10.0 - 15.0 * t + 6.0 * t * t)


def dihedral_damping_expression(start: float) -> str:
    """Lepton expression of f(theta_1) f(theta_2) for CustomCompoundBondForce (p1..p4), as w1*w2 definitions."""
    parts = []
    for k, atoms in ((1, "p1, p2, p3"), (2, "p2, p3, p4")):
        parts.append(f"w{k} = 1 - t{k}^3 * (10 - 15 * t{k} + 6 * t{k}^2); "
                     f"t{k} = min(max((angle({atoms}) - {start!r}) / {np.pi - start!r}, 0), 1)")
    return "; ".join(parts)


def _clean_table(family: str, key: str, table) -> dict:
    try:
        out = {"min": float(table["min"]), "max": float(table["max"]),
               "values": [float(v) for v in np.asarray(table["values"], dtype=np.float64).ravel()]}
    except (KeyError, TypeError, ValueError) as e:
        raise EnpcgError(f"spline config: {family}[{key!r}] must be {{'min', 'max', 'values'}}; "
                         f"received {type(table).__name__} ({e})") from None
    if family == "dihedrals" and out["values"] and out["values"][0] != out["values"][-1]:
        raise EnpcgError(f"spline config: dihedrals[{key!r}] is periodic, its last value must equal its first; "
                         f"received {out['values'][0]} and {out['values'][-1]}")
    return out


@register_model("spline")
class SplineModel(CGModel):
    """Tabulated pair and bonded energies (see module docstring).

    Parameters
    ----------
    topology : CGTopology
    periodic : bool, minimum image and CutoffPeriodic export if True
    cutoff : float, nm, pair cutoff
    pairs, bonds, angles, dihedrals : dict, type key -> {"min", "max", "values"} (x in nm or rad,
        values in kJ/mol). Every bonded type present in the topology needs a table; ``pairs`` covers every
        pair type of :meth:`CGTopology.pair_type_names` or is empty (no pair interaction).
    pair_list : how pairs are found (:mod:`enpcg.neighbors`): "auto", "dense", "vesin" or a "cells" dict
    dihedral_damping : rad or None; dihedral energies are damped to 0 as either of their angles goes from this
        angle to pi (see module docstring); None: undamped
    """

    def __init__(self, topology, periodic: bool = True, cutoff: float = 1.0, pairs: Optional[dict] = None,
                 bonds: Optional[dict] = None, angles: Optional[dict] = None,
                 dihedrals: Optional[dict] = None, pair_list="auto", dihedral_damping: Optional[float] = None):
        super().__init__(topology)
        if not float(cutoff) > 0:
            raise EnpcgError(f"spline config: cutoff must be > 0 nm; received {cutoff}")
        given = {"pairs": dict(pairs or {}), "bonds": dict(bonds or {}), "angles": dict(angles or {}),
                 "dihedrals": dict(dihedrals or {})}
        needed = {"pairs": topology.pair_type_names() if given["pairs"] else [],
                  "bonds": topology.term_type_names("bonds"), "angles": topology.term_type_names("angles"),
                  "dihedrals": topology.term_type_names("dihedrals")}
        self.config = {"periodic": bool(periodic), "cutoff": float(cutoff),
                       "pair_list": parse_pair_list(pair_list)}
        self.damping = -1.0  # dihedral damping start (rad); < 0: none
        if dihedral_damping is not None:
            if not 0.0 < float(dihedral_damping) < np.pi:
                raise EnpcgError(f"spline config: dihedral_damping must be an angle in (0, pi) rad (where the damping "
                                 f"of dihedrals starts) or null; received {dihedral_damping}")
            self.damping = float(dihedral_damping)
            self.config["dihedral_damping"] = self.damping
        for fam in FAMILIES:
            missing = [k for k in needed[fam] if k not in given[fam]]
            if missing:
                raise EnpcgError(f"spline config: field {fam!r} has no table for types {missing}; "
                                 f"give {{'min', 'max', 'values'}} for each of {needed[fam]}")
            self.config[fam] = {k: _clean_table(fam, k, given[fam][k]) for k in needed[fam]}
        for key, t in self.config["pairs"].items():
            if t["max"] > float(cutoff) + 1e-12:
                raise EnpcgError(f"spline config: pairs[{key!r}] extends to {t['max']} nm beyond the cutoff "
                                 f"{cutoff} nm; end pair tables at the cutoff")
        self.periodic = bool(periodic)
        self.cutoff = float(cutoff)
        self.use_pairs = bool(self.config["pairs"])

        for fam in FAMILIES:
            ts = TableSet([self.config[fam][k] for k in needed[fam]], _PERIODIC[fam], fam)
            self.register_buffer(f"{fam}_values", torch.tensor(ts.values, dtype=torch.float64))
            self.register_buffer(f"{fam}_d2", torch.tensor(ts.d2, dtype=torch.float64))
            self.register_buffer(f"{fam}_min", torch.tensor(ts.xmin, dtype=torch.float64))
            self.register_buffer(f"{fam}_spacing", torch.tensor(ts.spacing, dtype=torch.float64))
            self.register_buffer(f"{fam}_npoints", torch.tensor(ts.n_points), persistent=False)

        def index(arr, width):
            return torch.as_tensor(np.asarray(arr, dtype=np.int64).reshape(-1, width))

        self.register_buffer("bonds", index(topology.bonds, 2), persistent=False)
        self.register_buffer("angles", index(topology.angles, 3), persistent=False)
        self.register_buffer("dihedrals", index(topology.dihedrals, 4), persistent=False)
        for fam, width in (("bonds", 2), ("angles", 3), ("dihedrals", 4)):
            self.register_buffer(f"{fam}_table", torch.as_tensor(topology.term_type_index(fam)).reshape(-1),
                                 persistent=False)
        self.register_buffer("types", torch.as_tensor(topology.type_index(), dtype=torch.int64).reshape(-1),
                             persistent=False)
        self.register_buffer("pair_type_matrix", torch.as_tensor(topology.pair_type_matrix(), dtype=torch.int64),
                             persistent=False)
        # Without pair tables the pair list is never called: a dense one of no beads costs nothing.
        self.pair_list = PairList(topology.n_beads if self.use_pairs else 0, self.cutoff,
                                  topology.excluded_pairs() if self.use_pairs else np.zeros((0, 2), dtype=np.int64),
                                  self.config["pair_list"] if self.use_pairs else "dense")

    @torch.jit.export
    def batch_energy(self, positions: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """positions (B, n, 3) nm, box (B, 3, 3) nm or None -> energies (B,) kJ/mol."""
        if not self.periodic:
            box = None
        e = torch.zeros(positions.shape[0], dtype=positions.dtype, device=positions.device)
        if self.use_pairs:
            frame, i, j, d = self.pair_list(positions, box)
            r = torch.linalg.norm(d, dim=-1)
            table = self.pair_type_matrix[self.types[i], self.types[j]]
            u = evaluate_tables(r.unsqueeze(0), table, self.pairs_values, self.pairs_d2, self.pairs_min,
                                self.pairs_spacing, self.pairs_npoints, False)[0]
            e = self.pair_list.poison(e + frame_sum(torch.where(r < self.cutoff, u, torch.zeros_like(u)), frame,
                                                     positions.shape[0]))
        if self.bonds.shape[0] > 0:
            r = bond_lengths(positions, self.bonds, box)
            e = e + evaluate_tables(r, self.bonds_table, self.bonds_values, self.bonds_d2, self.bonds_min,
                                    self.bonds_spacing, self.bonds_npoints, False).sum(1)
        if self.angles.shape[0] > 0:
            theta = bond_angles(positions, self.angles, box)
            e = e + evaluate_tables(theta, self.angles_table, self.angles_values, self.angles_d2,
                                    self.angles_min, self.angles_spacing, self.angles_npoints, False).sum(1)
        if self.dihedrals.shape[0] > 0:
            phi = dihedral_angles(positions, self.dihedrals, box)
            ed = evaluate_tables(phi, self.dihedrals_table, self.dihedrals_values, self.dihedrals_d2,
                                 self.dihedrals_min, self.dihedrals_spacing, self.dihedrals_npoints, True)
            if self.damping > 0:
                ed = ed * (dihedral_damping(bond_angles(positions, self.dihedrals[:, :3], box), self.damping)
                           * dihedral_damping(bond_angles(positions, self.dihedrals[:, 1:], box), self.damping))
            e = e + ed.sum(1)
        return e

    # ----------------------------------------------------------------- tables as functions
    @torch.jit.unused
    def table_function(self, family: str, key: str):
        """The spline of one table as a numpy function x -> E (kJ/mol), zero outside a non-periodic range."""
        names = list(self.config[family])
        if key not in names:
            raise EnpcgError(f"spline model: no {family} table {key!r}; tables: {names}")
        i = names.index(key)
        vals = getattr(self, f"{family}_values")
        d2 = getattr(self, f"{family}_d2")
        xmin = getattr(self, f"{family}_min")
        sp = getattr(self, f"{family}_spacing")
        npts = getattr(self, f"{family}_npoints")

        def f(x):
            xt = torch.as_tensor(np.atleast_1d(np.asarray(x, dtype=np.float64)), dtype=vals.dtype).reshape(1, -1)
            tab = torch.full((xt.shape[1],), i, dtype=torch.int64)
            with torch.no_grad():
                out = evaluate_tables(xt, tab, vals, d2, xmin, sp, npts, _PERIODIC[family])
            return out.reshape(np.shape(x)).double().numpy()

        return f

    # ----------------------------------------------------------------- native export
    def native_forces(self) -> list:
        """CustomNonbondedForce (one table per pair type) and one CustomCompoundBondForce per bonded type."""
        import openmm

        top = self.topology
        forces = []
        if self.use_pairs:
            forces.append(self._native_pairs())
        # CustomBond/Angle/TorsionForce take no tabulated functions; CustomCompoundBondForce does, with the
        # same distance/angle/dihedral conventions.
        geometry = {"bonds": (2, "distance(p1, p2)"), "angles": (3, "angle(p1, p2, p3)"),
                    "dihedrals": (4, "dihedral(p1, p2, p3, p4)")}
        for fam, (width, var) in geometry.items():
            keys = top.term_keys(fam)
            terms = getattr(top, fam)
            for key, table in self.config[fam].items():
                expr = f"table({var})"
                if fam == "dihedrals" and self.damping > 0:
                    expr += " * w1 * w2; " + dihedral_damping_expression(self.damping)
                f = openmm.CustomCompoundBondForce(width, expr)
                f.addTabulatedFunction("table", continuous_function(table["values"], table["min"], table["max"],
                                                                    _PERIODIC[fam]))
                for term, k in zip(terms, keys):
                    if k == key:
                        f.addBond([int(a) for a in term], [])
                f.setUsesPeriodicBoundaryConditions(self.periodic)
                f.setName(f"Spline{fam.capitalize()}[{key}]")
                forces.append(f)
        return forces

    def _native_pairs(self):
        import openmm

        top = self.topology
        names = list(self.config["pairs"])
        n_types = len(top.type_names())
        # One tabulated function per pair type, chosen by the pair type index p of the two particles' types.
        expr = f"pair{len(names) - 1}(r)"
        for k in range(len(names) - 2, -1, -1):
            expr = f"select(p-{k}, {expr}, pair{k}(r))"
        if len(names) > 1:
            expr += "; p = pair_type(t1, t2)"
        f = openmm.CustomNonbondedForce(expr)
        for k, key in enumerate(names):
            t = self.config["pairs"][key]
            f.addTabulatedFunction(f"pair{k}", continuous_function(t["values"], t["min"], t["max"], False))
        if len(names) > 1:
            tmat = top.pair_type_matrix()
            f.addTabulatedFunction("pair_type", openmm.Discrete2DFunction(
                n_types, n_types, [float(x) for x in tmat.T.ravel()]))
        f.addPerParticleParameter("t")
        for t in top.type_index():
            f.addParticle([float(t)])
        for i, j in top.excluded_pairs():
            f.addExclusion(int(i), int(j))
        f.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic if self.periodic
                             else openmm.CustomNonbondedForce.CutoffNonPeriodic)
        f.setCutoffDistance(self.cutoff)
        f.setUseLongRangeCorrection(False)
        f.setName("SplinePairs")
        return f
