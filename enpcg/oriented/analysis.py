"""Orientational structure and torque statistics of oriented-bead trajectories.

Plain functions over arrays, in the style of :mod:`enpcg.analysis` (mdtraj style): positions in nm, body axes
as rotation matrices ``axes[..., :, a]`` = body axis e_a in the lab frame (columns, as everywhere in
:mod:`enpcg.oriented`), boxes (3, 3) nm with the box vectors as rows (OpenMM reduced form), torques in kJ/mol.
Divergences are Jensen-Shannon divergences in nats from :func:`enpcg.analysis.js_divergence`, the metric the
project's structural comparison uses (bins over the reference's 0.1-99.9 percentiles), with the same
acceptance threshold max(0.02, 3 x the reference's half-split JS) as :func:`enpcg.analysis.structure_criteria`.

Typical use::

    ref = read_oriented("mapped.h5"); cg = read_oriented("cg_run.h5")
    js = orientational_js(ref, cg, r_max=0.8)           # {"cos_xx": ..., "cos_zz": ..., "cos_r": ..., "r": ...}
    stats = torque_statistics(cg.torques, cg.axes)        # RMS torques, kJ/mol
    plot_orientational(ref, cg, "orientational.png", r_max=0.8)
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..analysis import JS_FLOOR, JS_SELF_FACTOR, _grid, _save, js_divergence, js_histograms
from ..errors import EnpcgError

ORIENTATIONAL_KEYS = ("cos_xx", "cos_yy", "cos_zz", "cos_r", "cos_ry", "cos_rz", "r")
_LABELS = {"cos_xx": r"$e_{x,i} \cdot e_{x,j}$", "cos_yy": r"$e_{y,i} \cdot e_{y,j}$",
           "cos_zz": r"$e_{z,i} \cdot e_{z,j}$", "cos_r": r"$e_{x,i} \cdot \hat r_{ij}$",
           "cos_ry": r"$e_{y,i} \cdot \hat r_{ij}$", "cos_rz": r"$e_{z,i} \cdot \hat r_{ij}$",
           "r": "centre distance r (nm)"}


def _arrays(positions, axes, box):
    x = np.asarray(positions, dtype=np.float64)
    q = np.asarray(axes, dtype=np.float64)
    if x.ndim == 2:
        x, q = x[None], q[None]
    if x.ndim != 3 or x.shape[-1] != 3 or q.shape != x.shape[:2] + (3, 3):
        raise EnpcgError(f"positions must be (F, n, 3) nm and axes (F, n, 3, 3); you supplied {np.shape(positions)} "
                         f"and {np.shape(axes)}")
    b = None
    if box is not None:
        b = np.asarray(box, dtype=np.float64)
        if b.shape == (3, 3):
            b = np.broadcast_to(b, (x.shape[0], 3, 3))
        if b.shape != (x.shape[0], 3, 3):
            raise EnpcgError(f"box must be (3, 3) or (F, 3, 3) nm; you supplied {np.shape(box)}")
        if not np.any(b):  # an all-zero box is how non-periodic frames are stored in H5MD
            b = None
    return x, q, b


def _minimum_image(d, box):
    """d (P, 3) nm wrapped into the reduced triclinic box (3, 3) rows: c, then b, then a."""
    for axis in (2, 1, 0):
        s = np.round(d[:, axis] / box[axis, axis])
        d = d - s[:, None] * box[axis]
    return d


def orientational_samples(positions, axes, box, r_max) -> dict:
    """Orientational pair samples of all bead pairs i < j closer than ``r_max``.

    Parameters
    ----------
    positions : (F, n, 3) nm, bead centres (a single frame (n, 3) is accepted)
    axes : (F, n, 3, 3), body axes as columns (e_x, e_y, e_z)
    box : (F, 3, 3) or (3, 3) nm (rows), or None (no periodicity; an all-zero box counts as None)
    r_max : float, nm, neighbour cutoff on the minimum-image centre distance

    Returns
    -------
    dict of 1-D arrays, concatenated over frames:
        ``cos_xx`` = e_x,i . e_x,j, ``cos_yy`` = e_y,i . e_y,j, ``cos_zz`` = e_z,i . e_z,j (one per pair);
        ``cos_r`` = e_x,i . r_hat_ij (r_hat_ij the unit vector from i to j), both orders (i, j) and (j, i),
        so twice as long and symmetric under the relabelling of the pair; ``cos_ry``, ``cos_rz`` likewise
        with e_y and e_z (where the neighbour sits in the bead's body frame);
        ``r`` : nm, the centre distance of each pair.
    """
    x, q, b = _arrays(positions, axes, box)
    r_max = float(r_max)
    if not r_max > 0:
        raise EnpcgError(f"r_max must be a positive distance in nm; you supplied {r_max}")
    i, j = np.triu_indices(x.shape[1], k=1)
    out = {k: [] for k in ORIENTATIONAL_KEYS}
    for f in range(x.shape[0]):
        d = x[f, j] - x[f, i]
        if b is not None:
            d = _minimum_image(d, b[f])
        r = np.linalg.norm(d, axis=-1)
        keep = (r < r_max) & (r > 0)
        ii, jj, d, r = i[keep], j[keep], d[keep], r[keep]
        rh = d / r[:, None]
        qi, qj = q[f, ii], q[f, jj]
        out["cos_xx"].append(np.sum(qi[..., 0] * qj[..., 0], axis=-1))
        out["cos_yy"].append(np.sum(qi[..., 1] * qj[..., 1], axis=-1))
        out["cos_zz"].append(np.sum(qi[..., 2] * qj[..., 2], axis=-1))
        for name, a in (("cos_r", 0), ("cos_ry", 1), ("cos_rz", 2)):
            out[name].append(np.concatenate([np.sum(qi[..., a] * rh, axis=-1), -np.sum(qj[..., a] * rh, axis=-1)]))
        out["r"].append(r)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def _samples_of(data, r_max):
    """Samples dict of an OrientedData-like object (positions, axes, box), or a samples dict as given."""
    if isinstance(data, dict):
        return data
    return orientational_samples(data.positions, data.axes, getattr(data, "box", None), r_max)


def _halves(data):
    h = data.positions.shape[0] // 2
    box = getattr(data, "box", None)
    pick = (lambda a, s: None if a is None else (a if np.ndim(a) == 2 else a[s]))
    return [(data.positions[s], data.axes[s], pick(box, s)) for s in (slice(0, h), slice(h, None))]


def orientational_js(reference, test, r_max, n_bins=50, self_js=False) -> dict:
    """Jensen-Shannon divergences (nats, 0 <= JS <= ln 2) between the orientational pair distributions of
    two trajectories (:func:`orientational_samples` within ``r_max`` nm), via :func:`enpcg.analysis.js_divergence`.

    reference, test : OrientedData-like (``positions`` (F, n, 3) nm, ``axes`` (F, n, 3, 3), ``box``), or the
        dicts :func:`orientational_samples` returns. r_max : nm. n_bins : histogram bins over the reference's
        0.1-99.9 percentiles.
    self_js : also return the reference's half-split JS (first half of the frames against the second; needs
        an OrientedData-like reference) under ``"<name>_self"``: the sampling-noise floor of the estimate.

    Returns dict name -> JS (nats) for each key of :func:`orientational_samples` (``cos_xx``, ``cos_yy``,
    ``cos_zz``, ``cos_r``, ``cos_ry``, ``cos_rz``, ``r``).
    """
    ref = _samples_of(reference, r_max)
    tst = _samples_of(test, r_max)
    out = {k: js_divergence(ref[k], tst[k], n_bins) for k in ORIENTATIONAL_KEYS if k in ref and k in tst}
    if self_js:
        if isinstance(reference, dict) or reference.positions.shape[0] < 2:
            raise EnpcgError("self_js needs an OrientedData-like reference with at least 2 frames")
        (a, b) = [orientational_samples(*h, r_max) for h in _halves(reference)]
        for k in list(out):
            out[f"{k}_self"] = js_divergence(a[k], b[k], n_bins)
    return out


def js_thresholds(js: dict) -> dict:
    """Acceptance thresholds (nats) of the project's structural criteria applied to :func:`orientational_js`
    output computed with ``self_js=True``: max(0.02, 3 x the reference's half-split JS) per distribution."""
    return {k: max(JS_FLOOR, JS_SELF_FACTOR * (js.get(f"{k}_self") or 0.0)) for k in js if not k.endswith("_self")}


def torque_statistics(torques, axes) -> dict:
    """Torque statistics of oriented beads.

    torques : (F, n, 3) kJ/mol, lab frame; axes : (F, n, 3, 3), body axes as columns.

    Returns dict (all kJ/mol): ``rms`` = sqrt(<|tau|^2>); ``rms_x``, ``rms_y``, ``rms_z`` = RMS of the body-frame
    components tau . e_a (so rms^2 = rms_x^2 + rms_y^2 + rms_z^2); ``mean_abs`` = <|tau|>; ``mean_body`` =
    the mean body-frame torque [x, y, z] (zero in equilibrium for a symmetric ensemble); and ``n_samples``.
    """
    t = np.asarray(torques, dtype=np.float64).reshape(-1, 3)
    q = np.asarray(axes, dtype=np.float64).reshape(-1, 3, 3)
    if len(t) != len(q):
        raise EnpcgError(f"torques and axes must describe the same beads; {np.shape(torques)} vs {np.shape(axes)}")
    if not len(t):
        raise EnpcgError("torque_statistics: no torque samples")
    body = np.einsum("kja,kj->ka", q, t)  # tau . e_a
    rms_axes = np.sqrt(np.mean(body ** 2, axis=0))
    return {"rms": float(np.sqrt(np.mean(np.sum(t ** 2, axis=-1)))),
            "rms_x": float(rms_axes[0]), "rms_y": float(rms_axes[1]), "rms_z": float(rms_axes[2]),
            "mean_abs": float(np.mean(np.linalg.norm(t, axis=-1))),
            "mean_body": [float(v) for v in body.mean(axis=0)], "n_samples": int(len(t))}


def _density(counts, edges):
    total = counts.sum()
    return counts / (total * np.diff(edges)) if total else np.zeros_like(counts)


def plot_orientational(reference, test, path, r_max=0.8, n_bins=50, labels=("mapped reference", "CG model")):
    """PNG overlaying the reference's and the test's orientational pair distributions (probability
    densities on the reference's JS bins, JS in nats in each title). reference, test : OrientedData-like or
    :func:`orientational_samples` dicts; r_max : nm. Returns the Path written."""
    ref = _samples_of(reference, r_max)
    tst = _samples_of(test, r_max)
    keys = [k for k in ORIENTATIONAL_KEYS if k in ref and k in tst]
    fig, axs = _grid(len(keys))
    for ax, k in zip(axs, keys):
        edges, p, q = js_histograms(ref[k], tst[k], n_bins)
        ax.stairs(_density(p, edges), edges, label=labels[0], color="black", linewidth=2.0)
        ax.stairs(_density(q, edges), edges, label=labels[1])
        ax.set(title=f"{k}  (JS {js_divergence(ref[k], tst[k], n_bins):.4f} nats)", xlabel=_LABELS[k],
               ylabel="probability density")
        ax.legend(fontsize=8)
    fig.suptitle(f"orientational pair distributions, pairs with r < {r_max:g} nm")
    return _save(fig, Path(path))


def plot_torques(reference, test, path, n_bins=60, labels=("mapped reference", "CG model")):
    """PNG of the body-frame torque components tau . e_a (kJ/mol) and |tau| of a reference and a test
    trajectory. reference, test : OrientedData-like (``torques`` (F, n, 3) kJ/mol, ``axes``) or (torques,
    axes) tuples; a list of tests with a list of labels overlays several. Returns the Path written."""
    def parts(d):
        t, q = (d if isinstance(d, tuple) else (d.torques, d.axes))
        t = np.asarray(t, dtype=np.float64).reshape(-1, 3)
        q = np.asarray(q, dtype=np.float64).reshape(-1, 3, 3)
        body = np.einsum("kja,kj->ka", q, t)
        return {"tau_x": body[:, 0], "tau_y": body[:, 1], "tau_z": body[:, 2], "|tau|": np.linalg.norm(t, axis=-1)}

    tests = test if isinstance(test, list) else [test]
    labels = list(labels)
    if len(labels) != 1 + len(tests):
        raise EnpcgError(f"plot_torques: {len(tests)} tests need {1 + len(tests)} labels; you supplied {labels}")
    ref = parts(reference)
    tps = [parts(t) for t in tests]
    fig, axs = _grid(len(ref))
    for ax, k in zip(axs, ref):
        lo, hi = np.percentile(ref[k], [0.1, 99.9])
        edges = np.linspace(0.0 if k == "|tau|" else lo, hi, n_bins + 1)
        ax.stairs(_density(np.histogram(ref[k], edges)[0].astype(float), edges), edges, label=labels[0],
                  color="black", linewidth=2.0)
        for tp, lab in zip(tps, labels[1:]):
            ax.stairs(_density(np.histogram(tp[k], edges)[0].astype(float), edges), edges, label=lab)
        unit = "body-frame torque component" if k != "|tau|" else "torque magnitude"
        ax.set(title=f"{k}  (RMS ref {math.sqrt(np.mean(ref[k] ** 2)):.1f} kJ/mol)", xlabel=f"{unit} (kJ/mol)",
               ylabel="probability density")
        ax.legend(fontsize=8)
    return _save(fig, Path(path))
