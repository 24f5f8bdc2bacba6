"""Equivariance audit of any potential: are energies invariant and forces equivariant under rotations,
reflections and translations?

Units: positions and box nm (box vectors are rows), energies kJ/mol, forces kJ/mol/nm. Leakages are
dimensionless relative numbers.

Convention: an orthogonal matrix R acts on every position (row vector) as x -> x R^T + t, on the box rows alike.
An E(3)-invariant energy gives E(x R^T + t) = E(x) and forces F(x R^T + t) = F(x) R^T. The audit reports

* force leakage   = ||F(x R^T + t) - F(x) R^T|| / ||F(x)||   (Frobenius norms over all particles),
* energy leakage  = |E(x R^T + t) - E(x)| / |E(x)|              (absolute if E(x) = 0),

the worst over ``n_rotations`` Haar-random rotations, separately for proper rotations (SO(3), det R = +1) and
improper ones (det R = -1: a rotation times the inversion; O(3) \\ SO(3)), and for pure translations. A model
that is SO(3)- but not O(3)-invariant (chiral, with pseudoscalar features) shows up as a small SO(3) and a
large O(3) leakage.

Tolerance. In float64 the round-off of a force set is ~1e-15..1e-13 relative (sums over many pairs; e3nn's
spherical harmonics); :data:`DEFAULT_TOLERANCE` = 1e-10 separates round-off from real symmetry breaking, which
for the negative controls of the tests is ~1e-2. Float32 potentials (OpenMM's mixed/single platforms, float32 models)
need ~1e-5.

Periodic systems (``box`` given). ``box_mode``:

* ``"rotate"``: the box rotates with the atoms (box R^T): the potential must accept a box in any orientation,
  e.g. :func:`enpcg.properties.crystals.lj_energy_fn`. This project's models do not: their contract
  (docs/conventions.md) is a box in OpenMM's reduced form, and their minimum image (bonded terms, pair
  vectors) is wrong in a rotated box (measured: O(1) leakage for the priors and neural models).
* ``"reduce"`` (the default, "auto", for every periodic potential): the rotated cell is rotated back into
  OpenMM's reduced form, as ``OpenMMPotential.strain_energy`` does (a reference box not in reduced form is
  reduced first). Reduction undoes any rotation of a given lattice, so random rotations
  then test only the round trip and the translation; the real test in this mode is the set of point-group
  operations of the lattice: signed permutations P of the axes with box P = U box, U integer (the lattice is
  unchanged, the atoms are rotated: 48 operations for a cubic box, 8 for an orthorhombic one, only +-1 for a
  generic triclinic one). They are applied as well (all, or ``max_lattice_ops`` of them drawn at random) and
  reported under SO(3)/O(3) by their determinant.

Distorted environments: :func:`distorted_fcc_structures` (vacancy, edge and screw dislocations, tilt grain
boundary from :mod:`enpcg.properties.crystals`) and :func:`audit_structures` audit a potential on each.
Negative controls: :func:`fixed_direction_energy_fn` (breaks SO(3)), :func:`chiral_energy_fn` (keeps SO(3),
breaks reflections).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import EnpcgError, check_int
from . import crystals
from .crystals import random_rotation
from .potential import _box, _positions

DEFAULT_TOLERANCE = 1e-10
BOX_MODES = ("auto", "rotate", "reduce")


@dataclass
class EquivarianceAudit:
    """Result of :func:`audit_equivariance`.

    so3_force, so3_energy, o3_force, o3_energy, translation_force, translation_energy: per-transformation
    leakages (arrays); ``o3`` holds the improper transformations only (det = -1). The ``*_leakage`` properties
    are the worst (max) of each. energy (kJ/mol) and force_norm (kJ/mol/nm) of the reference configuration;
    periodic; box_mode ("none", "rotate" or "reduce"); n_lattice_ops: lattice point-group operations included
    (reduce mode); tolerance; notes: caveats (e.g. no proper lattice rotation exists for this box).
    """

    so3_force: np.ndarray
    so3_energy: np.ndarray
    o3_force: np.ndarray
    o3_energy: np.ndarray
    translation_force: np.ndarray
    translation_energy: np.ndarray
    energy: float
    force_norm: float
    periodic: bool
    box_mode: str
    n_lattice_ops: int
    tolerance: float
    notes: list = field(default_factory=list)

    @staticmethod
    def _max(a) -> float:
        return float(np.max(a)) if len(a) else 0.0

    @property
    def so3_force_leakage(self) -> float:
        return self._max(self.so3_force)

    @property
    def so3_energy_leakage(self) -> float:
        return self._max(self.so3_energy)

    @property
    def o3_force_leakage(self) -> float:
        return self._max(self.o3_force)

    @property
    def o3_energy_leakage(self) -> float:
        return self._max(self.o3_energy)

    @property
    def translation_leakage(self) -> float:
        return max(self._max(self.translation_force), self._max(self.translation_energy))

    @property
    def so3_ok(self) -> bool:
        """Energy invariant and forces equivariant under proper rotations (and translations) within tolerance."""
        return max(self.so3_force_leakage, self.so3_energy_leakage, self.translation_leakage) <= self.tolerance

    @property
    def o3_ok(self) -> bool:
        """As :attr:`so3_ok`, reflections included (E(3) invariance)."""
        return self.so3_ok and max(self.o3_force_leakage, self.o3_energy_leakage) <= self.tolerance

    @property
    def flagged(self) -> bool:
        """True when the potential breaks rotation or translation symmetry beyond the tolerance."""
        return not self.so3_ok

    def summary(self) -> dict:
        """JSON-able worst leakages, verdicts and context."""
        return {"so3_force_leakage": self.so3_force_leakage, "so3_energy_leakage": self.so3_energy_leakage,
                "o3_force_leakage": self.o3_force_leakage, "o3_energy_leakage": self.o3_energy_leakage,
                "translation_leakage": self.translation_leakage, "so3_ok": self.so3_ok, "o3_ok": self.o3_ok,
                "tolerance": self.tolerance, "n_proper": int(len(self.so3_force)),
                "n_improper": int(len(self.o3_force)), "periodic": self.periodic, "box_mode": self.box_mode,
                "n_lattice_ops": self.n_lattice_ops, "energy_kj_mol": self.energy,
                "force_norm_kj_mol_nm": self.force_norm, "notes": list(self.notes)}


def lattice_operations(box, tol: float = 1e-8) -> list:
    """Signed permutation matrices P (3, 3), identity excluded, that map the periodic lattice with rows ``box``
    onto itself: box P = U box with U an integer matrix. x -> x P is then a symmetry operation of the cell."""
    b = np.asarray(box, dtype=np.float64)
    inv = np.linalg.inv(b)
    ops = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            p = np.zeros((3, 3))
            p[list(range(3)), list(perm)] = signs
            if np.allclose(p, np.eye(3)):
                continue
            u = b @ p @ inv
            if np.all(np.abs(u - np.round(u)) < tol):
                ops.append(p)
    return ops


def _reduce(x, b):
    """Rotate positions and box so the box is in OpenMM's reduced form; returns x q, box q, q."""
    q, r = np.linalg.qr(b.T)
    q = q * np.sign(np.diag(r))
    return x @ q, np.tril(b @ q), q


def audit_equivariance(potential, positions, box=None, n_rotations: int = 8, seed: int = 0,
                       reflections: bool = True, translate: bool = True, box_mode: str = "auto",
                       tolerance: float = DEFAULT_TOLERANCE, max_lattice_ops: Optional[int] = None,
                       min_force: float = 1e-6) -> EquivarianceAudit:
    """Audit energy invariance and force equivariance of ``potential`` at ``positions`` (n, 3) nm.

    box : (3, 3) nm rows or None (isolated system). n_rotations : random proper rotations (and as many improper
    ones when ``reflections``), each combined with a random translation when ``translate`` (up to 1 nm, or one
    box length); pure translations are audited too. box_mode : "auto" (= "reduce"), "rotate" or "reduce"
    (see the module doc). tolerance : relative leakage accepted as round-off. max_lattice_ops : cap on the
    lattice operations of reduce mode (half proper, half improper, drawn at random; None: all, up to 47).
    min_force : RMS force (kJ/mol/nm) below which the configuration is refused (forces of pure round-off).
    Returns :class:`EquivarianceAudit`.
    """
    n_rotations = check_int("n_rotations", n_rotations, 1, 8)
    if box_mode not in BOX_MODES:
        raise EnpcgError(f"box_mode must be one of {list(BOX_MODES)}; received {box_mode!r}")
    x = _positions(positions, potential.n_particles)
    b = _box(box)
    rng = np.random.default_rng(seed)
    if b is None:
        mode = "none"
    else:
        mode = "reduce" if box_mode == "auto" else box_mode
    if mode == "reduce":
        x, b, _ = _reduce(x, b)  # the reference frame itself in reduced form (a no-op for a reduced box)
    e0, f0 = potential.energy_and_forces(x, b)
    fnorm = float(np.linalg.norm(f0))
    if not fnorm / np.sqrt(len(x)) > min_force:
        # a symmetric configuration (perfect lattice, minimum) has forces of pure round-off: relative leakage
        # against them would measure noise
        raise EnpcgError(f"the forces vanish at this configuration (RMS {fnorm / np.sqrt(len(x)):.2e} kJ/mol/nm <= "
                         f"min_force {min_force}; a perfect lattice or a minimum?), so force equivariance cannot be "
                         "measured relative to them. Fix: displace the atoms randomly (e.g. by 0.01 nm)")
    scale = 1.0 if b is None else float(np.mean(np.linalg.norm(b, axis=1)))
    notes = []

    def leak(m, t, lattice_op=False):
        """Leakages of x -> x m + t (m orthogonal, rows convention)."""
        xt = x @ m + t
        bt = None if b is None else b @ m
        mm = m
        if lattice_op:  # lattice operation: the lattice is unchanged, keep the original (reduced) box
            bt = b
        elif mode == "reduce":
            xt, bt, q = _reduce(xt, bt)
            mm = m @ q
        e, f = potential.energy_and_forces(xt, bt)
        fl = float(np.linalg.norm(f - f0 @ mm)) / fnorm
        el = abs(e - e0) / abs(e0) if e0 != 0 else abs(e - e0)
        return fl, el

    res = {"so3": [], "o3": [], "tr": []}
    for proper in ([True, False] if reflections else [True]):
        for _ in range(n_rotations):
            r = random_rotation(rng, proper=proper)
            t = rng.uniform(-1, 1, 3) * scale if translate else np.zeros(3)
            res["so3" if proper else "o3"].append(leak(r.T, t))
    if translate:
        for _ in range(max(2, n_rotations // 2)):
            res["tr"].append(leak(np.eye(3), rng.uniform(-1, 1, 3) * scale))
    n_ops = 0
    if mode == "reduce":
        ops = lattice_operations(b)
        if max_lattice_ops is not None and len(ops) > int(max_lattice_ops):
            proper = [p for p in ops if np.linalg.det(p) > 0]
            improper = [p for p in ops if np.linalg.det(p) < 0]
            k = int(max_lattice_ops)
            pick = lambda lst, c: [lst[i] for i in rng.permutation(len(lst))[:c]]  # noqa: E731
            ops = pick(proper, (k + 1) // 2) + pick(improper, k // 2)
        n_ops = len(ops)
        for p in ops:
            if not reflections and np.linalg.det(p) < 0:
                continue
            res["so3" if np.linalg.det(p) > 0 else "o3"].append(leak(p, np.zeros(3), lattice_op=True))
        if not any(np.linalg.det(p) > 0 for p in ops):
            notes.append("reduce mode: this box has no proper lattice rotation, so SO(3) is tested only through "
                         "the rotate-and-reduce round trip; audit a cluster (box=None) or use box_mode='rotate'")
        notes.append(f"reduce mode: random rotations are undone by the reduction; {n_ops} lattice point-group "
                     "operations carry the rotation test")

    def arr(key, k):
        return np.array([v[k] for v in res[key]])

    return EquivarianceAudit(so3_force=arr("so3", 0), so3_energy=arr("so3", 1), o3_force=arr("o3", 0),
                             o3_energy=arr("o3", 1), translation_force=arr("tr", 0),
                             translation_energy=arr("tr", 1), energy=float(e0), force_norm=fnorm,
                             periodic=b is not None, box_mode=mode, n_lattice_ops=n_ops,
                             tolerance=float(tolerance), notes=notes)


# ---------------------------------------------------------------------------------------------- structures
def distorted_fcc_structures(a: float, n=(3, 3, 3), radius: float = 1.2, seed: Optional[int] = 0,
                             jitter: float = 0.005) -> dict:
    """Distorted fcc environments for audits: name -> (positions (N, 3) nm, box (3, 3) nm or None).

    "vacancy": periodic n-cell crystal minus one atom; "edge_dislocation", "screw_dislocation",
    "grain_boundary": spherical clusters of ``radius`` nm (non-periodic) from :mod:`crystals`. A random jitter
    (nm, Gaussian, seeded; 0 or seed None: none) moves every atom off its symmetric site so forces are generic.
    """
    out = {"vacancy": crystals.fcc_vacancy(a, n),
           "edge_dislocation": crystals.fcc_edge_dislocation(a, radius),
           "screw_dislocation": crystals.fcc_screw_dislocation(a, radius),
           "grain_boundary": crystals.fcc_grain_boundary(a, radius=radius)}
    if seed is not None and jitter > 0:
        rng = np.random.default_rng(seed)
        out = {k: (x + rng.normal(scale=jitter, size=x.shape), b) for k, (x, b) in out.items()}
    return out


def audit_structures(make_potential: Callable, structures: dict, **kwargs) -> dict:
    """Audit one model on several structures: name -> :class:`EquivarianceAudit`.

    make_potential(positions (N, 3) nm, box or None) -> Potential for that structure (the number of atoms
    differs between structures); kwargs go to :func:`audit_equivariance`.
    """
    return {name: audit_equivariance(make_potential(x, b), x, b, **kwargs) for name, (x, b) in structures.items()}


# ---------------------------------------------------------------------------------------------- negative controls
def fixed_direction_energy_fn(energy_fn: Callable, strength: float, direction=(1.0, 0.0, 0.0),
                              length: float = 0.3, cutoff: float = 0.9) -> Callable:
    """``energy_fn`` plus a term that singles out a fixed lab direction n (deliberately not SO(3)-invariant,
    translation invariant): strength * sum_{pairs r < cutoff} (r_ij . n)^2 / length^2 * exp(-r^2 / length^2)
    (kJ/mol; strength kJ/mol; length, cutoff nm)."""
    n = torch.tensor(np.asarray(direction, dtype=np.float64) / np.linalg.norm(direction))

    def energy(x, box=None):
        i, j, s = crystals.lj_pair_images(x, box, cutoff)
        d = x[j] - x[i]
        if box is not None:
            d = d + s.to(x.dtype) @ box.to(x.dtype)
        r2 = (d * d).sum(-1) / length ** 2
        return energy_fn(x, box) + strength * ((d @ n.to(x.dtype)) ** 2 / length ** 2 * torch.exp(-r2)).sum()

    return energy


def chiral_energy_fn(energy_fn: Callable, strength: float, quadruples) -> Callable:
    """``energy_fn`` plus a pseudoscalar term: strength * sum over quadruples (i, j, k, l) of the triple product
    (x_j - x_i) . ((x_k - x_i) x (x_l - x_i)) / nm^3 (kJ/mol). Invariant under rotations and translations, odd
    under reflections: SO(3) passes, O(3) fails. Non-periodic systems (no minimum image)."""
    q = torch.as_tensor(np.asarray(quadruples, dtype=np.int64).reshape(-1, 4))

    def energy(x, box=None):
        u, v, w = (x[q[:, k]] - x[q[:, 0]] for k in (1, 2, 3))
        return energy_fn(x, box) + strength * (u * torch.linalg.cross(v, w)).sum()

    return energy
