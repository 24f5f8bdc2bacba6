"""Surface energies of fcc crystals against surface orientation (hkl).

Units: nm, kJ/mol; surface energies in kJ/mol/nm^2 (per mole of surface cells, i.e. energy per area with
energies in kJ/mol) and J/m^2: 1 kJ/mol = 1.66054e-21 J per particle and 1 nm^2 = 1e-18 m^2, so
1 kJ/mol/nm^2 = 1.66054e-3 J/m^2 (:data:`KJ_MOL_NM2_IN_J_M2`).

Definition: gamma(hkl) = (E_slab - E_bulk) / (2 A), with E_slab the energy of a slab of the crystal whose (hkl)
planes are normal to z, periodic in x and y and separated from its periodic images along z by ``vacuum``, E_bulk
the energy of the *same atoms* in the periodic cell without vacuum (= N times the bulk energy per atom, with
exactly the same cutoff treatment) and A the area of one face (two faces per slab). ``relax=False`` gives
the unrelaxed (bulk-terminated) value; ``relax=True`` also minimises the slab's positions at fixed cell
(scipy L-BFGS on the torch energy, or OpenMM's minimiser for an OpenMM potential) and reports the relaxed
value. The slab is an integer number of periods of the oriented cell, so both faces carry the same complete
atomic planes; its thickness (default >= 2 cutoffs) exceeds the cutoff, so the two faces do not interact and
the unrelaxed gamma is exact for a pair potential of finite range.

Oriented cell (:func:`oriented_fcc_cell`): for a normal n = (h, k, l) (primitive integers), u = (k, -h, 0)
(or (1, 0, 0) for (001)), v = n x u; each edge is the shortest fcc translation along its direction (w/2 when
w has an even index sum, else w; units of a). The cell is orthorhombic and right-handed; (100): a x a x a,
4 atoms; (110): a/sqrt2 x a x a/sqrt2, 2 atoms; (111): a/sqrt2 x a sqrt(6)/2 x a sqrt3, 6 atoms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import EnpcgError, check_positive
from .crystals import FCC_BASIS
from .potential import TorchPotential

#: 1 kJ/mol/nm^2 in J/m^2 (1.66054e-21 J / 1e-18 m^2).
KJ_MOL_NM2_IN_J_M2 = 1.66054e-3


def _miller(hkl) -> np.ndarray:
    try:
        v = np.array([int(i) for i in hkl], dtype=np.int64)
        ok = len(v) == 3 and all(float(i) == int(i) for i in hkl)
    except (TypeError, ValueError):
        ok = False
    if not ok or not np.any(v):
        raise EnpcgError(f"hkl must be three integers, not all zero, e.g. (1, 1, 1); received {hkl!r}")
    return v // math.gcd(*(abs(int(i)) for i in v))


def _primitive(w) -> np.ndarray:
    w = np.asarray(w, dtype=np.int64)
    return w // math.gcd(*(abs(int(i)) for i in w))


def _fcc_translation(w) -> np.ndarray:
    """Shortest fcc lattice translation (units of a) along the primitive integer direction w."""
    return w / 2.0 if int(np.sum(w)) % 2 == 0 else w.astype(np.float64)


@dataclass
class OrientedCell:
    """An orthorhombic periodic cell of the fcc crystal with the (hkl) planes normal to z.

    ``positions`` (m, 3) nm in the cell frame; ``box`` (3, 3) nm diagonal; ``axes`` (3, 3): rows are the unit
    vectors of the cell's x, y, z in the cubic crystal frame (z = the (hkl) normal); ``directions`` (3, 3) the
    cell edges in units of a in the crystal frame; ``hkl``; ``layer_spacing`` nm (distance between adjacent
    (hkl) planes of atoms)."""

    positions: np.ndarray
    box: np.ndarray
    axes: np.ndarray
    directions: np.ndarray
    hkl: tuple
    layer_spacing: float


def oriented_fcc_cell(a: float, hkl) -> OrientedCell:
    """The orthorhombic fcc cell of lattice constant ``a`` (nm) whose z axis is the normal of (hkl) (see the
    module docstring for the construction). Atoms: 4 |det(edges)| / a^3."""
    a = check_positive("lattice constant a", a, "nm", 0.53)
    n = _miller(hkl)
    u = _primitive([n[1], -n[0], 0]) if (n[0] or n[1]) else np.array([1, 0, 0])
    v = _primitive(np.cross(n, u))
    dirs = np.array([_fcc_translation(w) for w in (u, v, n)])  # units of a, crystal frame
    edges = dirs * a
    lengths = np.linalg.norm(edges, axis=1)
    n_atoms = int(round(4 * abs(np.linalg.det(dirs))))
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64) @ dirs
    lo, hi = np.floor(corners.min(0)) - 1, np.ceil(corners.max(0)) + 1
    grid = np.stack(np.meshgrid(*[np.arange(lo[i], hi[i] + 1) for i in range(3)], indexing="ij"), -1).reshape(-1, 3)
    sites = (grid[:, None, :] + FCC_BASIS[None]).reshape(-1, 3)  # units of a
    frac = sites @ np.linalg.inv(dirs)
    frac = np.where(np.abs(frac - np.round(frac)) < 1e-9, np.round(frac), frac)  # sites on faces: exact
    keep = np.all((frac >= 0) & (frac < 1), axis=1)
    frac = frac[keep]
    if len(frac) != n_atoms:  # a construction error, not a user error
        raise RuntimeError(f"oriented cell for {tuple(n)} holds {len(frac)} sites, expected {n_atoms}")
    z = np.unique(np.round(frac[:, 2] * lengths[2], 9))
    return OrientedCell(positions=frac * lengths, box=np.diag(lengths), axes=edges / lengths[:, None],
                        directions=dirs, hkl=tuple(int(i) for i in n),
                        layer_spacing=float(lengths[2] / len(z)))


@dataclass
class Slab:
    """A periodic slab: ``positions`` (N, 3) nm, ``box`` (3, 3) nm (with vacuum along z), ``bulk_box`` (3, 3)
    nm (same atoms, no vacuum: the bulk reference), ``area`` nm^2 of one face, ``thickness`` nm (periods x
    cell height), ``n_layers`` atomic planes, ``cell`` the :class:`OrientedCell`, ``repeats`` (nx, ny, nz)."""

    positions: np.ndarray
    box: np.ndarray
    bulk_box: np.ndarray
    area: float
    thickness: float
    n_layers: int
    cell: OrientedCell
    repeats: tuple


def fcc_slab(a: float, hkl, *, min_width: float, min_thickness: float, vacuum: float) -> Slab:
    """An fcc slab with (hkl) faces normal to z: the oriented cell repeated laterally until both widths are
    >= ``min_width`` nm, and along z until the slab is >= ``min_thickness`` nm thick, in a box ``vacuum`` nm
    longer along z. Positions are centred in the box along z."""
    cell = oriented_fcc_cell(a, hkl)
    min_width = check_positive("min_width", min_width, "nm", 1.8)
    min_thickness = check_positive("min_thickness", min_thickness, "nm", 1.8)
    vacuum = check_positive("vacuum", vacuum, "nm", 1.8)
    lengths = np.diag(cell.box)
    reps = (int(math.ceil(min_width / lengths[0] - 1e-9)), int(math.ceil(min_width / lengths[1] - 1e-9)),
            int(math.ceil(min_thickness / lengths[2] - 1e-9)))
    grid = np.stack(np.meshgrid(*[np.arange(r) for r in reps], indexing="ij"), -1).reshape(-1, 3)
    pos = ((grid * lengths)[:, None, :] + cell.positions[None]).reshape(-1, 3)
    size = lengths * np.array(reps)
    pos[:, 2] += 0.5 * vacuum
    return Slab(positions=pos, box=np.diag([size[0], size[1], size[2] + vacuum]), bulk_box=np.diag(size),
                area=float(size[0] * size[1]), thickness=float(size[2]),
                n_layers=int(round(size[2] / cell.layer_spacing)), cell=cell, repeats=reps)


@dataclass
class SurfaceEnergy:
    """Surface energy of one orientation. ``gamma`` kJ/mol/nm^2 (relaxed when ``relaxed``, else unrelaxed),
    ``gamma_unrelaxed`` and ``gamma_relaxed`` (None without relaxation) kJ/mol/nm^2, ``hkl``, ``n_atoms``,
    ``area`` nm^2 (one face), ``bulk_energy_per_atom`` kJ/mol, ``slab`` (:class:`Slab`), ``positions`` (N, 3)
    nm of the (relaxed) slab, ``rms_force`` kJ/mol/nm left after relaxation."""

    hkl: tuple
    gamma: float
    gamma_unrelaxed: float
    gamma_relaxed: Optional[float]
    relaxed: bool
    n_atoms: int
    area: float
    bulk_energy_per_atom: float
    slab: Slab
    positions: np.ndarray
    rms_force: Optional[float] = None

    @property
    def gamma_j_m2(self) -> float:
        """:attr:`gamma` in J/m^2."""
        return self.gamma * KJ_MOL_NM2_IN_J_M2

    @property
    def label(self) -> str:
        """"(hkl)" with negative indices as -h."""
        return "(" + "".join(str(i) for i in self.hkl) + ")"


def surface_energy(energy_fn: Optional[Callable], lattice_constant: float, hkl, *, cutoff: float,
                   relax: bool = False, vacuum: Optional[float] = None, min_width: Optional[float] = None,
                   min_thickness: Optional[float] = None, tolerance: float = 1e-6,
                   potential_factory: Optional[Callable] = None) -> SurfaceEnergy:
    """Surface energy gamma(hkl) = (E_slab - E_bulk) / (2 A) of an fcc crystal, kJ/mol/nm^2.

    energy_fn : torch ``energy(x (n, 3) nm, box (3, 3) nm) -> () kJ/mol`` valid for any number of identical
        particles (e.g. :func:`enpcg.properties.crystals.lj_energy_fn`), or None with ``potential_factory``.
    lattice_constant : nm (use the zero-pressure one, e.g. ``crystals.lj_fcc_lattice_constant``).
    hkl : Miller indices. cutoff : the potential's range, nm; sets the defaults min_width = min_thickness =
        vacuum = 2 cutoff + 1e-3 nm (lateral widths and bulk height above twice the cutoff, as OpenMM needs).
    relax : also minimise the slab at fixed cell (``tolerance`` RMS force, kJ/mol/nm) and report the relaxed
        gamma; the unrelaxed one is always computed.
    potential_factory : ``f(n_atoms, box) -> Potential`` (e.g. an OpenMMPotential of
        ``crystals.openmm_lj_system``) used instead of ``energy_fn`` (called once, the box is passed at each
        evaluation).
    """
    from .elastic import minimize

    cutoff = check_positive("cutoff", cutoff, "nm", 0.85)
    if (energy_fn is None) == (potential_factory is None):
        raise EnpcgError("surface_energy needs exactly one of energy_fn (a torch energy) or potential_factory")
    d = 2 * cutoff + 1e-3
    slab = fcc_slab(lattice_constant, hkl, min_width=min_width or d, min_thickness=min_thickness or d,
                    vacuum=vacuum or d)
    n = len(slab.positions)
    pot = TorchPotential(energy_fn, np.ones(n)) if energy_fn is not None else potential_factory(n, slab.box)
    e_bulk = pot.energy(slab.positions, slab.bulk_box)
    e_slab = pot.energy(slab.positions, slab.box)
    g0 = (e_slab - e_bulk) / (2 * slab.area)
    g1, pos, rms = None, slab.positions, None
    if relax:
        res = minimize(pot, slab.positions, slab.box, tolerance=tolerance)
        g1, pos, rms = (res.energy - e_bulk) / (2 * slab.area), res.positions, res.rms_force
    return SurfaceEnergy(hkl=slab.cell.hkl, gamma=g1 if relax else g0, gamma_unrelaxed=g0, gamma_relaxed=g1,
                         relaxed=bool(relax), n_atoms=n, area=slab.area, bulk_energy_per_atom=e_bulk / n,
                         slab=slab, positions=pos, rms_force=rms)


def surface_energies(energy_fn: Optional[Callable], lattice_constant: float,
                     hkls: Sequence = ((1, 0, 0), (1, 1, 0), (1, 1, 1)), **kwargs) -> list:
    """:func:`surface_energy` for each orientation in ``hkls`` (same keyword arguments); list of results."""
    return [surface_energy(energy_fn, lattice_constant, hkl, **kwargs) for hkl in hkls]


def zone_angle(hkl) -> float:
    """Angle (degrees) of the (hkl) normal from [001] within the [1-10] zone, for planes equivalent by cubic
    symmetry to an (h h l) plane: (001) 0, (113) 25.24, (112) 35.26, (111) 54.74, (221) 70.53, (110) 90. The
    natural orientation axis of a gamma plot (it joins the three low-index cusps); NaN for planes outside
    that zone, e.g. (210)."""
    m = np.sort(np.abs(_miller(hkl)))
    if m[0] == m[1]:
        h, l = m[0], m[2]          # (h h l) with l >= h
    elif m[1] == m[2]:
        h, l = m[1], m[0]          # (h h l) with l < h
    else:
        return float("nan")
    return float(np.degrees(np.arccos(l / np.sqrt(2 * h * h + l * l))))


def plot_surface_energies(results: Sequence[SurfaceEnergy], path=None, unit: str = "J/m^2"):
    """Surface energy against orientation: bars per (hkl) (unrelaxed, and relaxed where computed) and gamma
    against the orientation angle of :func:`zone_angle` for the planes of the [1-10] zone (from (001) through
    (111) to (110)). ``unit``: "J/m^2" or "kJ/mol/nm^2". Saves a PNG to ``path`` (atomically) when given;
    returns the matplotlib Figure."""
    # the Agg canvas is attached to the Figure directly: no pyplot, no change of the global backend
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..fileio import atomic_path

    if unit not in ("J/m^2", "kJ/mol/nm^2"):
        raise EnpcgError(f"unit must be 'J/m^2' or 'kJ/mol/nm^2'; received {unit!r}")
    if not results:
        raise EnpcgError("plot_surface_energies needs at least one SurfaceEnergy")
    fac = KJ_MOL_NM2_IN_J_M2 if unit == "J/m^2" else 1.0
    labels = [r.label for r in results]
    g0 = np.array([r.gamma_unrelaxed for r in results]) * fac
    g1 = np.array([np.nan if r.gamma_relaxed is None else r.gamma_relaxed for r in results]) * fac
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    idx = np.arange(len(results))
    ax1.bar(idx - 0.2, g0, 0.4, label="unrelaxed")
    if np.any(np.isfinite(g1)):
        ax1.bar(idx + 0.2, g1, 0.4, label="relaxed")
    ax1.set_xticks(idx, labels)
    ax1.set_ylabel(f"surface energy ({unit})")
    ax1.legend()
    ang = np.array([zone_angle(r.hkl) for r in results])
    order = [i for i in np.argsort(ang) if np.isfinite(ang[i])]
    ax2.plot(ang[order], g0[order], "o-", label="unrelaxed")
    if np.any(np.isfinite(g1)):
        ax2.plot(ang[order], g1[order], "s--", label="relaxed")
    for i in order:
        ax2.annotate(labels[i], (ang[i], g0[i]), textcoords="offset points", xytext=(3, 4), fontsize=8)
    ax2.set_xlabel("angle from [001] in the [1-10] zone (deg)")
    ax2.set_xticks([0, 30, 60, 90])
    ax2.set_ylabel(f"surface energy ({unit})")
    if path is not None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                fig.savefig(fh, format="png", dpi=120)
    return fig
