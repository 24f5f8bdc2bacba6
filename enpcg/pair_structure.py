"""Static pair structure of periodic trajectories: partial g_ab(r) and partial S_ab(q).

Plain functions over :class:`mdtraj.Trajectory` objects, arrays in and arrays out, in nm (r), 1/nm (q) and ps.

Conventions
-----------
* ``partial_rdf`` counts every pair (i in a, j in b, i != j) once per frame and normalises by the ideal gas
  of exactly those pairs, so g_ab(r) -> 1 for an ideal gas both for a == b (N_a (N_a - 1) / 2 unordered
  pairs) and for disjoint or partly overlapping sets.
* ``structure_factor`` is computed directly from positions, not from g(r): on the reciprocal lattice
  q = 2 pi (n_x / L_x, n_y / L_y, n_z / L_z) of the orthorhombic box (n integer, q != 0), with the
  Ashcroft-Langreth normalisation S_ab(q) = Re < rho_a(q) rho_b(-q) > / sqrt(N_a N_b),
  rho_a(q) = sum_{j in a} exp(i q . r_j). For a == b this is |rho(q)|^2 / N, which is 1 for an ideal gas and
  N at a Bragg peak of a perfect crystal; for disjoint uncorrelated sets it is 0. Values are averaged over the
  vectors of each |q| shell and over frames.
* Reduced Lennard-Jones units map onto OpenMM's exactly with sigma = 1 nm, epsilon = 1 kJ/mol and m = 1 amu
  (tau = 1 ps; T[K] = T* / 0.0083144626, the constant being ``openmm.unit.MOLAR_GAS_CONSTANT_R`` in
  kJ/mol/K; 1 kJ/mol/nm^3 = 16.6054 bar), so r in nm is r / sigma and q in 1/nm is q sigma.
"""
from __future__ import annotations

import math

import numpy as np

from .dynamics import _check_indices, _orthorhombic_lengths
from .errors import EnpcgError

# Distances held in memory at once by partial_rdf (frames x pairs).
_RDF_CHUNK = 20_000_000
# Phase-matrix entries (particles x q vectors) held in memory at once by structure_factor.
_SQ_CHUNK = 4_000_000


def _indices(idx, n_atoms, name):
    a = _check_indices(idx, n_atoms, name)
    if len(np.unique(a)) != len(a):
        raise EnpcgError(f"{name} contains repeated particle indices; you supplied {len(a)} indices of which "
                         f"{len(np.unique(a))} are distinct. Fix: pass each particle once (np.unique)")
    return a


def _box_widths(traj):
    """(F, 3) nm perpendicular widths of the box; EnpcgError without a unit cell."""
    if traj.unitcell_vectors is None:
        raise EnpcgError("traj has no unit cell; pair structure needs a periodic box. Fix: load the trajectory "
                         "with a topology or file that carries box vectors (e.g. a PDB with CRYST1, a DCD with "
                         "a box)")
    box = np.asarray(traj.unitcell_vectors, dtype=np.float64)
    vol = np.abs(np.linalg.det(box))
    cross = np.stack([np.cross(box[:, 1], box[:, 2]), np.cross(box[:, 2], box[:, 0]),
                      np.cross(box[:, 0], box[:, 1])], axis=1)
    return vol[:, None] / np.linalg.norm(cross, axis=2)


def partial_rdf(traj, indices_a, indices_b, *, r_max=None, bin_width=0.01):
    """Partial radial distribution function g_ab(r) of a periodic trajectory (minimum image).

    Parameters
    ----------
    traj : mdtraj.Trajectory, with a unit cell
    indices_a, indices_b : array of int, particles of the two sets (the same array for a == b); self pairs
        (i, i) are excluded and, when the sets are identical, each unordered pair counts once
    r_max : float, nm, optional; default half the smallest box width rounded down to a whole number of bins
        (beyond half the width minimum-image distances undercount)
    bin_width : float, nm

    Returns
    -------
    r : np.ndarray, shape=(n_bins,), nm, bin centres
    g : np.ndarray, shape=(n_bins,), dimensionless, -> 1 for an ideal gas
    """
    import mdtraj as md

    a = _indices(indices_a, traj.n_atoms, "indices_a")
    b = _indices(indices_b, traj.n_atoms, "indices_b")
    half = float(_box_widths(traj).min() / 2.0)
    if not (np.isfinite(bin_width) and bin_width > 0):
        raise EnpcgError(f"bin_width must be a positive length in nm; you supplied {bin_width!r}")
    if r_max is None:
        r_max = bin_width * math.floor(half / bin_width * (1 + 1e-9))
        if r_max <= 0:
            raise EnpcgError(f"bin_width {bin_width:.4g} nm exceeds half the smallest box width ({half:.4g} nm). "
                             "Fix: use a smaller bin_width")
    r_max = float(r_max)
    if not 0 < r_max <= half * (1 + 1e-6):
        raise EnpcgError(f"r_max must lie in (0, {half:.6g}] nm (half the smallest box width, beyond which "
                         f"minimum-image distances undercount); you supplied {r_max!r}. Fix: lower r_max or "
                         "analyse a larger box")
    n_bins = max(1, int(round(r_max / bin_width)))
    same = len(a) == len(b) and np.array_equal(np.sort(a), np.sort(b))
    inv_vol = 1.0 / np.asarray(traj.unitcell_volumes, dtype=np.float64)

    # mdtraj normalises each call by its own pair count and sum of 1/V; weighting each call by exactly that
    # recombines the chunks into the RDF of all pairs over all frames.
    g_sum = np.zeros(n_bins)
    w_sum = 0.0
    r = None
    rows = max(1, 2_000_000 // len(b))
    for start in range(0, len(a), rows):
        ia, ib = np.meshgrid(a[start:start + rows], b, indexing="ij")
        keep = ia < ib if same else ia != ib
        if not keep.any():
            continue
        pairs = np.stack([ia[keep], ib[keep]], axis=1)
        n_frames_chunk = max(1, _RDF_CHUNK // len(pairs))
        for f0 in range(0, traj.n_frames, n_frames_chunk):
            sub = traj[f0:f0 + n_frames_chunk]
            r, g = md.compute_rdf(sub, pairs, r_range=(0.0, r_max), n_bins=n_bins, periodic=True)
            w = len(pairs) * inv_vol[f0:f0 + n_frames_chunk].sum()
            g_sum += w * g
            w_sum += w
    if r is None:
        raise EnpcgError("indices_a and indices_b form no pair of distinct particles (a single particle?). "
                         "Fix: pass sets with at least two particles in total")
    return r, g_sum / w_sum


def _orthorhombic(traj):
    """(F, 3) box edges in nm; EnpcgError for no box or a triclinic box."""
    _box_widths(traj)  # raises without a box
    return _orthorhombic_lengths(traj, "structure_factor", "compute S(q) by Fourier transform of partial_rdf, or "
                                 "simulate in an orthorhombic box")


def reciprocal_vectors(lengths, q_max):
    """Integer reciprocal-lattice triples n of an orthorhombic box with 0 < |q| <= q_max, one of each +-q pair.

    Parameters
    ----------
    lengths : (3,) box edges, nm
    q_max : float, 1/nm

    Returns
    -------
    n : np.ndarray of int, shape=(m, 3); q = 2 pi n / lengths
    qnorm : np.ndarray, shape=(m,), 1/nm
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    nmax = np.floor(q_max * lengths / (2 * np.pi)).astype(np.int64)
    axes = [np.arange(-k, k + 1) for k in nmax]
    n = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    # S(q) = S(-q) for real densities: keep one vector of each pair (the half space "first nonzero > 0").
    half = (n[:, 2] > 0) | ((n[:, 2] == 0) & (n[:, 1] > 0)) | ((n[:, 2] == 0) & (n[:, 1] == 0) & (n[:, 0] > 0))
    n = n[half]
    qnorm = np.linalg.norm(2 * np.pi * n / lengths, axis=1)
    keep = qnorm <= q_max * (1 + 1e-12)
    return n[keep], qnorm[keep]


def structure_factor(traj, indices_a=None, indices_b=None, *, q_max=None, shell_width=None,
                     max_vectors_per_shell=32, max_frames=100, seed=0, progress=True):
    """Partial static structure factor S_ab(q) computed directly from positions (Ashcroft-Langreth).

    S_ab(q) = Re < rho_a(q) rho_b(-q) > / sqrt(N_a N_b) over the reciprocal-lattice vectors
    q = 2 pi n / L of the orthorhombic box (q != 0), averaged over the vectors in each |q| shell and over
    frames. For a == b it is |rho_a(q)|^2 / N_a.

    Cost grows as particles x vectors x frames, so two caps apply: at most ``max_vectors_per_shell``
    vectors per shell, a random subset drawn with a fixed ``seed`` (an isotropic system's shell average
    converges with a few tens of vectors; the cap only bites at large q, where shells hold hundreds); and
    at most ``max_frames`` frames, evenly spread over the trajectory (static structure needs fewer frames
    than dynamics). A 1000-particle, 100-frame S(q) up to the default q_max takes a few seconds on one
    core. Vectors are the integer triples n, fixed over the run; when the box fluctuates (NPT) each frame
    uses its own 2 pi n / L and shells are assigned with the mean box.

    Parameters
    ----------
    traj : mdtraj.Trajectory, orthorhombic unit cell
    indices_a, indices_b : array of int, optional; default all particles; indices_b defaults to indices_a
    q_max : float, 1/nm, optional; default 3 x 2 pi / d with d = (V / N)^(1/3) the mean spacing of all
        particles, which covers the first two or three peaks of a dense liquid
    shell_width : float, 1/nm, optional; default pi / L_max (half the reciprocal-lattice spacing of the
        longest edge, so neighbouring lattice shells are rarely merged at low q), shells centred on multiples
        of it; empty shells are dropped. ``shell_width=0`` gives exact shells: one per distinct |q|
    max_vectors_per_shell : int, cap on vectors per shell (random subset)
    max_frames : int or None, cap on frames used (None: all)
    seed : int, seed of the vector subsets
    progress : bool, tqdm bar on a terminal

    Returns
    -------
    q : np.ndarray, shape=(n_shells,), 1/nm, mean |q| of the vectors used in each non-empty shell
    s : np.ndarray, shape=(n_shells,), dimensionless
    """
    from tqdm.auto import tqdm

    a = _indices(indices_a, traj.n_atoms, "indices_a")
    b = a if indices_b is None else _indices(indices_b, traj.n_atoms, "indices_b")
    same = len(a) == len(b) and np.array_equal(a, b)
    lengths = _orthorhombic(traj)
    mean_len = lengths.mean(axis=0)
    if q_max is None:
        spacing = (np.prod(mean_len) / traj.n_atoms) ** (1.0 / 3.0)
        q_max = 3.0 * 2 * np.pi / spacing
    q_max = float(q_max)
    q_min_lattice = 2 * np.pi / mean_len.max()
    if not (np.isfinite(q_max) and q_max >= q_min_lattice):
        raise EnpcgError(f"q_max must be at least the smallest reciprocal-lattice wavenumber 2 pi / L_max = "
                         f"{q_min_lattice:.4g} 1/nm; you supplied {q_max!r}. Fix: raise q_max or use a larger box")
    if shell_width is None:
        shell_width = 0.5 * q_min_lattice
    shell_width = float(shell_width)
    if not (np.isfinite(shell_width) and shell_width >= 0):
        raise EnpcgError(f"shell_width must be >= 0 (1/nm; 0 for exact shells); you supplied {shell_width!r}")
    if int(max_vectors_per_shell) < 1:
        raise EnpcgError(f"max_vectors_per_shell must be >= 1; you supplied {max_vectors_per_shell!r}")
    if max_frames is not None and int(max_frames) < 1:
        raise EnpcgError(f"max_frames must be >= 1 or None (all frames); you supplied {max_frames!r}")

    n, qnorm = reciprocal_vectors(mean_len, q_max)
    if shell_width == 0:
        # exact shells: distinct |q| up to rounding
        keys = np.round(qnorm / q_min_lattice, 9)
        _, shell = np.unique(keys, return_inverse=True)
    else:
        shell = np.round(qnorm / shell_width).astype(np.int64)
        _, shell = np.unique(shell, return_inverse=True)
    rng = np.random.default_rng(seed)
    chosen = []
    for k in range(shell.max() + 1):
        members = np.flatnonzero(shell == k)
        if len(members) > max_vectors_per_shell:
            members = np.sort(rng.choice(members, size=int(max_vectors_per_shell), replace=False))
        chosen.append(members)
    use = np.concatenate(chosen)
    n, qnorm, shell = n[use], qnorm[use], shell[use]
    n_shells = shell.max() + 1

    frames = np.arange(traj.n_frames)
    if max_frames is not None and traj.n_frames > int(max_frames):
        frames = np.unique(np.round(np.linspace(0, traj.n_frames - 1, int(max_frames))).astype(np.int64))
    xyz = traj.xyz
    s_vec = np.zeros(len(n))
    # exp(i q . r) factorises over the axes: exp(i 2 pi n_x x / L_x) exp(i 2 pi n_y y / L_y) exp(...z...).
    # Per frame, the (n_x, n_y) factors of the vectors in use form B (particles x pairs) and one complex
    # matrix product B^T E_z gives rho for every (n_x, n_y, n_z) at once: ~5x faster than cos/sin of q . r.
    nmax = np.abs(n).max(axis=0)
    pairs, pair_of = np.unique(n[:, :2], axis=0, return_inverse=True)
    pair_of = pair_of.ravel()
    col_x, col_y, col_z = pairs[:, 0] + nmax[0], pairs[:, 1] + nmax[1], n[:, 2]
    rows = max(1, _SQ_CHUNK // max(len(pairs), 1))

    def rho(pos, box):
        """Real and imaginary parts of sum_j exp(i q . r_j) for every q vector, chunked over particles."""
        total = np.zeros((len(pairs), nmax[2] + 1), dtype=np.complex128)
        for s in range(0, len(pos), rows):
            p = pos[s:s + rows]
            e = [np.exp(1j * (2 * np.pi / box[d]) * np.outer(p[:, d], np.arange(nmax[d] + 1))) for d in range(3)]
            ex = np.concatenate([np.conj(e[0][:, :0:-1]), e[0]], axis=1)  # columns n_x = -nmax .. nmax
            ey = np.concatenate([np.conj(e[1][:, :0:-1]), e[1]], axis=1)
            total += (ex[:, col_x] * ey[:, col_y]).T @ e[2]
        r = total[pair_of, col_z]
        return r.real, r.imag

    for f in tqdm(frames, desc="S(q)", disable=None if progress else True, leave=False):
        pos = np.asarray(xyz[f], dtype=np.float64)
        ra, ia = rho(pos[a], lengths[f])
        if same:
            s_vec += ra * ra + ia * ia
        else:
            rb, ib = rho(pos[b], lengths[f])
            s_vec += ra * rb + ia * ib  # Re(rho_a conj(rho_b))
    s_vec /= len(frames) * math.sqrt(len(a) * len(b))
    counts = np.bincount(shell, minlength=n_shells)
    q_out = np.bincount(shell, weights=qnorm, minlength=n_shells) / counts
    s_out = np.bincount(shell, weights=s_vec, minlength=n_shells) / counts
    order = np.argsort(q_out)
    return q_out[order], s_out[order]


def first_peak(q, s, smooth=3):
    """Wavenumber of the main peak of S(q): the default q for F_s(q, t).

    The maximum of S smoothed by a moving average of ``smooth`` points locates the peak (so a single noisy
    shell does not win); the result is the q of the largest raw value within that window.

    Parameters
    ----------
    q : np.ndarray, shape=(n,), 1/nm, increasing
    s : np.ndarray, shape=(n,)
    smooth : int, moving-average width in points

    Returns
    -------
    float, 1/nm
    """
    q = np.asarray(q, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    if q.ndim != 1 or q.shape != s.shape or len(q) < 1:
        raise EnpcgError(f"q and s must be 1-D arrays of the same non-zero length; you supplied shapes {q.shape} "
                         f"and {s.shape}. Fix: pass the two arrays from structure_factor")
    width = max(1, int(smooth))
    pad = width // 2
    sp = np.pad(s, (pad, width - 1 - pad), mode="edge")
    ss = np.convolve(sp, np.ones(width) / width, mode="valid")
    k = int(np.nanargmax(ss))
    lo, hi = max(k - pad, 0), min(k + pad + 1, len(s))
    return float(q[lo + int(np.nanargmax(s[lo:hi]))])
