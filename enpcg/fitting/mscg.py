"""Multiscale coarse-graining (MS-CG) by linear force matching of cubic B-splines.

MS-CG (Izvekov & Voth 2005; Noid et al. 2008) writes the CG energy as a sum of pair, bond, angle and dihedral
terms, each a function of one coordinate x, and expands every function in cubic B-splines on uniform knots
over the sampled range of x. The forces are then linear in the coefficients c,
``F = A c``, with ``A[(frame, bead, dim), k] = -sum_terms B_k'(x) dx/dr``, and the fit is the least-squares
solution of ``A c = F_ref``. The normal equations ``A^T A`` and ``A^T F`` are accumulated over frame batches
in float64 (on a GPU when available), a small second-difference penalty keeps unsampled coefficients
defined, and the energy gauge is fixed (pair splines vanish with slope and curvature at the cutoff; the
constant mode of each bonded spline is removed). The fitted splines, continued outside the sampled range by
repulsive/harmonic walls, are tabulated on a fine uniform grid that contains the knots and returned as a
:class:`enpcg.models.spline.SplineModel`.

Under ``torchrun`` (:mod:`enpcg.fitting.distributed`) each rank accumulates the sampled ranges and the normal
equations over its contiguous share of the frames, the sums are all-reduced, and every rank solves the same
system: the same model as one process, up to the round-off of the summation order.

Units: positions and box nm, forces kJ/mol/nm, energies kJ/mol, angles rad, temperature K.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import EnpcgError
from ..geometry import bond_angles, dihedral_angles, minimum_image
from ..models.spline import SplineModel, dihedral_damping as _damping
from . import distributed

KB = 0.008314462618  # kJ/mol/K
CACHE_BYTES = 2 ** 30  # term geometry kept between the two passes (bytes)
DESIGN_ENTRIES = 1e6  # doubles in the design matrix of one sub-batch
# Dihedral energies are damped to 0 as either of their angles goes from here to pi (see SplineModel): the
# dihedral force ~ 1 / sin(theta) otherwise blows up CG runs whose angles reach 180 degrees.
DIHEDRAL_DAMPING = math.radians(165.0)
log = logging.getLogger(__name__)


@dataclass
class _Block:
    """One spline (one type of one term family) and its columns in the normal equations."""

    family: str          # "pairs", "bonds", "angles", "dihedrals"
    key: str             # type key, e.g. "A-B"
    lo: float            # first knot (nm or rad)
    h: float             # knot spacing
    n_int: int           # number of knot intervals over [lo, lo + n_int h]
    periodic: bool
    n_coef: int          # free coefficients (pairs: n_int, the 3 reaching past the cutoff are zero)
    offset: int = 0      # first column
    sampled: tuple = (0.0, 0.0)  # sampled range of x
    grid: float = 0.0    # table grid spacing (divides h)
    table_lo: float = 0.0
    table_hi: float = 0.0

    @property
    def hi(self) -> float:
        return self.lo + self.n_int * self.h


# ------------------------------------------------------------------------------------- B-spline basis
def _basis(u):
    """Uniform cubic B-spline weights of the 4 coefficients active at local coordinate u in [0, 1)."""
    v = 1.0 - u
    return torch.stack([v ** 3 / 6.0, (3 * u ** 3 - 6 * u ** 2 + 4) / 6.0,
                        (-3 * u ** 3 + 3 * u ** 2 + 3 * u + 1) / 6.0, u ** 3 / 6.0], dim=-1)


def _basis_derivative(u):
    """d/du of :func:`_basis`."""
    v = 1.0 - u
    return torch.stack([-0.5 * v ** 2, 1.5 * u ** 2 - 2.0 * u, -1.5 * u ** 2 + u + 0.5, 0.5 * u ** 2], dim=-1)


def _locate(block: _Block, x):
    """Local coordinate u in [0, 1] and the 4 active coefficient indices (relative to the block), shape (..., 4)."""
    t = (x - block.lo) / block.h
    if block.periodic:
        t = torch.remainder(t, float(block.n_int))
    j = torch.clamp(torch.floor(t), 0, block.n_int - 1)
    u = t - j
    cols = j.to(torch.int64).unsqueeze(-1) + torch.arange(4, device=x.device)
    if block.periodic:
        cols = cols % block.n_int
    return u, cols


def _spline_values(block: _Block, coef: np.ndarray, x: np.ndarray):
    """Energy U(x), U'(x), U''(x) of the fitted spline (x inside [lo, hi] or periodic)."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    u, cols = _locate(block, xt)
    c = torch.zeros(block.n_int + 3, dtype=torch.float64)
    c[:block.n_coef] = torch.as_tensor(coef)
    cc = c[cols]
    v = 1.0 - u
    d2 = torch.stack([v, 3 * u - 2, -3 * u + 1, u], dim=-1)
    e = (cc * _basis(u)).sum(-1)
    d1 = (cc * _basis_derivative(u)).sum(-1) / block.h
    dd = (cc * d2).sum(-1) / block.h ** 2
    return e.numpy(), d1.numpy(), dd.numpy()


# ------------------------------------------------------------------------------------- geometry per term
class PairSearch:
    """Pairs within the cutoff of one frame, each once: vesin's cell list (on the CPU) when vesin-torch is
    installed, else a dense all-pairs search in torch on the frame's device (fine for a few thousand beads).

    method : "auto" (vesin if installed), "vesin" or "dense".
    """

    def __init__(self, n: int, cutoff: float, method: str = "auto"):
        if method not in ("auto", "vesin", "dense"):
            raise EnpcgError(f"pair_search must be 'auto', 'vesin' or 'dense'; received {method!r}")
        self.cutoff = cutoff
        self.vesin = None
        if method != "dense":
            try:
                from vesin_torch import NeighborList
                self.vesin = NeighborList(cutoff=cutoff, full_list=False)
            except ImportError:
                if method == "vesin":
                    raise EnpcgError("pair_search='vesin' needs vesin-torch; install it with "
                                     "'pip install vesin-torch' or use pair_search='dense'") from None
        if self.vesin is None:
            self.pairs = torch.triu_indices(n, n, offset=1)

    def __call__(self, x, box):
        """x (n, 3) nm, box (3, 3) nm or None -> i (P,), j (P,), vector r_j - r_i (P, 3), on x's device."""
        if self.vesin is not None:
            xc = x.detach().cpu()
            if box is None:
                i, j, d = self.vesin.compute(xc, torch.zeros((3, 3), dtype=xc.dtype), False, "ijD")
            else:
                i, j, d = self.vesin.compute(xc, box.detach().cpu(), True, "ijD")
            return i.to(x.device), j.to(x.device), d.to(x.device)
        if self.pairs.device != x.device:
            self.pairs = self.pairs.to(x.device)
        pairs = self.pairs
        d = minimum_image((x[pairs[1]] - x[pairs[0]]).unsqueeze(0), None if box is None else box.unsqueeze(0))[0]
        near = torch.linalg.norm(d, dim=-1) < self.cutoff
        return pairs[0][near], pairs[1][near], d[near]


def _pair_instances(x, box, excluded, pair_type_matrix, bead_type, cutoff, search):
    """Non-excluded pairs within the cutoff of every frame of a batch.

    Returns frame (Q,) int32, atoms (Q, 2) int32 with i < j, pair type (Q,), r (Q,) nm and the unit vector
    from i to j (Q, 3) = dr/dx_j = -dr/dx_i. excluded : (n, n) bool matrix of excluded pairs.
    """
    frames, ii, jj, vecs = [], [], [], []
    for f in range(x.shape[0]):
        i, j, d = search(x[f], None if box is None else box[f])
        frames.append(torch.full((i.shape[0],), f, dtype=torch.int64, device=x.device))
        ii.append(i)
        jj.append(j)
        vecs.append(d)
    # One pass over the whole batch (few large tensor operations rather than many small ones per frame).
    frame = torch.cat(frames)
    i = torch.cat(ii).to(torch.int64)
    j = torch.cat(jj).to(torch.int64)
    d = torch.cat(vecs)
    swap = i > j
    i, j = torch.where(swap, j, i), torch.where(swap, i, j)
    d = torch.where(swap.unsqueeze(-1), -d, d)
    r = torch.linalg.norm(d, dim=-1)
    keep = (~excluded[i, j]) & (r < cutoff)
    frame, atom, d, r = frame[keep], torch.stack([i[keep], j[keep]], dim=1), d[keep], r[keep]
    ptype = pair_type_matrix[bead_type[atom[:, 0]], bead_type[atom[:, 1]]]
    return frame.to(torch.int32), atom.to(torch.int32), ptype, r, d / r.unsqueeze(-1)


def _bonded_instances(x, box, terms, term_type, family, need_grad: bool = True, damping: float = -1.0):
    """All bonded terms of every frame: frame (Q,) int32, atoms (Q, k) int32, type (Q,), coordinate (Q,) and
    its gradient: for bonds the unit vector (Q, 3) = dr/dx_j = -dr/dx_i, else (Q, k, 3). Dihedrals with
    ``damping`` > 0 (rad): (Q, 4, 3, 2), [..., 0] = w grad(phi), [..., 1] = grad(w) of the damping weight
    w = f(theta_1) f(theta_2) (:func:`enpcg.models.spline.dihedral_damping`).

    For angles and dihedrals each term gets its own copy of its beads' positions, so one backward pass gives
    every term's gradient.
    """
    b, k = x.shape[0], terms.shape[1]
    n_terms = terms.shape[0]
    if family == "bonds":  # analytic: dr/dx_j = -dr/dx_i = unit vector
        d = minimum_image(x[:, terms[:, 1]] - x[:, terms[:, 0]], box)
        c = torch.linalg.norm(d, dim=-1)
        g = d / c.unsqueeze(-1)                                      # (B, I, 3)
    else:
        with torch.set_grad_enabled(need_grad):
            xs = x[:, terms].detach().requires_grad_(need_grad)      # (B, I, k, 3)
            flat = xs.reshape(b, n_terms * k, 3)
            local = torch.arange(n_terms * k, device=x.device).reshape(n_terms, k)
            fn = bond_angles if family == "angles" else dihedral_angles
            c = fn(flat, local, box)
            if family == "dihedrals" and damping > 0:
                w = (_damping(bond_angles(flat, local[:, :3], box), damping)
                     * _damping(bond_angles(flat, local[:, 1:], box), damping))
                if need_grad:
                    g_phi = torch.autograd.grad(c.sum(), xs, retain_graph=True)[0]
                    g_w = torch.autograd.grad(w.sum(), xs)[0]
                    g = torch.stack([w.detach().reshape(b, n_terms, 1, 1) * g_phi, g_w], dim=-1)
                else:
                    g = torch.zeros(xs.shape + (2,), dtype=xs.dtype, device=xs.device)
            else:
                g = torch.autograd.grad(c.sum(), xs)[0] if need_grad else torch.zeros_like(xs)
    frames = torch.arange(b, device=x.device, dtype=torch.int32).repeat_interleave(n_terms)
    g = g.reshape(b * n_terms, 3) if family == "bonds" else g.reshape((b * n_terms, k) + tuple(g.shape[3:]))
    return frames, terms.to(torch.int32).repeat(b, 1), term_type.repeat(b), c.detach().reshape(-1), g


def _design_matrix(found, f0, f1, n, n_coef, block_of):
    """Rows of A for frames [f0, f1) of a batch: (nb * n * 3, n_coef), A = dF/dc (kJ/mol/nm per coefficient).

    found : term instances of the batch (family, frame, atoms, type, coordinate, gradient), sorted by frame.
    """
    nb = f1 - f0
    # Laid out (frame, bead, column, dim) so each term adds one 3-vector per column.
    a = torch.zeros((nb * n * n_coef, 3), dtype=torch.float64, device=found[0][1].device if found else "cpu")
    for fam, frame, atoms, typ, c, grad in found:
        bounds = torch.searchsorted(frame, torch.tensor([f0, f1], dtype=frame.dtype, device=frame.device))
        lo, hi = int(bounds[0]), int(bounds[1])
        frame, atoms, typ, c, grad = frame[lo:hi], atoms[lo:hi], typ[lo:hi], c[lo:hi], grad[lo:hi]
        for t_i, blk in enumerate(block_of[fam]):
            if len(block_of[fam]) > 1:
                sel = typ == t_i
                if not bool(sel.any()):
                    continue
                frame_t, atoms_t, c_t, grad_t = frame[sel], atoms[sel], c[sel], grad[sel]
            else:
                frame_t, atoms_t, c_t, grad_t = frame, atoms, c, grad
            u, cols = _locate(blk, c_t)
            db = _basis_derivative(u) / blk.h                             # (Q, 4)
            if blk.family == "pairs":                                      # coefficients past the cutoff are zero
                keep = cols < blk.n_coef
                db = db * keep
                cols = cols * keep
            cols = cols + blk.offset
            rows = ((frame_t.to(torch.int64) - f0).unsqueeze(1) * n + atoms_t) * n_coef   # (Q, k) int64
            if blk.family in ("pairs", "bonds"):
                # The two beads of a distance get opposite forces: one value array, two scatters.
                val = (-grad_t.unsqueeze(1) * db.unsqueeze(-1)).reshape(-1, 3)             # (Q * 4, 3)
                a.index_add_(0, (rows[:, 1:2] + cols).reshape(-1), val)
                a.index_add_(0, (rows[:, 0:1] + cols).reshape(-1), val, alpha=-1.0)
            else:
                flat = rows.unsqueeze(-1) + cols.unsqueeze(1)              # (Q, k, 4)
                if grad_t.dim() == 4:  # damped dihedrals: d(w B_k(phi)) = w B_k' grad(phi) + B_k grad(w)
                    val = -(grad_t[..., 0].unsqueeze(2) * db.view(-1, 1, 4, 1)
                            + grad_t[..., 1].unsqueeze(2) * _basis(u).view(-1, 1, 4, 1))
                else:
                    val = -grad_t.unsqueeze(2) * db.view(-1, 1, 4, 1)      # (Q, k, 4, 3)
                a.index_add_(0, flat.reshape(-1), val.reshape(-1, 3))
    return a.view(nb, n, n_coef, 3).permute(0, 1, 3, 2).reshape(nb * n * 3, n_coef)


# ------------------------------------------------------------------------------------- main
def _as_array(name, arr, shape_tail):
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim != len(shape_tail) + 1 or tuple(a.shape[1:]) != shape_tail:
        raise EnpcgError(f"fit_spline: {name} must be shape (n_frames, {', '.join(map(str, shape_tail))}); "
                         f"you supplied {a.shape}")
    return a


def fit_spline(positions, forces, box, topology, *, cutoff: float, pair_knots: int = 40, bond_knots: int = 20,
               angle_knots: int = 20, dihedral_knots: int = 24, temperature: float = 300.0,
               device: Optional[str] = None, batch_frames: Optional[int] = None, ridge: float = 1e-5,
               grid_per_knot: int = 5, wall_kT: float = 100.0, periodic: Optional[bool] = None,
               pair_search: str = "auto", num_threads: Optional[int] = None,
               progress: bool = True, dihedral_damping: Optional[float] = DIHEDRAL_DAMPING) -> SplineModel:
    """Fit a :class:`SplineModel` to reference forces by MS-CG linear force matching.

    Parameters
    ----------
    positions : array, shape=(n_frames, n_beads, 3), nm
    forces : array, shape=(n_frames, n_beads, 3), kJ/mol/nm, mapped reference forces
    box : array, shape=(n_frames, 3, 3), nm (rows), or None for a non-periodic system
    topology : CGTopology
    cutoff : float, nm, pair cutoff (at most half the smallest box width)
    pair_knots, bond_knots, angle_knots : int, knot intervals over the sampled range of each term type (the
        spacing is rounded so that knots fall on the table grid); dihedral_knots : intervals over 2 pi
    temperature : float, K; sets the wall stiffness scale kT
    device : torch device for the normal equations; default "cuda" when available, else "cpu"
    batch_frames : frames per geometry batch (default: about 2e6 / (60 n_beads) frames); the design matrix
        is built in sub-batches of about 1e6 entries
    ridge : relative weight of the second-difference smoothness penalty (times the mean diagonal of A^T A of
        each spline)
    grid_per_knot : table points per knot interval
    wall_kT : wall curvature outside the sampled range, in kT per (sampled width)^2 (0.1 nm for pairs)
    periodic : use the minimum image (default: box is not None)
    pair_search : "auto" (vesin-torch's cell list if installed), "vesin" or "dense" (all pairs, in torch)
    num_threads : torch CPU threads during the fit (restored afterwards); default: leave torch's setting.
        On a small machine shared with other work, 1 can be several times faster than torch's default.
    progress : show tqdm progress bars
    dihedral_damping : rad or None; the dihedral splines are fitted (and act) times f(theta_1) f(theta_2), which
        falls from 1 at this angle to 0 at pi (:class:`enpcg.models.spline.SplineModel`); None: undamped

    Returns
    -------
    SplineModel (float64) with ``fit_info`` (dict): ``force_residual`` = ||F_fit - F_ref|| / ||F_ref|| of
    the fitted B-splines over all frames, ``n_coefficients``, ``time_s``, per-table sampled ranges.
    """
    if num_threads is None:
        return _fit_spline(positions, forces, box, topology, cutoff, pair_knots, bond_knots, angle_knots,
                           dihedral_knots, temperature, device, batch_frames, ridge, grid_per_knot, wall_kT,
                           periodic, pair_search, progress, dihedral_damping)
    if int(num_threads) < 1:
        raise EnpcgError(f"fit_spline: num_threads must be >= 1; received {num_threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(int(num_threads))
    try:
        return _fit_spline(positions, forces, box, topology, cutoff, pair_knots, bond_knots, angle_knots,
                           dihedral_knots, temperature, device, batch_frames, ridge, grid_per_knot, wall_kT,
                           periodic, pair_search, progress, dihedral_damping)
    finally:
        torch.set_num_threads(previous)


def _fit_spline(positions, forces, box, topology, cutoff, pair_knots, bond_knots, angle_knots, dihedral_knots,
                temperature, device, batch_frames, ridge, grid_per_knot, wall_kT, periodic, pair_search,
                progress, dihedral_damping=None) -> SplineModel:
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    n = topology.n_beads
    pos = _as_array("positions", positions, (n, 3))
    frc = _as_array("forces", forces, (n, 3))
    if frc.shape != pos.shape:
        raise EnpcgError(f"fit_spline: forces must match positions {pos.shape}; you supplied {frc.shape}")
    n_frames = pos.shape[0]
    if n_frames == 0:
        raise EnpcgError("fit_spline: no frames given")
    if box is not None:
        box = _as_array("box", box, (3, 3))
        if box.shape[0] != n_frames:
            raise EnpcgError(f"fit_spline: box must be shape ({n_frames}, 3, 3); you supplied {box.shape}")
    if periodic is None:
        periodic = box is not None
    if periodic and box is None:
        raise EnpcgError("fit_spline: periodic=True needs box vectors; pass box (n_frames, 3, 3) nm")
    if not periodic:
        box = None
    cutoff = float(cutoff)
    if periodic:
        widths = np.min(np.abs(box[:, [0, 1, 2], [0, 1, 2]]), axis=0)
        if cutoff > 0.5 * widths.min() + 1e-12:
            raise EnpcgError(f"fit_spline: cutoff {cutoff} nm exceeds half the smallest box width "
                             f"{0.5 * widths.min():.4g} nm; lower the cutoff")
    for name, val in (("pair_knots", pair_knots), ("bond_knots", bond_knots), ("angle_knots", angle_knots),
                      ("dihedral_knots", dihedral_knots), ("grid_per_knot", grid_per_knot)):
        if int(val) < (3 if name == "dihedral_knots" else 1):
            raise EnpcgError(f"fit_spline: {name} must be a positive integer (>= 3 for dihedrals); received {val}")
    kT = KB * float(temperature)
    damping = -1.0 if dihedral_damping is None else float(dihedral_damping)
    if dihedral_damping is not None and not 0.0 < damping < math.pi:
        raise EnpcgError(f"fit_spline: dihedral_damping must be an angle in (0, pi) rad or None; received "
                         f"{dihedral_damping}")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    f64 = torch.float64
    # Under torchrun every rank takes a contiguous share of the frames; the sums below are all-reduced.
    if distributed.init_from_env(dev):
        dev = distributed.local_device(dev)
        mine = distributed.shard(np.arange(n_frames))
        pos, frc = pos[mine], frc[mine]
        box = None if box is None else box[mine]
    n_total, n_frames = n_frames, pos.shape[0]

    # Term index tensors.
    excluded = torch.as_tensor(topology.excluded_pairs())
    pair_names = topology.pair_type_names()
    search = PairSearch(n, cutoff, pair_search)
    excluded_matrix = torch.zeros((n, n), dtype=torch.bool, device=dev)
    if excluded.numel():
        ex = excluded.to(dev)
        excluded_matrix[ex[:, 0], ex[:, 1]] = True
    bead_type = torch.as_tensor(topology.type_index()).to(dev)
    pair_type_matrix = torch.as_tensor(topology.pair_type_matrix()).to(dev)
    terms = {fam: (torch.as_tensor(getattr(topology, fam)).to(dev),
                   torch.as_tensor(topology.term_type_index(fam)).reshape(-1).to(dev),
                   topology.term_type_names(fam)) for fam in ("bonds", "angles", "dihedrals")}

    def make_batches(size):
        size = max(1, min(n_frames, int(size)))
        return [(s, min(s + size, n_frames)) for s in range(0, n_frames, size)]

    # A batch holds the geometry of its pairs (about 60 per bead) and terms.
    n_terms = sum(int(t[0].shape[0]) * t[0].shape[1] for t in terms.values())
    batches = make_batches(batch_frames or 2e6 / (60 * n + 4 * n_terms + 1))

    def load(s, e):
        x = torch.tensor(pos[s:e], dtype=f64, device=dev)
        b = None if box is None else torch.tensor(box[s:e], dtype=f64, device=dev)
        return x, b

    def instances(x, b, need_grad=True):
        """Yield (family, frame, atoms, type, coordinate, gradient) for every term family in one batch."""
        if pair_names:
            yield ("pairs",) + _pair_instances(x, b, excluded_matrix, pair_type_matrix, bead_type, cutoff,
                                               search)
        for fam, (idx, typ, names) in terms.items():
            if idx.shape[0]:
                yield (fam,) + _bonded_instances(x, b, idx, typ, fam, need_grad, damping)

    # Pass 1: sampled ranges of every term type. The term geometry of each batch is kept for pass 2 while it
    # fits in CACHE_BYTES, so pass 2 need not search the pairs again.
    fam_types = {"pairs": pair_names, **{fam: t[2] for fam, t in terms.items()}}
    lo_seen = {fam: torch.full((len(v),), math.inf, dtype=f64, device=dev) for fam, v in fam_types.items()}
    hi_seen = {fam: torch.full((len(v),), -math.inf, dtype=f64, device=dev) for fam, v in fam_types.items()}
    counts = {fam: torch.zeros(len(v), dtype=f64, device=dev) for fam, v in fam_types.items()}
    cache, cache_bytes = [], 0
    for s, e in tqdm(batches, desc="MS-CG ranges", disable=not progress, leave=False):
        found = list(instances(*load(s, e), need_grad=cache is not None))
        for fam, _f, _a, typ, c, _g in found:
            lo_seen[fam].scatter_reduce_(0, typ, c, "amin")
            hi_seen[fam].scatter_reduce_(0, typ, c, "amax")
            counts[fam].index_add_(0, typ, torch.ones_like(c))
        if cache is not None:
            cache_bytes += sum(t.numel() * t.element_size() for item in found for t in item[1:])
            if cache_bytes <= CACHE_BYTES:
                cache.append(found)
            else:
                cache = None
    for fam in fam_types:  # ranges and counts over every rank's frames
        distributed.all_reduce(lo_seen[fam], "min")
        distributed.all_reduce(hi_seen[fam], "max")
        distributed.all_reduce(counts[fam], "sum")

    blocks = []
    knots = {"pairs": pair_knots, "bonds": bond_knots, "angles": angle_knots, "dihedrals": dihedral_knots}
    offset = 0
    for fam, names in fam_types.items():
        for i, key in enumerate(names):
            if counts[fam][i] == 0:
                where = f"within the cutoff {cutoff} nm" if fam == "pairs" else "in the topology"
                raise EnpcgError(f"fit_spline: no samples of {fam} type {key!r} {where}; remove that type "
                                 "from the topology or give frames that sample it")
            blk = _make_block(fam, key, float(lo_seen[fam][i]), float(hi_seen[fam][i]), int(knots[fam]),
                              int(grid_per_knot), cutoff)
            blk.offset = offset
            offset += blk.n_coef
            blocks.append(blk)
    n_coef = offset
    block_of = {fam: [b for b in blocks if b.family == fam] for fam in fam_types}

    # Pass 2: normal equations.
    ata = torch.zeros((n_coef, n_coef), dtype=f64, device=dev)
    atb = torch.zeros(n_coef, dtype=f64, device=dev)
    btb = 0.0
    # The design matrix of a sub-batch is kept near DESIGN_ENTRIES doubles so the scattered additions stay in
    # the CPU cache (several times faster than one large matrix per batch).
    sub = max(1, int(DESIGN_ENTRIES // (3 * n * n_coef)))
    for batch, (s, e) in enumerate(tqdm(batches, desc="MS-CG normal equations", disable=not progress,
                                        leave=False)):
        found = cache[batch] if cache is not None else list(instances(*load(s, e)))
        for s2 in range(0, e - s, sub):
            e2 = min(s2 + sub, e - s)
            a = _design_matrix(found, s2, e2, n, n_coef, block_of)
            fref = torch.tensor(frc[s + s2:s + e2], dtype=f64, device=dev).reshape(-1)
            ata += a.T @ a
            atb += a.T @ fref
            btb += float(fref @ fref)
    # Sums over every rank's frames; each rank then solves the same system (no broadcast needed).
    distributed.all_reduce(ata)
    distributed.all_reduce(atb)
    (btb,) = distributed.all_reduce_floats([btb])

    # Regularisation: second differences per spline, constant mode of bonded splines, tiny ridge.
    reg = torch.zeros_like(ata)
    diag_mean = float(torch.diagonal(ata).mean()) or 1.0
    for blk in blocks:
        sl = slice(blk.offset, blk.offset + blk.n_coef)
        scale = float(torch.diagonal(ata)[sl].mean()) or diag_mean
        m = blk.n_coef
        if blk.periodic:
            d = torch.zeros((m, m), dtype=f64)
            idx = torch.arange(m)
            d[idx, idx] = -2.0
            d[idx, (idx + 1) % m] = 1.0
            d[idx, (idx - 1) % m] = 1.0
        else:
            d = torch.zeros((max(m - 2, 0), m), dtype=f64)
            idx = torch.arange(max(m - 2, 0))
            d[idx, idx] = 1.0
            d[idx, idx + 1] = -2.0
            d[idx, idx + 2] = 1.0
        r = ridge * scale * (d.T @ d) + 1e-10 * scale * torch.eye(m, dtype=f64)
        if blk.family != "pairs":
            r = r + scale * torch.ones((m, m), dtype=f64) / m ** 2
        reg[sl, sl] += r.to(dev)
    coef = torch.linalg.solve(ata + reg, atb)
    res2 = float(coef @ ata @ coef - 2.0 * coef @ atb) + btb
    residual = math.sqrt(max(res2, 0.0) / btb) if btb > 0 else 0.0
    coef = coef.cpu().numpy()

    # Tables.
    tables = {"pairs": {}, "bonds": {}, "angles": {}, "dihedrals": {}}
    info_tables = {}
    for blk in blocks:
        c = coef[blk.offset:blk.offset + blk.n_coef]
        tables[blk.family][blk.key] = _tabulate(blk, c, kT, wall_kT, shift=damping <= 0)
        info_tables[f"{blk.family}:{blk.key}"] = {
            "sampled_min": blk.sampled[0], "sampled_max": blk.sampled[1], "knot_min": blk.lo, "knot_max": blk.hi,
            "knot_spacing": blk.h, "n_samples": int(counts[blk.family][fam_types[blk.family].index(blk.key)])}
    model = SplineModel(topology, periodic=bool(periodic), cutoff=cutoff, **tables,
                        dihedral_damping=None if damping <= 0 else damping).double()
    elapsed = time.perf_counter() - t_start
    model.fit_info = {"method": "MS-CG force matching, cubic B-splines", "force_residual": residual,
                      "n_frames": n_total, "n_coefficients": n_coef, "ridge": ridge, "time_s": elapsed,
                      "device": str(dev), "pair_search": "vesin" if search.vesin is not None else "dense",
                      "batch_frames": batches[0][1] - batches[0][0] if batches else 0,
                      "ranks": distributed.world_size(),
                      "geometry_cached": cache is not None, "tables": info_tables}
    log.info("MS-CG fit: %d frames, %d coefficients, force residual %.4f, %.1f s", n_total, n_coef, residual,
             elapsed)
    return model


def _make_block(family, key, xmin, xmax, n_knots, per_knot, cutoff) -> _Block:
    """Knots on the table grid: spacing h = per_knot * grid, covering the sampled range [xmin, xmax]."""
    if family == "dihedrals":
        h = 2.0 * math.pi / n_knots
        return _Block(family, key, -math.pi, h, n_knots, True, n_knots, sampled=(xmin, xmax), grid=h / per_knot,
                      table_lo=-math.pi, table_hi=math.pi)
    width = max(xmax - xmin, 1e-3 if family != "angles" else 1e-2)
    if family == "pairs":
        # Grid from 0 to the cutoff; knots end exactly at the cutoff.
        n_grid = max(int(math.ceil(cutoff / (width / n_knots / per_knot))), per_knot)
        g = cutoff / n_grid
        h = per_knot * g
        n_int = min(int(math.ceil((cutoff - xmin) / h - 1e-9)), n_grid // per_knot)
        n_int = max(n_int, 1)
        return _Block(family, key, cutoff - n_int * h, h, n_int, False, n_int, sampled=(xmin, xmax), grid=g,
                      table_lo=0.0, table_hi=cutoff)
    if family == "angles":
        n_grid = max(int(math.ceil(math.pi / (width / n_knots / per_knot))), per_knot)
        g = math.pi / n_grid
    else:
        g = width / n_knots / per_knot
    h = per_knot * g
    lo = math.floor(xmin / g + 1e-9) * g
    n_int = max(int(math.ceil((xmax - lo) / h - 1e-9)), 1)
    hi = lo + n_int * h
    table_hi = math.pi if family == "angles" else g * math.ceil(2.0 * hi / g - 1e-9)
    return _Block(family, key, lo, h, n_int, False, n_int + 3, sampled=(xmin, xmax), grid=g, table_lo=0.0,
                  table_hi=table_hi)


def _tabulate(blk: _Block, coef: np.ndarray, kT: float, wall_kT: float, shift: bool = True) -> dict:
    """Table {"min", "max", "values"} of the fitted spline on its grid, with walls outside [lo, hi].
    ``shift=False`` keeps a periodic (dihedral) table's constant, which damped dihedrals need (w times a
    constant has forces)."""
    n_pts = int(round((blk.table_hi - blk.table_lo) / blk.grid)) + 1
    x = blk.table_lo + blk.grid * np.arange(n_pts)
    if blk.periodic:
        e, _, _ = _spline_values(blk, coef, x[:-1])
        if shift:
            e = e - e.min()
        return {"min": blk.table_lo, "max": blk.table_hi, "values": np.append(e, e[0])}
    hi = min(blk.hi, blk.table_hi)
    inside = (x >= blk.lo - 1e-12) & (x <= hi + 1e-12)
    values = np.zeros(n_pts)
    values[inside], _, _ = _spline_values(blk, coef, np.clip(x[inside], blk.lo, blk.hi - 1e-12 * blk.h))
    width = 0.1 if blk.family == "pairs" else max(blk.sampled[1] - blk.sampled[0], blk.h)
    k_wall = wall_kT * kT / width ** 2
    edges = [(blk.lo, x < blk.lo, -1.0)]  # (edge, points beyond it, outward direction)
    if blk.family != "pairs":
        edges.append((hi, x > hi, 1.0))
    for edge, mask, outward in edges:
        if not mask.any():
            continue
        e0, d1, d2 = (v[0] for v in _spline_values(blk, coef, np.array([min(max(edge, blk.lo),
                                                                                blk.hi - 1e-12 * blk.h)])))
        dx = x[mask] - edge
        # The wall must rise outward: a slope that falls outward (a noisy fit near the edge of sparse data)
        # would make a well beyond the sampled range, where a CG run then collapses (seen: bond tables at
        # -3,100 kJ/mol past the range from 30 frames). Clip it to zero: E stays continuous, F may kink.
        d1 = outward * max(outward * d1, 0.0)
        # Curvature k_wall, not the spline's own at the edge: the last knot interval holds the few most extreme
        # samples and its curvature is the least determined number of the fit (seen: bond walls of 1.3e6
        # kJ/mol/nm^2 from 24 frames, omega dt = 2.1 at 10 fs, past the integrator's limit of 2: the run heats up).
        values[mask] = e0 + d1 * dx + 0.5 * k_wall * dx ** 2
    if blk.family == "pairs":
        values[-1] = 0.0  # the spline and its first two derivatives vanish at the cutoff
    else:
        s = (x >= blk.sampled[0]) & (x <= blk.sampled[1])
        values = values - (values[s].min() if s.any() else values.min())
    return {"min": blk.table_lo, "max": blk.table_hi, "values": values}
