"""Physical prior model (kind ``"priors"``): harmonic bonds and angles, periodic dihedrals, soft repulsion.

Energies in kJ/mol, lengths in nm, angles in rad. The functional forms are OpenMM's own, so the model has an
exact native export (:meth:`PriorModel.native_forces`):

* bond type "A-B":        E = k/2 (r - r0)^2                  k kJ/mol/nm^2, r0 nm   (HarmonicBondForce)
* angle type "A-B-C":     E = k/2 (theta - theta0)^2          k kJ/mol/rad^2, theta0 rad (HarmonicAngleForce)
* dihedral type "A-B-C-D": E = sum_n=1..3 k_n (1 + cos(n phi - delta_n))  k_n kJ/mol, delta_n rad
  (PeriodicTorsionForce)
* pair type "A-B" (non-excluded pairs): E = eps ((sigma/r)^12 - (sigma/rc)^12) for r < rc, else 0;
  eps kJ/mol, sigma nm, rc = ``cutoff`` nm (CustomNonbondedForce).

Config (JSON)::

    {"periodic": true, "cutoff": 0.8,
     "bonds": {"A-A": {"k": 5000.0, "r0": 0.38}},
     "angles": {"A-A-A": {"k": 50.0, "theta0": 2.1}},
     "dihedrals": {"A-A-A-A": {"k": [1.0, 0.0, 0.5], "delta": [0.0, 0.0, 3.14159]}},
     "repulsion": {"A-A": {"epsilon": 2.5, "sigma": 0.35}}}

Every bonded type present in the topology must have parameters; ``repulsion`` either covers every pair type
of :meth:`CGTopology.pair_type_names` or is empty/None (no repulsion).
"""
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import EnpcgError
from ..geometry import bond_angles, bond_lengths, dihedral_angles
from ..neighbors import PairList, frame_sum, parse_pair_list
from .base import CGModel, register_model


def _term_parameters(topology, kind: str, params: dict, fields: tuple) -> dict:
    """Per-type parameters for every type key of ``kind`` present in the topology (error if one is missing)."""
    params = dict(params or {})
    needed = topology.term_type_names(kind)
    missing = [k for k in needed if k not in params]
    if missing:
        raise EnpcgError(f"priors config: field {kind!r} has no parameters for types {missing}; "
                         f"it must give {list(fields)} for each of {needed}")
    out = {}
    for key in needed:
        entry = params[key]
        bad = [f for f in fields if f not in entry]
        if bad:
            raise EnpcgError(f"priors config: {kind}[{key!r}] lacks {bad}; received {entry}")
        out[key] = {f: entry[f] for f in fields}
    return out


@register_model("priors")
class PriorModel(CGModel):
    """Harmonic bonds and angles, periodic dihedrals and a shifted r^-12 repulsion (see module docstring).

    Parameters
    ----------
    topology : CGTopology
    periodic : bool, whether the model uses periodic boundaries (minimum image; CutoffPeriodic export)
    cutoff : float, nm, repulsion cutoff rc
    bonds, angles, dihedrals, repulsion : dict, per-type parameters keyed by type key (see module docstring)
    pair_list : how repulsion pairs are found (:mod:`enpcg.neighbors`): "auto", "dense", "vesin" or "cells"
    """

    def __init__(self, topology, periodic: bool = True, cutoff: float = 1.0, bonds: Optional[dict] = None,
                 angles: Optional[dict] = None, dihedrals: Optional[dict] = None,
                 repulsion: Optional[dict] = None, pair_list="auto"):
        super().__init__(topology)
        bonds = _term_parameters(topology, "bonds", bonds, ("k", "r0"))
        angles = _term_parameters(topology, "angles", angles, ("k", "theta0"))
        dihedrals = _term_parameters(topology, "dihedrals", dihedrals, ("k", "delta"))
        for key, entry in dihedrals.items():
            for f in ("k", "delta"):
                if len(entry[f]) != 3:
                    raise EnpcgError(f"priors config: dihedrals[{key!r}].{f} must list 3 values (n = 1, 2, 3); "
                                     f"received {entry[f]}")
        if not float(cutoff) > 0:
            raise EnpcgError(f"priors config: cutoff must be > 0 nm; received {cutoff}")
        pair_names = topology.pair_type_names()
        repulsion = dict(repulsion or {})
        if repulsion:
            missing = [k for k in pair_names if k not in repulsion]
            if missing:
                raise EnpcgError(f"priors config: field 'repulsion' lacks pair types {missing}; give "
                                 f"{{'epsilon', 'sigma'}} for each of {pair_names} or leave it empty")
            repulsion = {k: {"epsilon": float(repulsion[k]["epsilon"]), "sigma": float(repulsion[k]["sigma"])}
                         for k in pair_names}
        self.config = {
            "periodic": bool(periodic), "cutoff": float(cutoff),
            "bonds": {k: {"k": float(v["k"]), "r0": float(v["r0"])} for k, v in bonds.items()},
            "angles": {k: {"k": float(v["k"]), "theta0": float(v["theta0"])} for k, v in angles.items()},
            "dihedrals": {k: {"k": [float(x) for x in v["k"]], "delta": [float(x) for x in v["delta"]]}
                          for k, v in dihedrals.items()},
            "repulsion": repulsion,
            "pair_list": parse_pair_list(pair_list),
        }
        self.periodic = bool(periodic)
        self.cutoff = float(cutoff)
        self.use_repulsion = bool(repulsion)
        f64 = torch.float64

        def per_term(kind, field):
            keys = topology.term_keys(kind)
            vals = [self.config[kind][k][field] for k in keys]
            shape = (len(keys), 3) if kind == "dihedrals" else (len(keys),)
            return torch.tensor(vals, dtype=f64).reshape(shape)

        def index(arr, width):
            return torch.as_tensor(np.asarray(arr, dtype=np.int64).reshape(-1, width))

        self.register_buffer("bonds", index(topology.bonds, 2), persistent=False)
        self.register_buffer("angles", index(topology.angles, 3), persistent=False)
        self.register_buffer("dihedrals", index(topology.dihedrals, 4), persistent=False)
        self.register_buffer("bond_k", per_term("bonds", "k"))
        self.register_buffer("bond_r0", per_term("bonds", "r0"))
        self.register_buffer("angle_k", per_term("angles", "k"))
        self.register_buffer("angle_theta0", per_term("angles", "theta0"))
        self.register_buffer("dihedral_k", per_term("dihedrals", "k"))
        self.register_buffer("dihedral_delta", per_term("dihedrals", "delta"))
        self.register_buffer("multiplicity", torch.tensor([1.0, 2.0, 3.0], dtype=f64))
        # Repulsion per ordered type pair (T, T); pairs come from the pair list (enpcg.neighbors).
        tmat = topology.pair_type_matrix()
        eps = np.zeros(tmat.shape)
        sig = np.zeros(tmat.shape)
        if repulsion:
            for i in range(tmat.shape[0]):
                for j in range(tmat.shape[1]):
                    entry = repulsion[pair_names[tmat[i, j]]]
                    eps[i, j], sig[i, j] = entry["epsilon"], entry["sigma"]
        self.register_buffer("rep_epsilon", torch.tensor(eps, dtype=f64))
        self.register_buffer("rep_sigma", torch.tensor(sig, dtype=f64))
        self.register_buffer("bead_type", torch.as_tensor(topology.type_index()), persistent=False)
        self.pair_list = PairList(topology.n_beads if repulsion else 0, self.cutoff, topology.excluded_pairs(),
                                  self.config["pair_list"] if repulsion else "dense")

    @torch.jit.export
    def batch_energy(self, positions: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """positions (B, n, 3) nm, box (B, 3, 3) nm or None -> energies (B,) kJ/mol."""
        if not self.periodic:
            box = None
        e = torch.zeros(positions.shape[0], dtype=positions.dtype, device=positions.device)
        if self.bonds.shape[0] > 0:
            r = bond_lengths(positions, self.bonds, box)
            e = e + (0.5 * self.bond_k * (r - self.bond_r0) ** 2).sum(1)
        if self.angles.shape[0] > 0:
            theta = bond_angles(positions, self.angles, box)
            e = e + (0.5 * self.angle_k * (theta - self.angle_theta0) ** 2).sum(1)
        if self.dihedrals.shape[0] > 0:
            phi = dihedral_angles(positions, self.dihedrals, box).unsqueeze(-1)
            arg = self.multiplicity * phi - self.dihedral_delta
            e = e + (self.dihedral_k * (1.0 + torch.cos(arg))).sum((1, 2))
        if self.use_repulsion:
            frame, i, j, d = self.pair_list(positions, box)
            r = torch.linalg.norm(d, dim=-1)
            ti = self.bead_type[i]
            tj = self.bead_type[j]
            eps = self.rep_epsilon[ti, tj]
            sig = self.rep_sigma[ti, tj]
            inside = r < self.cutoff
            # Keep r away from zero outside the cutoff so the masked branch has a finite gradient.
            r_safe = torch.where(inside, r, torch.full_like(r, self.cutoff))
            ep = eps * ((sig / r_safe) ** 12 - (sig / self.cutoff) ** 12)
            e = self.pair_list.poison(e + frame_sum(torch.where(inside, ep, torch.zeros_like(ep)), frame,
                                                     positions.shape[0]))
        return e

    # ----------------------------------------------------------------- native export
    def native_forces(self) -> list:
        """OpenMM forces equal to this model: HarmonicBond, HarmonicAngle, PeriodicTorsion, CustomNonbonded."""
        import openmm

        top = self.topology
        cfg = self.config
        forces = []
        bf = openmm.HarmonicBondForce()
        for (i, j), key in zip(top.bonds, top.term_keys("bonds")):
            bf.addBond(int(i), int(j), cfg["bonds"][key]["r0"], cfg["bonds"][key]["k"])
        af = openmm.HarmonicAngleForce()
        for (i, j, k), key in zip(top.angles, top.term_keys("angles")):
            af.addAngle(int(i), int(j), int(k), cfg["angles"][key]["theta0"], cfg["angles"][key]["k"])
        tf = openmm.PeriodicTorsionForce()
        for (i, j, k, m), key in zip(top.dihedrals, top.term_keys("dihedrals")):
            par = cfg["dihedrals"][key]
            for n in range(3):
                if par["k"][n] != 0.0:
                    tf.addTorsion(int(i), int(j), int(k), int(m), n + 1, par["delta"][n], par["k"][n])
        for f in (bf, af, tf):
            f.setUsesPeriodicBoundaryConditions(self.periodic)
            forces.append(f)
        if self.use_repulsion:
            forces.append(self._native_repulsion())
        return forces

    def _native_repulsion(self):
        import openmm

        top = self.topology
        rc = self.cutoff
        n_types = len(top.type_names())
        eps = self.rep_epsilon.detach().cpu().double().numpy()
        sig = self.rep_sigma.detach().cpu().double().numpy()
        # Discrete2DFunction(xsize, ysize, values) reads values[i + j * xsize]; the matrices are symmetric.
        f = openmm.CustomNonbondedForce(
            "prior_eps(t1, t2)*((s/r)^12 - (s/rc_prior)^12); s = prior_sig(t1, t2); "
            f"rc_prior = {rc!r}")
        f.addTabulatedFunction("prior_eps", openmm.Discrete2DFunction(n_types, n_types,
                                                                     [float(x) for x in eps.T.ravel()]))
        f.addTabulatedFunction("prior_sig", openmm.Discrete2DFunction(n_types, n_types,
                                                                     [float(x) for x in sig.T.ravel()]))
        f.addPerParticleParameter("t")
        for t in top.type_index():
            f.addParticle([float(t)])
        for i, j in top.excluded_pairs():
            f.addExclusion(int(i), int(j))
        method = openmm.CustomNonbondedForce.CutoffPeriodic if self.periodic else \
            openmm.CustomNonbondedForce.CutoffNonPeriodic
        f.setNonbondedMethod(method)
        f.setCutoffDistance(rc)
        f.setUseLongRangeCorrection(False)
        f.setName("PriorRepulsion")
        return f
