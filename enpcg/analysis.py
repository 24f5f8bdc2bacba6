"""Structural analysis of CG trajectories and the comparison report.

Plain functions over :class:`mdtraj.Trajectory` objects, arrays in and arrays out, in mdtraj's units: nm and
ps; angles in radians in every array and in metrics.json (degrees appear only in plot axis labels). Any
trajectory mdtraj can read can be analysed; the functions that need bonded lists or molecule membership take
an :class:`enpcg.topology.CGTopology`.

Typical use::

    ref = md.load("mapped.dcd", top="cg.pdb")
    results = {name: compare_structure(ref, md.load(f"{name}.dcd", top="cg.pdb"), topology)
               for name in ("priors", "neural")}
    criteria = {"neural": structure_criteria(results["neural"], results["priors"])}
    plots = plot_comparison(list(results.values()), "out", labels=list(results))
    write_report(results, plots, "out", "Polyethylene CG", criteria=criteria)
"""
from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path

import numpy as np

from .errors import EnpcgError
from .fileio import atomic_path, atomic_write

LN2 = math.log(2.0)
BONDED_KINDS = ("bonds", "angles", "dihedrals")
SHAPE_KINDS = ("rg", "end_to_end")
# Thresholds of the project's structural acceptance criteria (see structure_criteria).
JS_FLOOR = 0.02                # nats
JS_SELF_FACTOR = 3.0           # x the reference's half-split JS
PEAK_POSITION_TOL = 0.02       # nm
PEAK_HEIGHT_REL_TOL = 0.10     # fraction of the reference peak height
IAE_PRIORS_FRACTION = 0.5      # x the priors-only model's IAE


# --------------------------------------------------------------------------------------- trajectories
def trajectory_from_arrays(positions, box, topology, time=None):
    """Build an mdtraj trajectory from arrays and a CG topology.

    Parameters
    ----------
    positions : np.ndarray, shape=(n_frames, n_beads, 3), nm
    box : np.ndarray, shape=(n_frames, 3, 3) or (3, 3), nm, box vectors as rows; None for no box
    topology : CGTopology, gives bead names, residues (one per molecule) and bonds
    time : np.ndarray, shape=(n_frames,), ps, optional (default 0, 1, 2, ...)

    Returns
    -------
    mdtraj.Trajectory
    """
    import mdtraj as md

    pos = np.asarray(positions, dtype=np.float32)  # mdtraj stores float32
    if pos.ndim == 2:
        pos = pos[None]
    if pos.ndim != 3 or pos.shape[1:] != (topology.n_beads, 3):
        raise EnpcgError(f"positions must be shape (n_frames, {topology.n_beads}, 3) in nm; "
                         f"you supplied {np.shape(positions)}")
    top = md.Topology.from_openmm(topology.to_openmm_topology())
    traj = md.Trajectory(pos, top, time=None if time is None else np.asarray(time, dtype=np.float64))
    if box is not None:
        b = np.asarray(box, dtype=np.float64)
        if b.shape == (3, 3):
            b = np.broadcast_to(b, (len(pos), 3, 3))
        if b.shape != (len(pos), 3, 3):
            raise EnpcgError(f"box must be shape ({len(pos)}, 3, 3) or (3, 3) in nm; you supplied {np.shape(box)}")
        traj.unitcell_vectors = np.array(b, dtype=np.float32)  # mdtraj stores float32
    return traj


def _check_traj(traj, topology, name="trajectory"):
    if traj.n_atoms != topology.n_beads:
        raise EnpcgError(f"{name} has {traj.n_atoms} particles but the CG topology has {topology.n_beads} beads; "
                         "load the trajectory with the CG topology (cg.pdb) it was written with")


def _box(traj):
    """(F, 3, 3) nm box rows, or None when the trajectory has no unit cell."""
    return None if traj.unitcell_vectors is None else np.asarray(traj.unitcell_vectors, dtype=np.float64)


# --------------------------------------------------------------------------------------- bonded terms
def _terms(terms, width, name):
    arr = np.asarray(terms if terms is not None and len(terms) else np.zeros((0, width)), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != width:
        raise EnpcgError(f"{name} must be shape (n, {width}) bead indices; you supplied {arr.shape}")
    return arr


def bond_lengths(traj, bonds):
    """Bond lengths under the minimum image convention.

    Parameters
    ----------
    traj : mdtraj.Trajectory
    bonds : array-like, shape=(n_bonds, 2), int bead indices

    Returns
    -------
    np.ndarray, shape=(n_frames, n_bonds), float, nm
    """
    import mdtraj as md

    b = _terms(bonds, 2, "bonds")
    if not len(b):
        return np.zeros((traj.n_frames, 0))
    return md.compute_distances(traj, b, periodic=True).astype(np.float64)


def bond_angles(traj, angles):
    """Bond angles i-j-k (vertex j) under the minimum image convention.

    Parameters
    ----------
    traj : mdtraj.Trajectory
    angles : array-like, shape=(n_angles, 3), int bead indices

    Returns
    -------
    np.ndarray, shape=(n_frames, n_angles), float, radians in [0, pi]
    """
    import mdtraj as md

    a = _terms(angles, 3, "angles")
    if not len(a):
        return np.zeros((traj.n_frames, 0))
    return md.compute_angles(traj, a, periodic=True).astype(np.float64)


def dihedral_angles(traj, dihedrals):
    """Dihedral angles i-j-k-l (IUPAC sign) under the minimum image convention.

    Parameters
    ----------
    traj : mdtraj.Trajectory
    dihedrals : array-like, shape=(n_dihedrals, 4), int bead indices

    Returns
    -------
    np.ndarray, shape=(n_frames, n_dihedrals), float, radians in [-pi, pi]
    """
    import mdtraj as md

    d = _terms(dihedrals, 4, "dihedrals")
    if not len(d):
        return np.zeros((traj.n_frames, 0))
    return md.compute_dihedrals(traj, d, periodic=True).astype(np.float64)


# --------------------------------------------------------------------------------------- RDF
def _box_widths(traj):
    """(F, 3) nm perpendicular widths of the box (distance between opposite faces)."""
    box = _box(traj)
    vol = np.abs(np.linalg.det(box))
    cross = np.stack([np.cross(box[:, 1], box[:, 2]), np.cross(box[:, 2], box[:, 0]),
                      np.cross(box[:, 0], box[:, 1])], axis=1)
    return vol[:, None] / np.linalg.norm(cross, axis=2)


def max_rdf_range(*trajs):
    """Largest RDF radius, nm, valid under the minimum image in every frame: half the smallest box width."""
    for t in trajs:
        if t.unitcell_vectors is None:
            raise EnpcgError("RDFs need a periodic box; a trajectory has no unit cell. Load it with a topology "
                             "or file that carries box vectors (e.g. cg.pdb with CRYST1, or a DCD with a box)")
    return float(min(_box_widths(t).min() for t in trajs) / 2.0)


def _intermolecular_pair_blocks(idx_a, idx_b, mol, same, max_pairs):
    """Yield (k, 2) int arrays of pairs (a, b) in different molecules, at most about max_pairs per block.

    same: idx_a is idx_b and each unordered pair is yielded once (a < b).
    """
    rows = max(1, int(max_pairs) // max(len(idx_b), 1))
    for start in range(0, len(idx_a), rows):
        a = idx_a[start:start + rows]
        ia, ib = np.meshgrid(a, idx_b, indexing="ij")
        keep = mol[ia] != mol[ib]
        if same:
            keep &= ia < ib
        if keep.any():
            yield np.stack([ia[keep], ib[keep]], axis=1)


def intermolecular_rdf(traj, topology, type_a, type_b, r_range=None, n_bins=None, bin_width=0.005,
                       chunk_elements=20_000_000):
    """Radial distribution function between beads of two types, counting only pairs in different molecules.

    Normalised (as :func:`mdtraj.compute_rdf`) by the ideal gas of the counted intermolecular pairs, so
    g(r) -> 1 at large r and bonded neighbours leave no peak.

    Parameters
    ----------
    traj : mdtraj.Trajectory, with a unit cell
    topology : CGTopology, bead types and molecule membership
    type_a, type_b : str, bead type names
    r_range : (float, float), nm, optional; default (0, half the smallest box width)
    n_bins : int, optional; default (r_range width) / bin_width
    bin_width : float, nm, used when n_bins is None
    chunk_elements : int, at most this many distances are held in memory at once (frames x pairs)

    Returns
    -------
    r : np.ndarray, shape=(n_bins,), nm, bin centres
    g : np.ndarray, shape=(n_bins,), dimensionless
    """
    import mdtraj as md

    _check_traj(traj, topology)
    types = np.asarray(topology.bead_types)
    for t in (type_a, type_b):
        if t not in set(topology.bead_types):
            raise EnpcgError(f"bead type {t!r} is not in the CG topology; types are {topology.type_names()}")
    r_half = max_rdf_range(traj)
    if r_range is None:
        r_range = (0.0, r_half)
    r_range = (float(r_range[0]), float(r_range[1]))
    if not 0.0 <= r_range[0] < r_range[1]:
        raise EnpcgError(f"r_range must satisfy 0 <= r_min < r_max (nm); you supplied {r_range}")
    if r_range[1] > r_half * (1 + 1e-6):
        raise EnpcgError(f"r_range upper limit {r_range[1]:.4g} nm exceeds half the smallest box width "
                         f"({r_half:.4g} nm), beyond which minimum-image distances undercount; lower it")
    if n_bins is None:
        n_bins = max(1, int(round((r_range[1] - r_range[0]) / bin_width)))
    idx_a = np.flatnonzero(types == type_a)
    idx_b = np.flatnonzero(types == type_b)
    same = type_a == type_b
    inv_vol = 1.0 / np.asarray(traj.unitcell_volumes, dtype=np.float64)

    # mdtraj normalises each call by its own pair count and sum of 1/V; weighting each call by exactly that
    # recombines the chunks into the RDF of all pairs over all frames.
    g_sum = np.zeros(n_bins)
    w_sum = 0.0
    r = None
    # pair blocks of at most 2e6 keep the int64 index grids small; frames fill the rest of chunk_elements
    max_pairs = min(int(chunk_elements), 2_000_000)
    for pairs in _intermolecular_pair_blocks(idx_a, idx_b, topology.molecule_index, same, max_pairs):
        n_frames_chunk = max(1, int(chunk_elements) // len(pairs))
        for f0 in range(0, traj.n_frames, n_frames_chunk):
            sub = traj[f0:f0 + n_frames_chunk]
            r, g = md.compute_rdf(sub, pairs, r_range=r_range, n_bins=n_bins, periodic=True)
            w = len(pairs) * inv_vol[f0:f0 + n_frames_chunk].sum()
            g_sum += w * g
            w_sum += w
    if r is None:
        raise EnpcgError(f"no intermolecular {type_a}-{type_b} pairs in this topology (single molecule?)")
    return r, g_sum / w_sum


def _moving_average(y, width):
    if width <= 1:
        return y.copy()
    pad = width // 2
    yp = np.pad(y, (pad, width - 1 - pad), mode="edge")
    return np.convolve(yp, np.ones(width) / width, mode="valid")


def rdf_first_peak(r, g, smooth=3):
    """Position and height of the first-shell peak of an RDF.

    The first shell is the first run of (lightly smoothed) g > 1 that holds at least a tenth of the largest
    r^2-weighted excess int (g - 1) r^2 dr of any run, so noise spikes at small r or on the rising edge are
    skipped. The peak is the argmax of smoothed g in that run, refined by a least-squares parabola through the
    raw g of the five nearest bins.

    Parameters
    ----------
    r : np.ndarray, shape=(n_bins,), nm, increasing
    g : np.ndarray, shape=(n_bins,)
    smooth : int, moving-average width in bins used to locate the shell

    Returns
    -------
    position : float, nm (nan when g never exceeds 1)
    height : float, g at the peak (nan when g never exceeds 1)
    """
    r = np.asarray(r, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    if r.ndim != 1 or r.shape != g.shape or len(r) < 3:
        raise EnpcgError(f"r and g must be 1-D arrays of the same length >= 3; you supplied {r.shape} and {g.shape}")
    gs = _moving_average(g, int(smooth))
    above = gs > 1.0
    edges = np.flatnonzero(np.diff(np.concatenate([[0], above.astype(np.int8), [0]])))
    runs = list(zip(edges[::2], edges[1::2]))  # [start, stop) of each run above 1
    if not runs:
        return math.nan, math.nan
    excess = [np.sum((gs[a:b] - 1.0) * r[a:b] ** 2) for a, b in runs]
    big = max(excess)
    start, stop = next(run for run, e in zip(runs, excess) if e >= 0.1 * big)
    k = start + int(np.argmax(gs[start:stop]))
    pos, height = r[k], g[k]
    lo, hi = max(k - 2, 0), min(k + 3, len(r))
    if hi - lo >= 3:
        c = np.polyfit(r[lo:hi] - r[k], g[lo:hi], 2)
        if c[0] < 0:
            x = -c[1] / (2 * c[0])
            if r[lo] - r[k] <= x <= r[hi - 1] - r[k]:
                pos, height = r[k] + x, np.polyval(c, x)
    return float(pos), float(height)


def rdf_iae(r, g_ref, g_test):
    """Integrated absolute error int |g_test - g_ref| dr (trapezoid rule), nm.

    Parameters
    ----------
    r : np.ndarray, shape=(n_bins,), nm
    g_ref, g_test : np.ndarray, shape=(n_bins,), on the same r grid
    """
    r = np.asarray(r, dtype=np.float64)
    g_ref = np.asarray(g_ref, dtype=np.float64)
    g_test = np.asarray(g_test, dtype=np.float64)
    if not (r.ndim == 1 and g_ref.shape == r.shape and g_test.shape == r.shape):
        raise EnpcgError(f"g_ref, g_test and r must share one grid; shapes {np.shape(g_ref)}, "
                         f"{np.shape(g_test)}, {r.shape}. Compute both RDFs with the same r_range and n_bins")
    d = np.abs(g_test - g_ref)
    return float(np.sum(0.5 * (d[1:] + d[:-1]) * np.diff(r)))


# --------------------------------------------------------------------------------------- molecules
def _unwrap_plan(topology):
    """BFS levels of (child, parent) bead arrays that rebuild each molecule from its first bead.

    Beads not reached along bonds are attached to their molecule's first bead (minimum image).
    """
    n = topology.n_beads
    mol = topology.molecule_index
    adj = [[] for _ in range(n)]
    for i, j in topology.bonds:
        if mol[i] == mol[j]:
            adj[int(i)].append(int(j))
            adj[int(j)].append(int(i))
    depth = np.full(n, -1)
    parent = np.full(n, -1)
    roots = {}
    for i in range(n):
        roots.setdefault(int(mol[i]), i)
    for root in roots.values():
        depth[root] = 0
        q = deque([root])
        while q:
            u = q.popleft()
            for v in adj[u]:
                if depth[v] < 0:
                    depth[v], parent[v] = depth[u] + 1, u
                    q.append(v)
    loose = depth < 0
    parent[loose] = [roots[int(m)] for m in mol[loose]]
    depth[loose] = 1
    return [(np.flatnonzero(depth == d), parent[depth == d]) for d in range(1, int(depth.max()) + 1)]


def _minimum_image(d, box):
    """Wrap displacements d (F, k, 3) nm into the reduced triclinic box (F, 3, 3) nm rows (None: no wrap)."""
    if box is None:
        return d
    for axis in (2, 1, 0):  # c, then b, then a: valid for OpenMM's reduced (lower-triangular) boxes
        s = np.round(d[..., axis] / box[:, None, axis, axis])
        d = d - s[..., None] * box[:, None, axis, :]
    return d


def unwrapped_positions(traj, topology):
    """Positions with each molecule made whole by unwrapping along its bonds from its first bead.

    Works for molecules longer than the box; beads with no bonded path are placed at the minimum image
    relative to their molecule's first bead.

    Returns
    -------
    np.ndarray, shape=(n_frames, n_beads, 3), float64, nm
    """
    _check_traj(traj, topology)
    x = np.array(traj.xyz, dtype=np.float64)
    box = _box(traj)
    for child, par in _unwrap_plan(topology):
        x[:, child] = x[:, par] + _minimum_image(x[:, child] - x[:, par], box)
    return x


def radius_of_gyration(traj, topology):
    """Mass-weighted radius of gyration of each molecule, made whole along its bonds.

    Parameters
    ----------
    traj : mdtraj.Trajectory
    topology : CGTopology, masses (amu) and molecule membership

    Returns
    -------
    np.ndarray, shape=(n_frames, n_molecules), nm
    """
    x = unwrapped_positions(traj, topology)
    mol = topology.molecule_index
    m = topology.masses
    m_mol = np.bincount(mol, weights=m, minlength=topology.n_molecules)
    if np.any(m_mol <= 0):
        raise EnpcgError(f"CG topology masses: molecule {int(np.argmin(m_mol))} has zero total mass; "
                         "give every bead a positive mass (amu)")
    xt = np.moveaxis(x, 1, 0)  # (n, F, 3)
    com = np.zeros((topology.n_molecules,) + xt.shape[1:])
    np.add.at(com, mol, m[:, None, None] * xt)
    com /= m_mol[:, None, None]
    sq = np.zeros((topology.n_molecules, x.shape[0]))
    np.add.at(sq, mol, m[:, None] * np.sum((xt - com[mol]) ** 2, axis=2))
    return np.sqrt(sq / m_mol[:, None]).T


def end_to_end_distance(traj, topology):
    """Distance from the first to the last bead (by index) of each molecule, made whole along its bonds.

    Returns
    -------
    np.ndarray, shape=(n_frames, n_molecules), nm (0 for one-bead molecules)
    """
    x = unwrapped_positions(traj, topology)
    mol = topology.molecule_index
    idx = np.arange(topology.n_beads)
    first = np.full(topology.n_molecules, topology.n_beads)
    last = np.full(topology.n_molecules, -1)
    np.minimum.at(first, mol, idx)
    np.maximum.at(last, mol, idx)
    return np.linalg.norm(x[:, last] - x[:, first], axis=2)


# --------------------------------------------------------------------------------------- divergences
def js_histograms(reference, test, n_bins=100, periodic=False):
    """Histograms used by :func:`js_divergence`.

    Returns
    -------
    edges : np.ndarray, shape=(n_bins + 1,), same unit as the samples
    p, q : np.ndarray, shape=(n_bins,), counts of the reference and test samples inside the span
    """
    ref = np.asarray(reference, dtype=np.float64).ravel()
    tst = np.asarray(test, dtype=np.float64).ravel()
    ref, tst = ref[np.isfinite(ref)], tst[np.isfinite(tst)]
    if not len(ref):
        raise EnpcgError("js_divergence: the reference has no finite samples")
    if periodic:
        lo, hi = -math.pi, math.pi
        ref = np.mod(ref + math.pi, 2 * math.pi) - math.pi
        tst = np.mod(tst + math.pi, 2 * math.pi) - math.pi
    else:
        lo, hi = np.percentile(ref, [0.1, 99.9])
        if hi <= lo:  # a constant reference (e.g. a constrained bond): give the span a finite width
            eps = max(1e-9, 1e-6 * abs(lo))
            lo, hi = lo - eps, hi + eps
    edges = np.linspace(lo, hi, int(n_bins) + 1)
    p, _ = np.histogram(ref, bins=edges)
    q, _ = np.histogram(tst, bins=edges)
    return edges, p.astype(np.float64), q.astype(np.float64)


def _js_from_counts(p, q):
    if q.sum() == 0:
        return LN2  # all of the test's mass lies outside the reference's span: maximally different
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.sum(np.where(p > 0, p * np.log(p / m), 0.0))
        kl_q = np.sum(np.where(q > 0, q * np.log(q / m), 0.0))
    return float(min(max(0.5 * (kl_p + kl_q), 0.0), LN2))


def js_divergence(reference, test, n_bins=100, periodic=False):
    """Jensen-Shannon divergence between the histograms of two sample sets, in nats (0 <= JS <= ln 2).

    Both are histogrammed over ``n_bins`` equal bins spanning the reference's 0.1-99.9 percentiles; samples
    outside that span are dropped from both (if no test sample is left the result is ln 2). With
    ``periodic=True`` (dihedrals, radians) the bins span the full [-pi, pi] and samples are wrapped into it.

    Parameters
    ----------
    reference, test : array-like, any shape (flattened), same unit
    n_bins : int
    periodic : bool

    Returns
    -------
    float, nats
    """
    _, p, q = js_histograms(reference, test, n_bins, periodic)
    return _js_from_counts(p, q)


def _density(counts, edges):
    total = counts.sum()
    return counts / (total * np.diff(edges)) if total else np.zeros_like(counts)


def _halves(x):
    h = len(x) // 2
    return x[:h], x[h:]


def _distribution_metrics(ref, test, n_bins, periodic):
    """JS, reference self-JS, means and plot curves of per-frame sample arrays (F, k)."""
    edges, p, q = js_histograms(ref, test, n_bins, periodic)
    first, second = _halves(ref)
    self_js = js_divergence(first, second, n_bins, periodic) if len(first) and np.size(first) else math.nan
    flat_ref, tst = (np.ravel(np.asarray(x, dtype=np.float64)) for x in (ref, test))
    flat_ref, tst = flat_ref[np.isfinite(flat_ref)], tst[np.isfinite(tst)]
    if periodic:  # circular mean, radians
        mean_ref = float(np.angle(np.mean(np.exp(1j * flat_ref))))
        mean_test = float(np.angle(np.mean(np.exp(1j * tst)))) if len(tst) else math.nan
    else:
        mean_ref = float(np.mean(flat_ref))
        mean_test = float(np.mean(tst)) if len(tst) else math.nan
    metrics = {
        "js": _js_from_counts(p, q),
        "self_js": self_js,
        "mean_reference": mean_ref,
        "mean_test": mean_test,
        # share of finite test samples outside the reference's span; they are dropped from the JS
        "test_outside_fraction": float(1.0 - q.sum() / len(tst)) if len(tst) else 1.0,
    }
    # the plotted test histogram spans the test's own range, so a model that drifts away stays visible
    test_edges = edges if periodic or not len(tst) else js_histograms(tst, tst, n_bins)[0]
    q_plot = q if test_edges is edges else np.histogram(tst, bins=test_edges)[0].astype(np.float64)
    curves = {"edges": edges, "reference": _density(p, edges),
              "test_edges": test_edges, "test": _density(q_plot, test_edges)}
    return metrics, curves


# --------------------------------------------------------------------------------------- comparison
_BONDED_FUNCS = {"bonds": bond_lengths, "angles": bond_angles, "dihedrals": dihedral_angles}


def compare_structure(reference, test, topology, n_bins=100, rdf_range=None, rdf_bin_width=0.005):
    """Compare the structure of a test trajectory with a reference trajectory of the same CG system.

    Parameters
    ----------
    reference, test : mdtraj.Trajectory, same beads as ``topology``, with unit cells
    topology : CGTopology
    n_bins : int, bins of the distributions compared by JS divergence
    rdf_range : (float, float), nm, optional; default (0, half the smallest box width of both trajectories)
    rdf_bin_width : float, nm

    Returns
    -------
    dict with
        ``"metrics"``: JSON-able numbers (nm, radians, nats)::

            {"n_frames": {"reference": int, "test": int},
             "bonds" | "angles" | "dihedrals": {type_key: {"js", "self_js", "mean_reference", "mean_test",
                                                           "test_outside_fraction"}},
             "rdf": {"A-B": {"peak_position_reference", "peak_position_test", "peak_position_diff",
                             "peak_height_reference", "peak_height_test", "peak_height_rel_diff", "iae"}},
             "rg" | "end_to_end": {"js", "self_js", "mean_reference", "mean_test", "test_outside_fraction"}}

          ``self_js`` is the JS between the first and second half of the reference's frames; diffs are
          test minus reference (height relative to the reference height); rg/end_to_end are absent when no
          molecule has two or more beads.
        ``"curves"``: arrays for plots: the same keys, each bonded/shape entry ``{"edges", "reference",
        "test_edges", "test"}`` (probability densities per unit of the quantity; the reference over its
        0.1-99.9 percentile span, the test over its own) and each RDF ``{"r", "reference", "test"}``.
    """
    _check_traj(reference, topology, "reference trajectory")
    _check_traj(test, topology, "test trajectory")
    metrics = {"n_frames": {"reference": int(reference.n_frames), "test": int(test.n_frames)}}
    curves = {}
    for kind in BONDED_KINDS:
        terms = getattr(topology, kind)
        metrics[kind], curves[kind] = {}, {}
        if not len(terms):
            continue
        keys = np.asarray(topology.term_keys(kind))
        vals_ref = _BONDED_FUNCS[kind](reference, terms)
        vals_test = _BONDED_FUNCS[kind](test, terms)
        for key in sorted(set(keys)):
            sel = keys == key
            metrics[kind][key], curves[kind][key] = _distribution_metrics(
                vals_ref[:, sel], vals_test[:, sel], n_bins, periodic=kind == "dihedrals")

    if rdf_range is None:
        rdf_range = (0.0, max_rdf_range(reference, test))
    n_rdf_bins = max(1, int(round((rdf_range[1] - rdf_range[0]) / rdf_bin_width)))
    metrics["rdf"], curves["rdf"] = {}, {}
    for pair in topology.pair_type_names():
        a, b = pair.split("-", 1) if pair.count("-") == 1 else _split_pair(pair, topology)
        if not _has_intermolecular_pairs(topology, a, b):
            continue
        r, g_ref = intermolecular_rdf(reference, topology, a, b, rdf_range, n_rdf_bins)
        _, g_test = intermolecular_rdf(test, topology, a, b, rdf_range, n_rdf_bins)
        p_ref, h_ref = rdf_first_peak(r, g_ref)
        p_test, h_test = rdf_first_peak(r, g_test)
        metrics["rdf"][pair] = {
            "peak_position_reference": p_ref, "peak_position_test": p_test, "peak_position_diff": p_test - p_ref,
            "peak_height_reference": h_ref, "peak_height_test": h_test,
            "peak_height_rel_diff": (h_test - h_ref) / h_ref if h_ref else math.nan,
            "iae": rdf_iae(r, g_ref, g_test),
        }
        curves["rdf"][pair] = {"r": r, "reference": g_ref, "test": g_test}

    multi = np.bincount(topology.molecule_index, minlength=topology.n_molecules) >= 2
    if multi.any():
        for kind, func in (("rg", radius_of_gyration), ("end_to_end", end_to_end_distance)):
            metrics[kind], curves[kind] = _distribution_metrics(
                func(reference, topology)[:, multi], func(test, topology)[:, multi], n_bins, periodic=False)
    return {"metrics": metrics, "curves": curves}


def _has_intermolecular_pairs(topology, type_a, type_b):
    types = np.asarray(topology.bead_types)
    mols_a = set(topology.molecule_index[types == type_a].tolist())
    mols_b = set(topology.molecule_index[types == type_b].tolist())
    return bool(mols_a and mols_b and len(mols_a | mols_b) >= 2)


def _split_pair(pair, topology):
    """Split a pair key "A-B" whose type names themselves contain '-'."""
    names = topology.type_names()
    for a in names:
        for b in names:
            if f"{a}-{b}" == pair:
                return a, b
    raise EnpcgError(f"cannot split pair key {pair!r} into bead types {names}")


# --------------------------------------------------------------------------------------- criteria
def _metrics_of(results):
    return results["metrics"] if isinstance(results, dict) and "metrics" in results else results


def structure_criteria(metrics_test, metrics_priors=None):
    """The project's structural acceptance thresholds for one test model.

    * bonded JS (bonds, angles, dihedrals) at most max(0.02, 3 x the reference's half-split JS), nats;
    * RDF first peak within 0.02 nm in position and 10 % in height of the reference;
    * RDF IAE at most half that of the priors-only model (only when ``metrics_priors`` is given).

    Parameters
    ----------
    metrics_test : dict, :func:`compare_structure` output (or its ``"metrics"``) of the tested model
    metrics_priors : dict, optional, the same for the priors-only model against the same reference

    Returns
    -------
    dict, metric path ("bonds/A-B/js", "rdf/A-A/peak_position_diff", ...) -> largest allowed absolute value
    """
    mt = _metrics_of(metrics_test)
    mp = _metrics_of(metrics_priors) if metrics_priors is not None else None
    crit = {}
    for kind in BONDED_KINDS:
        for key, m in mt.get(kind, {}).items():
            self_js = m.get("self_js")
            self_js = 0.0 if self_js is None or not np.isfinite(self_js) else self_js
            crit[f"{kind}/{key}/js"] = max(JS_FLOOR, JS_SELF_FACTOR * self_js)
    for pair in mt.get("rdf", {}):
        crit[f"rdf/{pair}/peak_position_diff"] = PEAK_POSITION_TOL
        crit[f"rdf/{pair}/peak_height_rel_diff"] = PEAK_HEIGHT_REL_TOL
        if mp is not None and pair in mp.get("rdf", {}):
            crit[f"rdf/{pair}/iae"] = IAE_PRIORS_FRACTION * mp["rdf"][pair]["iae"]
    return crit


def _lookup(metrics, path):
    node = metrics
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def evaluate_criteria(metrics, criteria):
    """Check metrics against thresholds.

    Parameters
    ----------
    metrics : dict, one model's metrics
    criteria : dict, metric path -> largest allowed absolute value

    Returns
    -------
    dict, path -> {"value", "threshold", "pass"}; a missing or nan value fails
    """
    out = {}
    for path, threshold in criteria.items():
        value = _lookup(metrics, path)
        ok = value is not None and np.isfinite(value) and abs(value) <= threshold
        out[path] = {"value": value, "threshold": float(threshold), "pass": bool(ok)}
    return out


# --------------------------------------------------------------------------------------- plots
_PLOT_UNITS = {"bonds": ("bond length (nm)", 1.0), "angles": ("angle (deg)", 180.0 / math.pi),
               "dihedrals": ("dihedral (deg)", 180.0 / math.pi)}


def _grid(n):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def _step(ax, edges, density, scale, label, **kw):
    e = np.asarray(edges) * scale
    ax.stairs(np.asarray(density) / scale, e, label=label, **kw)


def plot_comparison(results, outdir, labels, reference_label="reference"):
    """PNG plots overlaying the reference and one or more test models.

    Parameters
    ----------
    results : dict or list of dict, :func:`compare_structure` outputs of each test model against the same
        reference (the reference curves are taken from the first)
    outdir : path, created if missing
    labels : str or list of str, one legend label per test model (e.g. "priors only", "spline", "neural")
    reference_label : str, legend label of the reference (e.g. "mapped atomistic")

    Returns
    -------
    list of Path: bonds.png, angles.png, dihedrals.png, rdf.png, rg_end_to_end.png (those with data)
    """
    if isinstance(results, dict):
        results = [results]
    labels = [labels] if isinstance(labels, str) else list(labels)
    if len(labels) != len(results):
        raise EnpcgError(f"plot_comparison: {len(results)} results but {len(labels)} labels; give one label "
                         "per test model")
    curves = [res["curves"] for res in results]
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    ref_style = {"color": "black", "linewidth": 2.0}

    for kind in BONDED_KINDS:
        keys = list(curves[0].get(kind, {}))
        if not keys:
            continue
        xlabel, scale = _PLOT_UNITS[kind]
        fig, axes = _grid(len(keys))
        for ax, key in zip(axes, keys):
            c0 = curves[0][kind][key]
            _step(ax, c0["edges"], c0["reference"], scale, reference_label, **ref_style)
            for c, label in zip(curves, labels):
                if key in c.get(kind, {}):
                    _step(ax, c[kind][key]["test_edges"], c[kind][key]["test"], scale, label)
            ax.set(title=key, xlabel=xlabel, ylabel="probability density")
        axes[0].legend(fontsize="small")
        paths.append(_save(fig, outdir / f"{kind}.png"))

    pairs = list(curves[0].get("rdf", {}))
    if pairs:
        fig, axes = _grid(len(pairs))
        for ax, pair in zip(axes, pairs):
            c0 = curves[0]["rdf"][pair]
            ax.plot(c0["r"], c0["reference"], label=reference_label, **ref_style)
            for c, label in zip(curves, labels):
                if pair in c.get("rdf", {}):
                    ax.plot(c["rdf"][pair]["r"], c["rdf"][pair]["test"], label=label)
            ax.axhline(1.0, color="grey", linewidth=0.5)
            ax.set(title=f"intermolecular {pair}", xlabel="r (nm)", ylabel="g(r)")
        axes[0].legend(fontsize="small")
        paths.append(_save(fig, outdir / "rdf.png"))

    shapes = [k for k in SHAPE_KINDS if k in curves[0]]
    if shapes:
        fig, axes = _grid(len(shapes))
        names = {"rg": "radius of gyration (nm)", "end_to_end": "end-to-end distance (nm)"}
        for ax, kind in zip(axes, shapes):
            c0 = curves[0][kind]
            _step(ax, c0["edges"], c0["reference"], 1.0, reference_label, **ref_style)
            for c, label in zip(curves, labels):
                if kind in c:
                    _step(ax, c[kind]["test_edges"], c[kind]["test"], 1.0, label)
            ax.set(xlabel=names[kind], ylabel="probability density")
        axes[0].legend(fontsize="small")
        paths.append(_save(fig, outdir / "rg_end_to_end.png"))
    return paths


# --------------------------------------------------------------------------------------- report
def _jsonable(x):
    """Numbers and arrays to plain JSON types; nan and inf become None (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


def _fmt(x):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{x:.4g}"


def _verdict(checks, path):
    if path not in checks:
        return ""
    return "pass" if checks[path]["pass"] else "**FAIL**"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_report(metrics, plots, outdir, title, criteria=None):
    """Write ``report.md`` (Markdown tables of every number, pass/fail where thresholds are given) and
    ``metrics.json`` into ``outdir``, atomically.

    Parameters
    ----------
    metrics : dict, model label -> :func:`compare_structure` output or its ``"metrics"`` (curves are not
        written); a single unlabelled result is labelled "test"
    plots : list of paths, PNGs to embed (linked relative to ``outdir``)
    outdir : path, created if missing
    title : str
    criteria : dict, optional, model label -> {metric path: largest allowed absolute value}
        (see :func:`structure_criteria`); models without an entry get no pass/fail column

    Returns
    -------
    Path of report.md. metrics.json holds {"title", "units", "models": {label: metrics}, "criteria",
    "checks": {label: {path: {"value", "threshold", "pass"}}}}, with nan written as null.
    """
    if isinstance(metrics, dict) and ("metrics" in metrics or "bonds" in metrics):
        metrics = {"test": metrics}
    models = {label: _jsonable(_metrics_of(m)) for label, m in metrics.items()}
    criteria = {label: dict(c) for label, c in (criteria or {}).items()}
    unknown = set(criteria) - set(models)
    if unknown:
        raise EnpcgError(f"write_report: criteria given for {sorted(unknown)} but metrics only for "
                         f"{sorted(models)}; use the same model labels")
    checks = {label: evaluate_criteria(models[label], c) for label, c in criteria.items()}
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)

    lines = [f"# {title}", "",
             "Units: nm, radians; Jensen-Shannon divergences (JS) in nats (0 to ln 2 = 0.693); "
             "RDF IAE = int |g_test - g_ref| dr in nm. Self-JS: reference first half vs second half.", ""]
    if checks:
        lines += ["## Summary", ""]
        rows = []
        for label, ch in checks.items():
            n_pass = sum(c["pass"] for c in ch.values())
            rows.append([label, n_pass, len(ch) - n_pass, "pass" if n_pass == len(ch) else "**FAIL**"])
        lines += _table(["model", "checks passed", "checks failed", "result"], rows) + [""]

    lines += ["## Frames", ""]
    lines += _table(["model", "reference frames", "test frames"],
                    [[label, _fmt(m.get("n_frames", {}).get("reference")), _fmt(m.get("n_frames", {}).get("test"))]
                     for label, m in models.items()]) + [""]

    for kind in BONDED_KINDS:
        rows = []
        for label, m in models.items():
            ch = checks.get(label, {})
            for key, v in m.get(kind, {}).items():
                path = f"{kind}/{key}/js"
                rows.append([label, key, _fmt(v["mean_reference"]), _fmt(v["mean_test"]), _fmt(v["js"]),
                             _fmt(v["self_js"]), _fmt(v["test_outside_fraction"]),
                             _fmt(ch[path]["threshold"]) if path in ch else "", _verdict(ch, path)])
        if rows:
            unit = "nm" if kind == "bonds" else "rad"
            lines += [f"## {kind.capitalize()}", ""]
            lines += _table(["model", "type", f"mean ref ({unit})", f"mean test ({unit})", "JS", "ref self-JS",
                             "test outside span", "JS max", "JS check"], rows) + [""]

    rows = []
    for label, m in models.items():
        ch = checks.get(label, {})
        for pair, v in m.get("rdf", {}).items():
            p = f"rdf/{pair}/"
            rows.append([label, pair, _fmt(v["peak_position_reference"]), _fmt(v["peak_position_test"]),
                         _fmt(v["peak_position_diff"]), _verdict(ch, p + "peak_position_diff"),
                         _fmt(v["peak_height_reference"]), _fmt(v["peak_height_test"]),
                         _fmt(v["peak_height_rel_diff"]), _verdict(ch, p + "peak_height_rel_diff"),
                         _fmt(v["iae"]), _fmt(ch[p + "iae"]["threshold"]) if p + "iae" in ch else "",
                         _verdict(ch, p + "iae")])
    if rows:
        lines += ["## Intermolecular RDFs", "",
                  f"First peak: position within {PEAK_POSITION_TOL} nm and height within "
                  f"{PEAK_HEIGHT_REL_TOL:.0%} of the reference where checked.", ""]
        lines += _table(["model", "pair", "peak r ref (nm)", "peak r test (nm)", "dr (nm)", "dr check",
                         "peak g ref", "peak g test", "dg / g ref", "dg check", "IAE (nm)", "IAE max (nm)",
                         "IAE check"], rows) + [""]

    rows = []
    for label, m in models.items():
        for kind, name in (("rg", "radius of gyration"), ("end_to_end", "end-to-end distance")):
            if kind in m:
                v = m[kind]
                rows.append([label, name, _fmt(v["mean_reference"]), _fmt(v["mean_test"]), _fmt(v["js"]),
                             _fmt(v["self_js"]), _fmt(v["test_outside_fraction"])])
    if rows:
        lines += ["## Molecular size", ""]
        lines += _table(["model", "quantity", "mean ref (nm)", "mean test (nm)", "JS", "ref self-JS",
                         "test outside span"], rows) + [""]

    if plots:
        lines += ["## Plots", ""]
        for p in plots:
            p = Path(p)
            try:
                rel = p.resolve().relative_to(outdir.resolve())
            except ValueError:
                rel = p
            lines += [f"![{p.stem}]({rel.as_posix()})", ""]

    payload = {"title": title, "units": {"length": "nm", "angle": "rad", "js": "nats", "iae": "nm"},
               "models": models, "criteria": _jsonable(criteria), "checks": _jsonable(checks)}
    with atomic_write(outdir / "metrics.json") as fh:
        json.dump(payload, fh, indent=2, allow_nan=False)
        fh.write("\n")
    report = outdir / "report.md"
    with atomic_write(report) as fh:
        fh.write("\n".join(lines))
    return report
