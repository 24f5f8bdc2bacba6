"""Normal modes of any potential: the mass-weighted Hessian, its eigenmodes, rigid-body modes, spectra.

Units: positions nm, masses amu, Hessian kJ/mol/nm^2. Since 1 kJ/mol = 1 amu nm^2/ps^2, the mass-weighted
Hessian H_ij / sqrt(m_i m_j) is in 1/ps^2 and its eigenvalues are omega^2 with omega in rad/ps.

Conversions (stated once, used everywhere):

* wavenumber nu~ = omega / (2 pi c), c = 2.99792458e-2 cm/ps: 1 rad/ps = :data:`CM_PER_RAD_PS` = 5.308837 cm^-1;
* ordinary frequency f = omega / (2 pi): 1 rad/ps = 0.159155 THz.

A negative eigenvalue omega^2 < 0 (a saddle or an unrelaxed structure) is reported as a negative omega,
omega = sign(lambda) sqrt(|lambda|) ("imaginary mode").

Rigid-body modes: the analytic subspace spanned, in mass-weighted coordinates, by the 3 translations
sqrt(m_i) e_a and (isolated systems only) the rotations sqrt(m_i) e_a x (x_i - x_com): 3 + 3 modes for a
non-linear cluster, 3 + 2 for a linear molecule (inertia tensor with a zero eigenvalue), 3 + 0 for one atom
and for a periodic cell (rotations are not symmetries of a cell).
Eigenvectors are projected onto this subspace; the ``n_rigid`` modes with the largest overlap are flagged, and
their (ideally zero) omega are the *residual* frequencies, a measure of how far the structure is from a
stationary point and of the Hessian's accuracy. Eigenvectors of degenerate eigenvalues are first rotated
within their eigenspace to align with the rigid-body subspace (any basis of a degenerate eigenspace is an
equally valid answer of the eigensolver, and zero modes are often degenerate with rigid-body ones).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import EnpcgError
from .potential import _box, _positions

C_CM_PER_PS = 2.99792458e-2  # speed of light, cm/ps
CM_PER_RAD_PS = 1.0 / (2.0 * np.pi * C_CM_PER_PS)  # wavenumber (cm^-1) of omega = 1 rad/ps: 5.308837...
THZ_PER_RAD_PS = 1.0 / (2.0 * np.pi)  # ordinary frequency (THz = 1/ps) of omega = 1 rad/ps


def omega_to_wavenumber(omega):
    """Angular frequency (rad/ps) -> wavenumber (cm^-1), sign kept (negative = imaginary)."""
    return np.asarray(omega, dtype=np.float64) * CM_PER_RAD_PS


def signed_sqrt(eigenvalues):
    """omega = sign(lambda) sqrt(|lambda|): rad/ps from eigenvalues in 1/ps^2; negative marks imaginary modes."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    return np.sign(lam) * np.sqrt(np.abs(lam))


def _masses(masses, n: int) -> np.ndarray:
    m = np.asarray(masses, dtype=np.float64).reshape(-1)
    if m.shape != (n,):
        raise EnpcgError(f"masses must have one entry (amu) per particle: {n}; received shape {m.shape}")
    if not np.all(np.isfinite(m)) or np.any(m <= 0):
        raise EnpcgError("masses must be positive and finite (amu); massless (virtual) sites have no normal modes."
                         " Fix: remove virtual sites, or give every particle its mass")
    return m


def mass_weighted_hessian(hessian, masses) -> np.ndarray:
    """H_ij / sqrt(m_i m_j) (3n, 3n), 1/ps^2, from the Hessian (3n, 3n) kJ/mol/nm^2 and masses (n,) amu."""
    h = np.asarray(hessian, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.shape[0] % 3:
        raise EnpcgError(f"hessian must be square (3n, 3n) kJ/mol/nm^2; received shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise EnpcgError("hessian contains NaN or infinite values (overlapping particles?)")
    m = _masses(masses, h.shape[0] // 3)
    w = 1.0 / np.sqrt(np.repeat(m, 3))
    return 0.5 * (h + h.T) * w[:, None] * w[None, :]


def rigid_body_basis(positions, masses, periodic: bool = False, linear_tol: float = 1e-8) -> np.ndarray:
    """Orthonormal basis (3n, k) of the rigid-body motions in mass-weighted coordinates.

    k = 3 translations, plus for a non-periodic system the rotations about the centre of mass along the
    principal axes whose moment of inertia exceeds ``linear_tol`` times the largest (3 for a cluster, 2 for a
    linear molecule, 0 for one atom). positions (n, 3) nm; masses (n,) amu; periodic: a cell (translations only).
    """
    x = _positions(positions)
    m = _masses(masses, len(x))
    n = len(x)
    sq = np.sqrt(m)
    cols = []
    for a in range(3):
        t = np.zeros((n, 3))
        t[:, a] = sq
        cols.append(t.reshape(-1) / np.linalg.norm(t))
    if not periodic and n > 1:
        r = x - (m[:, None] * x).sum(0) / m.sum()
        inertia = np.einsum("i,ij,ik->jk", m, r, r)
        inertia = np.trace(inertia) * np.eye(3) - inertia
        moments, axes = np.linalg.eigh(inertia)
        for k in range(3):
            if moments[k] > linear_tol * moments.max():
                v = sq[:, None] * np.cross(axes[:, k][None, :], r)
                cols.append(v.reshape(-1) / np.sqrt(moments[k]))  # |v|^2 = principal moment
    return np.stack(cols, axis=1)


@dataclass
class NormalModes:
    """Eigenmodes of the mass-weighted Hessian, ascending in eigenvalue.

    eigenvalues (3n,) 1/ps^2 (omega^2); omega (3n,) rad/ps (negative: imaginary); vectors (3n, 3n): column k is
    the orthonormal mass-weighted eigenvector of mode k; masses (n,) amu; rigid_body (3n,) bool: the
    rigid-body modes; rigid_body_overlap (3n,): squared norm of each eigenvector's projection onto the analytic
    rigid-body subspace (1: pure rigid motion); n_rigid: translations + rotations expected (6, 5, 3).
    """

    eigenvalues: np.ndarray
    omega: np.ndarray
    vectors: np.ndarray
    masses: np.ndarray
    rigid_body: np.ndarray
    rigid_body_overlap: np.ndarray
    n_rigid: int

    @property
    def wavenumber_cm(self) -> np.ndarray:
        """(3n,) cm^-1, omega / (2 pi c); negative for imaginary modes."""
        return omega_to_wavenumber(self.omega)

    @property
    def frequency_thz(self) -> np.ndarray:
        """(3n,) THz (1/ps), omega / (2 pi); negative for imaginary modes."""
        return self.omega * THZ_PER_RAD_PS

    @property
    def internal_omega(self) -> np.ndarray:
        """omega (rad/ps) of the modes that are not rigid-body motions, ascending."""
        return self.omega[~self.rigid_body]

    @property
    def rigid_body_residual(self) -> np.ndarray:
        """omega (rad/ps) of the rigid-body modes: 0 at a stationary point with an exact Hessian."""
        return self.omega[self.rigid_body]

    @property
    def displacements(self) -> np.ndarray:
        """(3n, n, 3): Cartesian displacement pattern (nm per unit mass-weighted amplitude) of each mode,
        vectors / sqrt(m)."""
        d = self.vectors / np.sqrt(np.repeat(self.masses, 3))[:, None]
        return d.T.reshape(-1, len(self.masses), 3)

    def summary(self, zero_tol: float = 1e-9) -> dict:
        """JSON-able numbers: counts, residual rigid-body omega (rad/ps), lowest internal and highest omega.

        Internal modes with |omega^2| <= zero_tol * max |omega^2| count as zero modes (round-off of a Hessian
        in float64 is ~1e-13 relative), not as imaginary ones.
        """
        internal = self.internal_omega
        lam = self.eigenvalues[~self.rigid_body]
        small = np.abs(lam) <= zero_tol * np.max(np.abs(self.eigenvalues))
        return {"n_modes": int(len(self.omega)), "n_rigid": int(self.n_rigid),
                "rigid_body_max_abs_omega": float(np.max(np.abs(self.rigid_body_residual), initial=0.0)),
                "rigid_body_min_overlap": float(np.min(self.rigid_body_overlap[self.rigid_body], initial=1.0)),
                "n_zero_internal": int(np.sum(small)),
                "n_imaginary_internal": int(np.sum((lam < 0) & ~small)),
                "lowest_internal_omega": float(internal[0]) if len(internal) else None,
                "highest_omega": float(self.omega[-1]), "units": "rad/ps"}


def _align_degenerate(eigenvalues, vectors, basis, tol):
    """Rotate the eigenvectors of each (near-)degenerate group so that its first columns span the group's
    overlap with the rigid-body ``basis``: the singular vectors of basis^T V_group."""
    lam = eigenvalues
    scale = max(np.max(np.abs(lam)), 1e-300)
    v = vectors.copy()
    start = 0
    for k in range(1, len(lam) + 1):
        if k == len(lam) or lam[k] - lam[k - 1] > tol * scale:
            if k - start > 1:
                group = v[:, start:k]
                _, _, wt = np.linalg.svd(basis.T @ group)
                v[:, start:k] = group @ wt.T
            start = k
    return v


def modes_from_hessian(hessian, positions, masses, periodic: bool = False, degeneracy_tol: float = 1e-9,
                       linear_tol: float = 1e-8) -> NormalModes:
    """Normal modes from a Hessian (3n, 3n) kJ/mol/nm^2 at positions (n, 3) nm with masses (n,) amu.

    periodic: the Hessian is that of a periodic cell (only translations are rigid-body modes).
    degeneracy_tol: eigenvalues closer than this times the largest |eigenvalue| form one degenerate group.
    """
    x = _positions(positions)
    hm = mass_weighted_hessian(hessian, masses)
    if hm.shape[0] != 3 * len(x):
        raise EnpcgError(f"hessian is {hm.shape[0]} x {hm.shape[0]} but positions hold {len(x)} particles "
                         f"(expected {3 * len(x)} rows)")
    m = _masses(masses, len(x))
    lam, vec = np.linalg.eigh(hm)
    basis = rigid_body_basis(x, m, periodic=periodic, linear_tol=linear_tol)
    vec = _align_degenerate(lam, vec, basis, degeneracy_tol)
    overlap = np.sum((basis.T @ vec) ** 2, axis=0)
    k = basis.shape[1]
    rigid = np.zeros(len(lam), dtype=bool)
    rigid[np.argsort(-overlap, kind="stable")[:k]] = True
    return NormalModes(eigenvalues=lam, omega=signed_sqrt(lam), vectors=vec, masses=m, rigid_body=rigid,
                       rigid_body_overlap=overlap, n_rigid=k)


def normal_modes(potential, positions, box=None, hessian=None, degeneracy_tol: float = 1e-9,
                 linear_tol: float = 1e-8) -> NormalModes:
    """Normal modes of ``potential`` (:class:`~enpcg.properties.potential.Potential`) at positions (n, 3) nm.

    box : (3, 3) nm rows (a periodic cell: 3 rigid-body translations) or None (isolated: 3 translations and
    3 rotations, 2 for a linear molecule). hessian : optional precomputed (3n, 3n) kJ/mol/nm^2 (else
    ``potential.hessian``; autograd for torch, finite differences for OpenMM). Masses are the potential's.
    Returns :class:`NormalModes` (omega in rad/ps, ``wavenumber_cm`` in cm^-1).
    """
    x = _positions(positions, potential.n_particles)
    b = _box(box)
    h = potential.hessian(x, b) if hessian is None else hessian
    return modes_from_hessian(h, x, potential.masses, periodic=b is not None, degeneracy_tol=degeneracy_tol,
                              linear_tol=linear_tol)


_UNITS = {"rad/ps": (1.0, "$\\omega$ (rad/ps)"), "cm-1": (CM_PER_RAD_PS, "wavenumber (cm$^{-1}$)"),
          "THz": (THZ_PER_RAD_PS, "frequency (THz)")}


def _unit(unit: str):
    if unit not in _UNITS:
        raise EnpcgError(f"unit must be one of {list(_UNITS)}; received {unit!r}")
    return _UNITS[unit]


def density_of_states(omega, bins=60, range=None, unit: str = "rad/ps", normalize: bool = True):
    """Histogram density of states of frequencies ``omega`` (rad/ps; negative = imaginary).

    unit: "rad/ps", "cm-1" or "THz" for the axis; bins, range: as numpy.histogram, in that unit.
    Returns (centres, density, edges): density in modes per unit (integrates to the number of modes) or, with
    ``normalize``, to 1.
    """
    factor, _ = _unit(unit)
    w = np.asarray(omega, dtype=np.float64).reshape(-1) * factor
    if w.size == 0:
        raise EnpcgError("density_of_states: no frequencies given")
    counts, edges = np.histogram(w, bins=bins, range=range)
    dens = counts / np.diff(edges)
    if normalize:
        dens = dens / w.size
    return 0.5 * (edges[1:] + edges[:-1]), dens, edges


def plot_mode_spectrum(modes, path, bins: int = 60, unit: str = "cm-1", title: Optional[str] = None,
                       include_rigid: bool = False, zero_tol: float = 1e-9) -> Path:
    """Density-of-states histogram of normal modes, written atomically as PNG.

    modes : :class:`NormalModes` (rigid-body modes left out unless ``include_rigid``), or an array of omega
    (rad/ps, e.g. phonon frequencies on a k-mesh). Imaginary modes appear at negative frequencies in red.
    unit : "cm-1", "THz" or "rad/ps". The title counts as imaginary the modes with omega < 0 and
    omega^2 > zero_tol max omega^2 (smaller ones are zero modes up to round-off). Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..fileio import atomic_path

    factor, label = _unit(unit)
    if isinstance(modes, NormalModes):
        w = modes.omega if include_rigid else modes.internal_omega
        note = f"{len(w)} modes" + ("" if include_rigid else f" ({modes.n_rigid} rigid-body modes left out)")
    else:
        w = np.asarray(modes, dtype=np.float64).reshape(-1)
        note = f"{len(w)} modes"
    if len(w) == 0:
        raise EnpcgError("plot_mode_spectrum: no modes to plot")
    centres, dens, edges = density_of_states(w, bins=bins, unit=unit, normalize=True)
    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = ["tab:red" if c < 0 else "tab:blue" for c in centres]
    ax.bar(centres, dens, width=np.diff(edges), color=colours, align="center")
    # negative omega of round-off size (acoustic modes at Gamma, zero modes) are not imaginary modes
    n_imag = int(np.sum((w < 0) & (w * w > zero_tol * np.max(w * w))))
    ax.set(xlabel=label + (" (negative: imaginary)" if n_imag else ""), ylabel="density of states (normalised)",
           title=title or f"mode spectrum: {note}" + (f", {n_imag} imaginary" if n_imag else ""))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
