"""Harmonic phonons of a periodic crystal: force constants from a supercell, the dynamical matrix, the acoustic
sum rule, dispersion along a path of wave vectors, densities of states on a k mesh, and a dispersion plot.

Units: positions and cells nm (lattice vectors are the **rows** of a (3, 3) array), masses amu, force
constants kJ/mol/nm^2, wave vectors k in 1/nm (with the 2 pi: k . R is in radians), dynamical matrix 1/ps^2,
omega rad/ps (negative: imaginary, omega = sign(lambda) sqrt(|lambda|)). Wavenumbers: 1 rad/ps = 5.308837
cm^-1; frequencies f = omega / (2 pi) in THz (see :mod:`enpcg.properties.normal_modes`).

Method. The unit cell (m atoms at ``unit_cell_positions`` in ``cell``) is repeated ``supercell = (n1, n2, n3)``
times (:func:`enpcg.properties.crystals.supercell`: atoms ordered cell by cell, the home cell first). The
force constants Phi_{a0, J} = d^2E / dx_a dx_J between each atom a of the home cell and every supercell atom J
are the first 3m rows of the supercell Hessian (autograd for a TorchPotential, central differences of the
forces for an OpenMM System: 6m force evaluations, not the 6 m n1 n2 n3 of a full Hessian). Each J stands for
the periodic image of itself nearest to atom a, at lattice translation R (equidistant images share the
constant equally, as phonopy does); this is exact when the interactions reach less than half the supercell
width, and exact at the k commensurate with the supercell in any case. Then

    D_ab(k) = sum_{J in b} Phi_{a0, J} exp(i k . R_J) / sqrt(m_a m_b),   omega^2 = eigenvalues of D(k)

(made Hermitian by averaging with its conjugate transpose). Acoustic sum rule: translation invariance
requires sum_J Phi_{a0, J} = 0 for every a; its violation (round-off for autograd, ~1e-8 relative for finite
differences, larger for a cut-off potential whose forces jump) is reported, then removed by correcting the
self terms Phi_{a0, a0}, so that the acoustic omega vanish at Gamma to round-off.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import EnpcgError
from .crystals import _reps, supercell as build_supercell
from .normal_modes import CM_PER_RAD_PS, THZ_PER_RAD_PS, signed_sqrt
from .potential import OpenMMPotential, TorchPotential, _positions


@dataclass
class ForceConstants:
    """Force constants between the home unit cell and a periodic supercell.

    unit_cell_positions (m, 3) nm; cell (3, 3) nm rows; masses (m,) amu; supercell (3,) ints;
    phi (m, N, 3, 3) kJ/mol/nm^2: Phi[a, J] = d^2E/dx_a dx_J (home atom a, supercell atom J; N = m n1 n2 n3);
    basis_index (N,): the unit-cell atom b each J is a copy of;
    image_R (m, N, K, 3) nm and image_weight (m, N, K): lattice translations of the images of J nearest to a
    (weights 1/multiplicity, zero padding);
    asr_violation: max_a ||sum_J Phi[a, J]||_F / max_a ||Phi[a, a]||_F before correction (relative);
    asr_violation_abs: the numerator, kJ/mol/nm^2; asr_corrected: whether the self terms were corrected;
    boundary_fraction: the largest ||Phi[a, J]|| among J with several equidistant images, relative to the
    largest ||Phi||: ~0 when the supercell holds the interaction range, else the dispersion off the
    commensurate k is approximate (use a larger supercell).
    """

    unit_cell_positions: np.ndarray
    cell: np.ndarray
    masses: np.ndarray
    supercell: tuple
    phi: np.ndarray
    basis_index: np.ndarray
    image_R: np.ndarray
    image_weight: np.ndarray
    asr_violation: float
    asr_violation_abs: float
    asr_corrected: bool
    boundary_fraction: float

    @property
    def reciprocal(self) -> np.ndarray:
        """Reciprocal lattice vectors (rows, 1/nm): b_i . a_j = 2 pi delta_ij."""
        return 2.0 * np.pi * np.linalg.inv(self.cell).T

    def to_cartesian(self, q) -> np.ndarray:
        """Fractional reciprocal coordinates (..., 3) -> Cartesian k (..., 3) 1/nm."""
        return np.asarray(q, dtype=np.float64) @ self.reciprocal


def _hessian_rows(potential, x: np.ndarray, box: np.ndarray, atoms: Sequence[int], hessian=None) -> np.ndarray:
    """Rows 3a..3a+2 of the Hessian (kJ/mol/nm^2) for each atom a in ``atoms``: (len(atoms), 3, n, 3)."""
    import torch

    n = len(x)
    if hessian is not None:
        h = np.asarray(hessian, dtype=np.float64)
        if h.shape != (3 * n, 3 * n):
            raise EnpcgError(f"hessian must be ({3 * n}, {3 * n}) for the {n}-atom supercell; received {h.shape}")
        return np.stack([h[3 * a:3 * a + 3].reshape(3, n, 3) for a in atoms])
    if isinstance(potential, TorchPotential):
        xt, bt = potential._tensors(x, box)
        xt.requires_grad_(True)
        (g,) = torch.autograd.grad(potential.energy_fn(xt, bt), xt, create_graph=True)
        rows = np.zeros((len(atoms), 3, n, 3))
        for k, a in enumerate(atoms):
            for al in range(3):
                (h,) = torch.autograd.grad(g[a, al], xt, retain_graph=True, allow_unused=True)
                if h is not None:
                    rows[k, al] = h.detach().numpy()
        return rows
    if isinstance(potential, OpenMMPotential):
        # OpenMM needs its box in reduced form: rotate the crystal there (x -> x q), difference the forces,
        # rotate the 3x3 blocks back (H = q H' q^T).
        q, r = np.linalg.qr(box.T)
        q = q * np.sign(np.diag(r))
        xr, br = x @ q, np.tril(box @ q)
        step = potential.step
    else:
        q, xr, br, step = np.eye(3), x, box, getattr(potential, "step", 1e-5)
    rows = np.zeros((len(atoms), 3, n, 3))
    for k, a in enumerate(atoms):
        for al in range(3):
            d = np.zeros((n, 3))
            d[a, al] = step
            fp = potential.forces(xr + d, br)
            fm = potential.forces(xr - d, br)
            rows[k, al] = -(fp - fm) / (2.0 * step)
    # back to the crystal frame: Phi_{a alpha, J beta} = q_{alpha gamma} Phi'_{gamma delta} q_{beta delta}
    return np.einsum("ag,kgjd,bd->kajb", q, rows, q)


def _check_cell(unit_cell_positions, cell):
    x = _positions(unit_cell_positions)
    c = np.asarray(cell, dtype=np.float64)
    if c.shape != (3, 3) or not np.all(np.isfinite(c)) or abs(np.linalg.det(c)) < 1e-12:
        raise EnpcgError(f"cell must be a non-singular (3, 3) array whose rows are the lattice vectors (nm); "
                         f"received {np.asarray(cell).tolist()}")
    return x, c


def force_constants(potential, unit_cell_positions, cell, supercell=(4, 4, 4), hessian=None,
                    acoustic_sum_rule: bool = True) -> ForceConstants:
    """Force constants of a crystal from its supercell.

    potential : :class:`~enpcg.properties.potential.Potential` of the supercell: n_particles = m n1 n2 n3,
        masses in the order of :func:`enpcg.properties.crystals.supercell` (cell by cell, the m unit-cell atoms
        within each); a TorchPotential must accept the supercell box (e.g. :func:`crystals.lj_energy_fn`);
        an OpenMMPotential gets the box rotated to OpenMM's reduced form.
    unit_cell_positions (m, 3) nm; cell (3, 3) nm rows; supercell: repetitions (n1, n2, n3) or one int;
    hessian : optional full supercell Hessian (3N, 3N) kJ/mol/nm^2 to take the constants from;
    acoustic_sum_rule : correct the self terms so every row of force constants sums to zero.
    """
    x0, c = _check_cell(unit_cell_positions, cell)
    m = len(x0)
    pos, sbox, cell_index = build_supercell(x0, c, supercell)
    reps = _reps(supercell)
    n = len(pos)
    if potential.n_particles != n:
        raise EnpcgError(f"the potential has {potential.n_particles} particles but the supercell {reps} of a "
                         f"{m}-atom cell has {n}. Fix: build the potential for the supercell (masses tiled "
                         f"{int(np.prod(reps))} times)")
    masses_all = np.asarray(potential.masses, dtype=np.float64).reshape(-1, m)
    if np.any(np.abs(masses_all - masses_all[0]) > 1e-12 * np.abs(masses_all[0])):
        raise EnpcgError("the potential's masses differ between unit cells: order them cell by cell as "
                         "crystals.supercell does (the m unit-cell masses repeated)")
    masses = masses_all[0]
    phi = _hessian_rows(potential, pos, sbox, range(m), hessian).transpose(0, 2, 1, 3)  # (m, N, 3, 3)

    # nearest images of every J as seen from each home atom a
    inv = np.linalg.inv(sbox)
    shifts = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=np.float64)
    d = pos[None, :, :] - x0[:, None, :]  # (m, N, 3)
    base = d - np.round(d @ inv) @ sbox
    cand = base[:, :, None, :] + (shifts @ sbox)[None, None]  # (m, N, 27, 3)
    dist = np.linalg.norm(cand, axis=-1)
    dmin = dist.min(axis=-1, keepdims=True)
    tie = dist <= dmin + 1e-9 * max(1.0, float(np.max(np.linalg.norm(sbox, axis=1))))
    k_max = int(tie.sum(-1).max())
    image_R = np.zeros((m, n, k_max, 3))
    image_w = np.zeros((m, n, k_max))
    basis_index = np.tile(np.arange(m), n // m)
    tau = x0[basis_index]  # unit-cell offset of each J
    for a in range(m):
        for j in range(n):
            sel = np.flatnonzero(tie[a, j])
            # image position x_a + cand = x_J + L  =>  lattice translation R = x_a + cand - tau_J
            image_R[a, j, :len(sel)] = x0[a] + cand[a, j, sel] - tau[j]
            image_w[a, j, :len(sel)] = 1.0 / len(sel)
    norms = np.linalg.norm(phi, axis=(2, 3))
    multi = tie.sum(-1) > 1
    boundary = float(norms[multi].max() / norms.max()) if multi.any() and norms.max() > 0 else 0.0

    row_sum = phi.sum(axis=1)  # (m, 3, 3)
    viol_abs = float(np.max(np.linalg.norm(row_sum, axis=(1, 2))))
    self_norm = max(float(np.max(np.linalg.norm(phi[np.arange(m), np.arange(m)], axis=(1, 2)))), 1e-300)
    if acoustic_sum_rule:
        phi = phi.copy()
        phi[np.arange(m), np.arange(m)] -= row_sum  # home atom a is supercell atom a (cell (0, 0, 0) first)
    return ForceConstants(unit_cell_positions=x0, cell=c, masses=masses, supercell=reps, phi=phi,
                          basis_index=basis_index, image_R=image_R, image_weight=image_w,
                          asr_violation=viol_abs / self_norm, asr_violation_abs=viol_abs,
                          asr_corrected=bool(acoustic_sum_rule), boundary_fraction=boundary)


def dynamical_matrix(fc: ForceConstants, k) -> np.ndarray:
    """D(k) (3m, 3m) complex, 1/ps^2, at Cartesian wave vector k (3,) 1/nm; Hermitian by construction."""
    k = np.asarray(k, dtype=np.float64).reshape(3)
    m = len(fc.masses)
    phase = (fc.image_weight * np.exp(1j * (fc.image_R @ k))).sum(-1)  # (m, N)
    d = np.zeros((m, 3, m, 3), dtype=complex)
    for b in range(m):
        sel = fc.basis_index == b
        d[:, :, b, :] = np.einsum("aj,ajxy->axy", phase[:, sel], fc.phi[:, sel])
    w = 1.0 / np.sqrt(fc.masses)
    d = d * w[:, None, None, None] * w[None, None, :, None]
    d = d.reshape(3 * m, 3 * m)
    return 0.5 * (d + d.conj().T)


def phonon_frequencies(fc: ForceConstants, k_points, vectors: bool = False):
    """omega (P, 3m) rad/ps, ascending at each k, for Cartesian k_points (P, 3) 1/nm (negative = imaginary).
    With ``vectors``, also the eigenvectors (P, 3m, 3m) (columns)."""
    ks = np.asarray(k_points, dtype=np.float64).reshape(-1, 3)
    out, vecs = [], []
    for k in ks:
        lam, v = np.linalg.eigh(dynamical_matrix(fc, k))
        out.append(signed_sqrt(lam))
        vecs.append(v)
    return (np.array(out), np.array(vecs)) if vectors else np.array(out)


@dataclass
class PhononDispersion:
    """Phonon branches along a path.

    k (P, 3) Cartesian 1/nm; q (P, 3) fractional reciprocal coordinates; distance (P,) 1/nm along the path;
    omega (P, 3m) rad/ps ascending per k (negative: imaginary); ticks [(distance, label)] at the path's corners;
    force_constants: the :class:`ForceConstants` used (ASR violation and supercell diagnostics inside).
    """

    k: np.ndarray
    q: np.ndarray
    distance: np.ndarray
    omega: np.ndarray
    ticks: list
    force_constants: ForceConstants

    @property
    def wavenumber_cm(self) -> np.ndarray:
        return self.omega * CM_PER_RAD_PS

    @property
    def frequency_thz(self) -> np.ndarray:
        return self.omega * THZ_PER_RAD_PS

    @property
    def asr_violation(self) -> float:
        """Relative acoustic-sum-rule violation of the force constants before correction."""
        return self.force_constants.asr_violation


def _parse_path(path, reciprocal, cartesian: bool):
    if path is None or len(path) < 2:
        raise EnpcgError("path must list at least two wave vectors, e.g. [('G', (0, 0, 0)), ('X', (0, 0.5, 0.5))] "
                         "(fractional reciprocal coordinates; cartesian=True for 1/nm)")
    labels, qs = [], []
    for i, item in enumerate(path):
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            label, v = item
        else:
            label, v = "", item
        v = np.asarray(v, dtype=np.float64)
        if v.shape != (3,) or not np.all(np.isfinite(v)):
            raise EnpcgError(f"path[{i}]: a wave vector must be 3 finite numbers; received {item!r}")
        labels.append(label)
        qs.append(v)
    qs = np.array(qs)
    ks = qs if cartesian else qs @ reciprocal
    return labels, ks


def k_path(path, reciprocal, points: int = 100, cartesian: bool = False):
    """Wave vectors along straight segments between the corners of ``path``.

    path: [(label, q), ...] or [q, ...]; q fractional in ``reciprocal`` (rows, 1/nm), or Cartesian 1/nm with
    ``cartesian``. points: total number of k (>= 2 per segment, shared by segment length; corners included
    once). Returns k (P, 3) 1/nm, distance (P,) 1/nm, ticks [(distance, label)].
    """
    labels, corners = _parse_path(path, np.asarray(reciprocal, dtype=np.float64), cartesian)
    seg = np.linalg.norm(np.diff(corners, axis=0), axis=1)
    total = seg.sum()
    if total <= 0:
        raise EnpcgError("path has zero length: all its wave vectors coincide")
    if int(points) < len(corners):
        raise EnpcgError(f"points must be at least the number of path corners ({len(corners)}); received {points}")
    ks, dist, ticks, s0 = [corners[:1]], [np.zeros(1)], [(0.0, labels[0])], 0.0
    for i, length in enumerate(seg):
        n_i = max(1, int(round((int(points) - 1) * length / total)))
        t = np.arange(1, n_i + 1) / n_i
        ks.append(corners[i] + t[:, None] * (corners[i + 1] - corners[i]))
        dist.append(s0 + t * length)
        s0 += length
        ticks.append((s0, labels[i + 1]))
    return np.concatenate(ks), np.concatenate(dist), ticks


def phonon_dispersion(potential, unit_cell_positions, cell, supercell=(4, 4, 4), path=None, points: int = 100,
                      cartesian: bool = False, fc: Optional[ForceConstants] = None, hessian=None,
                      acoustic_sum_rule: bool = True) -> PhononDispersion:
    """Phonon dispersion of a crystal along ``path``.

    potential: Potential of the supercell (see :func:`force_constants`); unit_cell_positions (m, 3) nm;
    cell (3, 3) nm rows; supercell (n1, n2, n3); path: [(label, q), ...] with q in fractional coordinates of
    the reciprocal lattice of ``cell`` (``cartesian=True``: k in 1/nm), e.g. for
    :func:`~enpcg.properties.crystals.fcc_primitive_cell` the points of
    :data:`~enpcg.properties.crystals.FCC_SPECIAL_POINTS`; points: total number of k.
    fc: precomputed force constants (then potential may be None). Returns :class:`PhononDispersion`.
    """
    if fc is None:
        fc = force_constants(potential, unit_cell_positions, cell, supercell, hessian=hessian,
                             acoustic_sum_rule=acoustic_sum_rule)
    ks, dist, ticks = k_path(path, fc.reciprocal, points, cartesian)
    return PhononDispersion(k=ks, q=ks @ np.linalg.inv(fc.reciprocal), distance=dist,
                            omega=phonon_frequencies(fc, ks), ticks=ticks, force_constants=fc)


def phonon_mesh(fc: ForceConstants, mesh=(8, 8, 8)) -> np.ndarray:
    """omega (P, 3m) rad/ps on a Gamma-centred uniform mesh of the Brillouin zone (P = m1 m2 m3 k points), for
    a phonon density of states (:func:`enpcg.properties.normal_modes.density_of_states`)."""
    mesh = (mesh,) * 3 if np.isscalar(mesh) else tuple(mesh)
    if len(mesh) != 3 or any(int(v) < 1 for v in mesh):
        raise EnpcgError(f"mesh must be three integers >= 1; received {mesh!r}")
    grids = [np.arange(int(v)) / int(v) for v in mesh]
    q = np.array(list(itertools.product(*grids)))
    return phonon_frequencies(fc, fc.to_cartesian(q))


def plot_dispersion(dispersion: PhononDispersion, path, unit: str = "THz", title: Optional[str] = None,
                    reference: Optional[dict] = None) -> Path:
    """Plot phonon branches against the distance along the k path; PNG written atomically.

    unit: "THz", "cm-1" or "rad/ps". reference: optional {label: (distance (P,), omega (P, B) rad/ps)} curves
    drawn dashed (e.g. an analytic dispersion). Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..fileio import atomic_path
    from .normal_modes import _unit

    factor, ylabel = _unit(unit)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(dispersion.distance, dispersion.omega * factor, color="tab:blue", linewidth=1.2)
    for name, (s, w) in (reference or {}).items():
        ax.plot(s, np.asarray(w) * factor, "--", color="tab:orange", linewidth=1.0, label=name)
    for s, label in dispersion.ticks:
        ax.axvline(s, color="grey", linewidth=0.5)
    ax.set_xticks([s for s, _ in dispersion.ticks])
    ax.set_xticklabels([("$\\Gamma$" if lab in ("G", "Gamma") else lab) for _, lab in dispersion.ticks])
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xlim(dispersion.distance[0], dispersion.distance[-1])
    fc = dispersion.force_constants
    ax.set(ylabel=ylabel, title=title or f"phonon dispersion (supercell {'x'.join(map(str, fc.supercell))}, "
                                          f"ASR violation {fc.asr_violation:.1e})")
    if reference:
        ax.legend(fontsize="small")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
