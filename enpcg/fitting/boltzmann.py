"""Prior parameters by Boltzmann inversion of the mapped CG distributions.

For each bonded type the potential of mean force of its coordinate, with the Jacobian removed, is fitted by
weighted least squares (bin weights = counts, the inverse variance of -kT ln(count)):

* bonds:      -kT ln(P(r) / r^2)            -> k/2 (r - r0)^2 + c          (k kJ/mol/nm^2, r0 nm)
* angles:     -kT ln(P(theta) / sin theta)  -> k/2 (theta - theta0)^2 + c  (k kJ/mol/rad^2, theta0 rad)
* dihedrals:  -kT ln P(phi)                 -> c + sum_n=1..3 k_n (1 + cos(n phi - delta_n))

The repulsion sigma of each pair type "A-B" is a low percentile of the distance from a bead of type A to its
nearest non-excluded bead of type B (and vice versa); its epsilon is of order kT. kT = k_B T with
k_B = 0.008314462618 kJ/mol/K. Units: nm, rad, kJ/mol, K.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
import torch

from ..errors import EnpcgError
from ..geometry import bond_angles, bond_lengths, dihedral_angles
from ..models.priors import PriorModel

KB = 0.008314462618  # kJ/mol/K
log = logging.getLogger(__name__)


def _weighted_polyfit(x, y, w, degree):
    """Coefficients (highest power first) of the weighted least-squares polynomial."""
    v = np.vander(x, degree + 1)
    sw = np.sqrt(w)
    coef, *_ = np.linalg.lstsq(v * sw[:, None], y * sw, rcond=None)
    return coef


def _harmonic_fit(values, kT, bins, jacobian, name, x_max=np.inf):
    """k, x0 of k/2 (x - x0)^2 fitted to -kT ln(P(x) / J(x)) over the well-sampled range.

    Only bins holding at least 10% of the fullest bin enter the fit: the sparse tails, and for angles the
    region near pi where the sin(theta) Jacobian makes -kT ln(P / sin) diverge, would otherwise drag the
    quadratic (seen: theta0 = 177 deg with k = 9 kJ/mol/rad^2 for a distribution centred at 137 deg, which
    lets chains straighten and the dihedrals become singular). If the fit is still not a well with its
    minimum inside the sampled range (and below ``x_max``: angle minima within 0.3 rad of pi make chains
    nearly straight, where dihedrals are singular), the Gaussian moments are used: x0 = mean, k = kT / variance.
    """
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        raise EnpcgError(f"fit_priors: {name} has no spread (all values {lo:.6g}); cannot Boltzmann-invert it")
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[1:] + edges[:-1])
    jac = jacobian(centres)
    ok = (counts >= 0.1 * counts.max()) & (jac > 1e-3)
    if ok.sum() < 3:
        raise EnpcgError(f"fit_priors: {name} samples fill fewer than 3 histogram bins; give more frames")
    pmf = -kT * np.log(counts[ok] / jac[ok])
    a, b, _ = _weighted_polyfit(centres[ok], pmf, counts[ok].astype(float), 2)
    x0 = -b / (2.0 * a) if a > 0 else np.nan
    if not (a > 0 and centres[ok].min() <= x0 <= min(centres[ok].max(), x_max)):
        log.warning("fit_priors: %s PMF is not a well inside the sampled range; using Gaussian moments", name)
        return kT / float(np.var(values)), float(np.mean(values))
    return 2.0 * a, float(x0)


def _fourier_fit(phi, kT, bins, name):
    """k_n, delta_n (n = 1..3) of sum k_n (1 + cos(n phi - delta_n)) fitted to -kT ln P(phi)."""
    counts, edges = np.histogram(phi, bins=bins, range=(-math.pi, math.pi))
    centres = 0.5 * (edges[1:] + edges[:-1])
    ok = counts > 0
    if ok.sum() < 7:
        raise EnpcgError(f"fit_priors: {name} samples fill fewer than 7 of {bins} bins; give more frames")
    x = centres[ok]
    design = np.stack([np.ones_like(x)] + [f(n * x) for n in (1, 2, 3) for f in (np.cos, np.sin)], axis=1)
    pmf = -kT * np.log(counts[ok])
    sw = np.sqrt(counts[ok].astype(float))
    coef, *_ = np.linalg.lstsq(design * sw[:, None], pmf * sw, rcond=None)
    # a cos(n phi) + b sin(n phi) = k cos(n phi - delta) with k = |(a, b)|, delta = atan2(b, a).
    k = [float(np.hypot(coef[1 + 2 * i], coef[2 + 2 * i])) for i in range(3)]
    delta = [float(math.atan2(coef[2 + 2 * i], coef[1 + 2 * i])) for i in range(3)]
    return k, delta


def _nearest_neighbour_distances(pos, box, topology, frames, search):
    """Per pair type key, the distances (nm) from each bead to its nearest non-excluded bead of the other type
    within the search radius (nm)."""
    from .mscg import PairSearch

    n = topology.n_beads
    types = topology.type_index()
    names = topology.type_names()
    excluded = np.zeros((n, n), dtype=bool)
    ex = topology.excluded_pairs()
    if len(ex):
        excluded[ex[:, 0], ex[:, 1]] = excluded[ex[:, 1], ex[:, 0]] = True
    finder = PairSearch(n, search)
    out = {k: [] for k in topology.pair_type_names()}
    for f in frames:
        i, j, d = finder(torch.tensor(pos[f]), None if box is None else torch.tensor(box[f]))
        i, j, d = i.numpy(), j.numpy(), torch.linalg.norm(d, dim=-1).numpy()
        keep = ~excluded[i, j]
        # Both directions: each bead looks for its nearest neighbour among all others.
        i, j, d = np.concatenate([i[keep], j[keep]]), np.concatenate([j[keep], i[keep]]), np.tile(d[keep], 2)
        for tb in range(len(names)):
            sel = types[j] == tb
            nearest = np.full(n, np.inf)
            np.minimum.at(nearest, i[sel], d[sel])
            for ta in range(len(names)):
                vals = nearest[(types == ta) & np.isfinite(nearest)]
                out["-".join(sorted([names[ta], names[tb]]))].append(vals)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def fit_priors(positions, box, topology, temperature: float, *, repulsion: bool = True,
               cutoff: Optional[float] = None, bins: int = 60, dihedral_bins: int = 72,
               percentile: float = 1.0, epsilon_kT: float = 1.0, max_frames: int = 200,
               periodic: Optional[bool] = None) -> PriorModel:
    """Boltzmann-invert the CG distributions into a :class:`PriorModel`.

    Parameters
    ----------
    positions : array, shape=(n_frames, n_beads, 3), nm, mapped configurations sampled at ``temperature``
    box : array, shape=(n_frames, 3, 3), nm (rows), or None for a non-periodic system
    topology : CGTopology
    temperature : float, K; kT = 0.008314462618 * temperature kJ/mol
    repulsion : bool, add the r^-12 repulsion between non-excluded pairs
    cutoff : float, nm, repulsion cutoff; default twice the largest fitted sigma
    bins, dihedral_bins : histogram bins over the sampled range (bonds, angles) and over [-pi, pi]
    percentile : percent; sigma is this percentile of the nearest non-excluded neighbour distances
    epsilon_kT : repulsion epsilon in units of kT (E(sigma) is about epsilon)
    max_frames : at most this many evenly spaced frames are used for the neighbour distances
    periodic : default ``box is not None``

    Returns
    -------
    PriorModel (float64) with ``fit_info`` (dict: temperature, kT, number of frames).
    """
    pos = np.asarray(positions, dtype=np.float64)
    n = topology.n_beads
    if pos.ndim != 3 or pos.shape[1:] != (n, 3) or pos.shape[0] == 0:
        raise EnpcgError(f"fit_priors: positions must be shape (n_frames, {n}, 3) nm; you supplied {pos.shape}")
    if box is not None:
        box = np.asarray(box, dtype=np.float64)
        if box.shape != (pos.shape[0], 3, 3):
            raise EnpcgError(f"fit_priors: box must be shape ({pos.shape[0]}, 3, 3) nm; you supplied {box.shape}")
    if periodic is None:
        periodic = box is not None
    if periodic and box is None:
        raise EnpcgError("fit_priors: periodic=True needs box vectors (n_frames, 3, 3) nm")
    if not float(temperature) > 0:
        raise EnpcgError(f"fit_priors: temperature must be > 0 K; received {temperature}")
    kT = KB * float(temperature)
    x = torch.tensor(pos)
    b = torch.tensor(box) if periodic else None

    def per_type(kind, fn):
        terms = getattr(topology, kind)
        if len(terms) == 0:
            return {}
        vals = fn(x, torch.as_tensor(terms), b).numpy()            # (F, n_terms)
        keys = np.array(topology.term_keys(kind))
        return {k: vals[:, keys == k].ravel() for k in topology.term_type_names(kind)}

    bonds = {}
    for key, r in per_type("bonds", bond_lengths).items():
        k, r0 = _harmonic_fit(r, kT, bins, lambda c: c ** 2, f"bond type {key!r}")
        bonds[key] = {"k": k, "r0": r0}
    angles = {}
    for key, th in per_type("angles", bond_angles).items():
        k, t0 = _harmonic_fit(th, kT, bins, np.sin, f"angle type {key!r}", x_max=np.pi - 0.3)
        angles[key] = {"k": k, "theta0": t0}
    dihedrals = {}
    for key, phi in per_type("dihedrals", dihedral_angles).items():
        k, delta = _fourier_fit(phi, kT, dihedral_bins, f"dihedral type {key!r}")
        dihedrals[key] = {"k": k, "delta": delta}

    rep = {}
    if repulsion:
        frames = np.unique(np.linspace(0, pos.shape[0] - 1, min(max_frames, pos.shape[0])).astype(int))
        search = 1.0 if cutoff is None else max(float(cutoff), 1.0)
        if periodic:
            search = min(search, 0.5 * float(np.min(np.abs(box[:, [0, 1, 2], [0, 1, 2]]))))
        dist = _nearest_neighbour_distances(pos, box if periodic else None, topology, frames, search)
        for key, d in dist.items():
            if d.size == 0:
                raise EnpcgError(f"fit_priors: no non-excluded pairs of type {key!r} closer than {search:.3g} nm; "
                                 "pass repulsion=False or give frames where these beads meet")
            rep[key] = {"epsilon": epsilon_kT * kT, "sigma": float(np.percentile(d, percentile))}
        if cutoff is None:
            cutoff = math.ceil(200.0 * max(v["sigma"] for v in rep.values())) / 100.0
    model = PriorModel(topology, periodic=bool(periodic), cutoff=float(cutoff if cutoff is not None else 1.0),
                       bonds=bonds, angles=angles, dihedrals=dihedrals, repulsion=rep).double()
    model.fit_info = {"method": "Boltzmann inversion", "temperature": float(temperature), "kT": kT,
                      "n_frames": int(pos.shape[0])}
    return model
