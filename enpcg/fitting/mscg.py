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

Assembly (CPU timings on the demo, 200 frames x 252 beads, 1.3 M pairs; see bench/votca_fmatch.py): pass 1
finds the pairs (:class:`PairSearch`; all pairs screened in float32 for small dense boxes) and the sampled
ranges, keeping the pairs compactly (:class:`_PairList`); pass 2 recomputes the pair geometry a few frames at
a time, scatters every term's 3 x 4 entries of the design matrix into a reused buffer in cache-sized chunks
(:func:`_scatter_terms`) and adds its products to the normal equations (:class:`_NormalEquations`). Fresh
memory was slow to fill on the development machine, so large temporaries are avoided or reused.

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
from ..geometry import bond_angles, dihedral_angles, minimum_image, pair_vectors
from ..models.spline import SplineModel, dihedral_damping as _damping
from . import distributed

KB = 0.008314462618  # kJ/mol/K
CACHE_BYTES = 2 ** 30  # term geometry kept between the two passes (bytes)
DESIGN_ENTRIES = 1e6  # doubles in the design matrix of one sub-batch
SCATTER_CHUNK = 2048  # term instances per chunk of the design-matrix scatter
SCATTER_ENTRIES = 2 ** 17  # design-matrix entries per scatter call (values and indices: 2 MiB)
DENSE_FILL = 0.125  # PairSearch "auto": all pairs when the cutoff sphere fills this much of the box ...
DENSE_MAX_BEADS = 4000  # ... and the system has at most this many beads
DENSE_ENTRIES = 2 ** 18  # pairs (i, j) per step of the all-pairs search, both triangles counted
DENSE_TILE = 2 ** 16  # pairs per float32 tile of the all-pairs search (256 KiB)
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
    offset: int = 0      # first column in the normal equations (free coefficients only)
    col: int = 0         # first column in the design matrix (every coefficient, see n_cols)
    sampled: tuple = (0.0, 0.0)  # sampled range of x
    grid: float = 0.0    # table grid spacing (divides h)
    table_lo: float = 0.0
    table_hi: float = 0.0

    @property
    def hi(self) -> float:
        return self.lo + self.n_int * self.h

    @property
    def n_cols(self) -> int:
        """Design-matrix columns of the spline: the n_int + 3 coefficients that the 4 active ones of any
        interval j (j .. j + 3) can reach, before the periodic wrap (column n_int + k is coefficient k) and
        without dropping the 3 pair coefficients past the cutoff (zero)."""
        return self.n_int + 3

    def column_coefficients(self) -> list:
        """Free coefficient (relative to the block) of each design-matrix column, or None (a zero one)."""
        if self.periodic:
            return [k % self.n_int for k in range(self.n_cols)]
        return [k if k < self.n_coef else None for k in range(self.n_cols)]


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


def _basis_slopes(u, h: float):
    """dB/dx of the 4 active B-splines at local coordinates u (Q,) for knot spacing h: (4, Q), 1/nm or 1/rad
    (:func:`_basis_derivative` / h, written row by row without a stack)."""
    out = torch.empty((4,) + u.shape, dtype=u.dtype, device=u.device)
    v = 1.0 - u
    torch.mul(v, v, out=out[0]).mul_(-0.5 / h)                       # -v^2 / 2
    u2 = torch.mul(u, u, out=out[3])
    torch.mul(u, -2.0 / h, out=out[1]).add_(u2, alpha=1.5 / h)       # (3 u^2 / 2 - 2 u)
    torch.mul(u, 1.0 / h, out=out[2]).add_(u2, alpha=-1.5 / h).add_(0.5 / h)   # (-3 u^2 / 2 + u + 1/2)
    out[3].mul_(0.5 / h)                                             # u^2 / 2
    return out


def _interval(block: _Block, x):
    """Local coordinate u in [0, 1] (x's dtype) and interval index j (int64) of x: the active coefficients
    are design-matrix columns j .. j + 3 of the block (see :attr:`_Block.n_cols`)."""
    t = (x - block.lo) / block.h
    if block.periodic:
        t = torch.remainder(t, float(block.n_int))
    j = torch.clamp(torch.floor(t), 0, block.n_int - 1)
    return t - j, j.to(torch.int64)


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
def _orthorhombic(box) -> bool:
    """True when every box (3, 3) or (B, 3, 3), nm, is a rectangular box (zero off-diagonal entries)."""
    off = box - torch.diag_embed(torch.diagonal(box, dim1=-2, dim2=-1))
    return not bool(off.any())


def _pair_vectors(x: np.ndarray, lengths: Optional[np.ndarray], boxes: Optional[np.ndarray], frame, i, j):
    """Minimum-image vectors r_j - r_i, (3, P) nm, of pairs (frame, i, j) of frames x (F, n, 3) nm.

    lengths : (F, 3) nm edges of rectangular boxes, or None; boxes : (F, 3, 3) nm triclinic boxes (used when
    lengths is None), or None for no periodicity. The same arithmetic as :func:`enpcg.geometry.minimum_image`
    (bit for bit for rectangular boxes), with one coordinate per row: numpy's 1-D gathers ran 3-10x faster
    than torch's indexing on one CPU thread.
    """
    nf, n = x.shape[:2]
    xt = np.ascontiguousarray(x.transpose(2, 0, 1)).reshape(3, nf * n)                 # (3, F n)
    d = np.take(xt, frame * n + j, axis=1) - np.take(xt, frame * n + i, axis=1)
    if lengths is not None:
        lf = np.take(np.ascontiguousarray(lengths.T), frame, axis=1)
        d -= lf * np.round(d / lf)
    elif boxes is not None:
        d = minimum_image(torch.from_numpy(d.T).unsqueeze(1), torch.from_numpy(boxes[frame])).squeeze(1).T.numpy()
    return d


def _within(frame, i, j, d, cutoff: float):
    """The pairs with r < cutoff: (frame, i, j, d (3, P) nm, r (P,) nm), from the same arrays of candidates."""
    r = np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
    keep = r < cutoff
    if not keep.all():
        keep = np.flatnonzero(keep)  # gathers by index: several times faster than boolean masks here
        frame, i, j, d, r = frame.take(keep), i.take(keep), j.take(keep), d.take(keep, axis=1), r.take(keep)
    return frame, i, j, d, r


def _row_tiles(n: int, frames: int, entries: int) -> list:
    """Row ranges [r0, r1) of the upper triangle of an n x n pair matrix (columns r0..n-1), each about
    ``entries`` / ``frames`` pairs: together 1/2 to 2/3 of the full matrix."""
    tiles, r0 = [], 0
    while r0 < n:
        r1 = min(n, r0 + max(1, entries // (frames * (n - r0))))
        tiles.append((r0, r1))
        r0 = r1
    return tiles


def _dense_steps(x: np.ndarray, lengths: Optional[np.ndarray], boxes: Optional[np.ndarray], cutoff: float,
                 allowed: np.ndarray):
    """All-pairs search in numpy, a few frames at a time (about DENSE_ENTRIES pairs each): yields the pairs
    of each step as :func:`_within` (frames counted from x[0]).

    x : (B, n, 3) nm; lengths, boxes : as :func:`_pair_vectors`; allowed : (n, n) bool, True at [i, j] for
    the pairs i < j to report (not excluded).

    Rectangular boxes (or none): squared distances of the pairs i < j in float32 (row tiles of the upper
    triangle, DENSE_TILE pairs each), |dx| folded to min(|dx|, L - |dx|) per component of the wrapped
    positions, keep r^2 < (cutoff + margin)^2 with a margin of 2e-6 of the largest box edge or coordinate L
    (float32 rounds w, |dx| and L - |dx| by at most 6e-8 L each, so r is off by less than 6e-7 L); the
    candidates then get their exact float64 minimum-image vectors and r < cutoff. Triclinic boxes: float64
    minimum image of every allowed pair.
    """
    b, n = x.shape[:2]
    triclinic = lengths is None and boxes is not None
    step = max(1, int(DENSE_ENTRIES // (n * n)))
    if triclinic:
        pi, pj = np.nonzero(allowed)
    else:
        scale = float(np.abs(x).max()) if lengths is None else float(lengths.max())
        screen = np.float32((cutoff + 2e-6 * scale) ** 2)
        tiles = _row_tiles(n, min(step, b), DENSE_TILE)
        hit = np.zeros((min(step, b), n, n), dtype=bool)  # candidates [frame, i, j]; stays False below i < j
    for s in range(0, b, step):
        xs = x[s:s + step]
        nf = xs.shape[0]
        ls = None if lengths is None else lengths[s:s + step]
        if triclinic:
            f, i, j = np.repeat(np.arange(nf), len(pi)), np.tile(pi, nf), np.tile(pj, nf)
        else:
            w = xs if ls is None else xs - ls[:, None] * np.floor(xs / ls[:, None])
            w = np.ascontiguousarray(w.transpose(0, 2, 1), dtype=np.float32)              # (F, 3, n)
            l32 = None if ls is None else ls.astype(np.float32)[:, :, None, None]         # (F, 3, 1, 1)
            for r0, r1 in tiles:
                r2 = None
                for k in range(3):
                    dk = np.abs(w[:, k, None, r0:] - w[:, k, r0:r1, None])                # (F, rows, cols)
                    if l32 is not None:
                        np.minimum(dk, l32[:, k] - dk, out=dk)
                    r2 = np.square(dk, out=dk) if r2 is None else np.add(r2, np.square(dk, out=dk), out=r2)
                tile = hit[:nf, r0:r1, r0:]
                np.less(r2, screen, out=tile)
                tile &= allowed[r0:r1, r0:]
            f, rest = np.divmod(np.flatnonzero(hit[:nf]), n * n)                          # ordered by frame
            i, j = np.divmod(rest, n)
        d = _pair_vectors(xs, ls, None if boxes is None else boxes[s:s + step], f, i, j)
        frame, i, j, d, r = _within(f, i, j, d, cutoff)
        yield frame + s, i, j, d, r


def _kdtree_steps(x: np.ndarray, lengths: Optional[np.ndarray], cutoff: float, excluded: Optional[np.ndarray]):
    """scipy's cKDTree, one frame at a time: yields the pairs of each frame as :func:`_within`.

    x : (B, n, 3) nm; lengths : (B, 3) nm edges of rectangular periodic boxes, or None (no periodicity);
    excluded : flat (n * n,) bool, True at i * n + j for an excluded pair i < j, or None.
    """
    from scipy.spatial import cKDTree

    n = x.shape[1]
    for f in range(x.shape[0]):
        if lengths is None:
            tree = cKDTree(x[f])
        else:
            lf = lengths[f]
            w = x[f] - lf * np.floor(x[f] / lf)          # wrapped into [0, L], as the periodic tree needs
            tree = cKDTree(np.where(w >= lf, w - lf, w), boxsize=lf)   # round-off can give exactly L
        pairs = tree.query_pairs(cutoff, output_type="ndarray").astype(np.int64, copy=False)
        i, j = pairs[:, 0], pairs[:, 1]
        if excluded is not None:
            keep = ~excluded[i * n + j]
            i, j = i[keep], j[keep]
        frame = np.zeros(len(i), dtype=np.int64)
        d = _pair_vectors(x[f:f + 1], None if lengths is None else lengths[f:f + 1], None, frame, i, j)
        frame, i, j, d, r = _within(frame, i, j, d, cutoff)
        yield frame + f, i, j, d, r


class PairSearch:
    """Pairs within the cutoff of one frame, or of a batch of frames, each pair once.

    method : "auto", "dense", "kdtree" or "vesin".
      * "dense": all pairs, in numpy, a few frames at a time (rectangular boxes: screened in float32 with a
        margin, then exact in float64), O(n^2) per frame;
      * "kdtree": scipy's cKDTree, for rectangular periodic boxes or no box;
      * "vesin": vesin-torch's cell list (any box);
      * "auto": "dense" when the cutoff sphere fills at least DENSE_FILL of the box (or of the bounding box
        of the first frame without a box) and the system has at most DENSE_MAX_BEADS beads, else "kdtree"
        for rectangular boxes or none, else "vesin" if installed, else "dense". On the demo (252 beads,
        3.16 nm box, cutoff 1.2 nm: the sphere fills 23 % of the box), 200 frames took 0.06-0.1 s dense,
        0.12-0.18 s by k-d tree and 0.26-0.35 s by vesin.
    All run on the CPU; the results go to the frames' device. ``used`` collects the methods that ran.
    """

    def __init__(self, n: int, cutoff: float, method: str = "auto"):
        if method not in ("auto", "dense", "kdtree", "vesin"):
            raise EnpcgError(f"pair_search must be 'auto', 'dense', 'kdtree' or 'vesin'; received {method!r}")
        self.n = n
        self.cutoff = cutoff
        self.method = method
        self.used = set()
        self.vesin = None
        if method in ("auto", "vesin"):
            try:
                from vesin_torch import NeighborList
                self.vesin = NeighborList(cutoff=cutoff, full_list=False)
            except ImportError:
                if method == "vesin":
                    raise EnpcgError("pair_search='vesin' needs vesin-torch; install it with "
                                     "'pip install vesin-torch' or use pair_search='dense'") from None

    def _method_for(self, x, box) -> str:
        """The method for frames x (B, n, 3) nm with boxes (B, 3, 3) nm or None."""
        rectangular = box is None or _orthorhombic(box)
        if self.method == "kdtree" and not rectangular:
            raise EnpcgError("pair_search='kdtree' takes rectangular boxes only; use pair_search='vesin' or "
                             "'dense' (or 'auto') for triclinic boxes")
        if self.method != "auto":
            return self.method
        if rectangular and self.n <= DENSE_MAX_BEADS:
            if box is None:
                extent = (x[0].max(dim=0).values - x[0].min(dim=0).values).clamp(min=self.cutoff)
                volume = float(extent.prod())
            else:
                volume = float(torch.linalg.det(box[0]).abs())
            if 4.0 / 3.0 * math.pi * self.cutoff ** 3 >= DENSE_FILL * volume:
                return "dense"
        if rectangular:
            return "kdtree"
        return "vesin" if self.vesin is not None else "dense"

    def __call__(self, x, box):
        """x (n, 3) nm, box (3, 3) nm or None -> i (P,), j (P,), vector r_j - r_i (P, 3), on x's device."""
        found = list(self.steps(x.unsqueeze(0), None if box is None else box.unsqueeze(0)))
        _, i, j, d, _ = (np.concatenate([p[k] for p in found], axis=-1) for k in range(5))
        return tuple(torch.from_numpy(a).to(x.device) for a in (i, j, np.ascontiguousarray(d.T)))

    def steps(self, x, box, excluded=None):
        """Pairs of every frame of a batch with r < cutoff that are not excluded, a few frames at a time.

        x (B, n, 3) nm, box (B, 3, 3) nm or None (torch); excluded : (n, n) bool tensor, True at [i, j]
        (i < j) for an excluded pair, or None. Yields numpy arrays frame, i, j (P,) int64 with i < j, the
        minimum-image vectors r_j - r_i (3, P) nm and r (P,) nm, ordered by frame (counted from x[0]).
        """
        method = self._method_for(x, box)
        self.used.add(method)
        xc = x.detach().cpu().numpy()
        boxes = None if box is None else box.detach().cpu().numpy()
        rectangular = box is None or _orthorhombic(box)
        lengths = None if boxes is None or not rectangular else np.ascontiguousarray(boxes[:, [0, 1, 2], [0, 1, 2]])
        ex = None if excluded is None else excluded.detach().cpu().numpy()
        if method == "dense":
            allowed = np.triu(np.ones((self.n, self.n), dtype=bool), 1)
            if ex is not None:
                allowed &= ~ex
            yield from _dense_steps(xc, lengths, None if rectangular else boxes, self.cutoff, allowed)
        elif method == "kdtree":
            yield from _kdtree_steps(xc, lengths, self.cutoff, None if ex is None else ex.reshape(-1))
        else:
            for f in range(xc.shape[0]):
                yield self._vesin_frame(xc[f], None if boxes is None else boxes[f], f, ex)

    def _vesin_frame(self, x: np.ndarray, box: Optional[np.ndarray], f: int, excluded: Optional[np.ndarray]):
        if box is None:
            i, j, d = self.vesin.compute(torch.from_numpy(x), torch.zeros((3, 3), dtype=torch.float64), False,
                                         "ijD")
        else:
            i, j, d = self.vesin.compute(torch.from_numpy(x), torch.from_numpy(box), True, "ijD")
        i, j, d = i.numpy().astype(np.int64), j.numpy().astype(np.int64), d.numpy().T
        swap = i > j
        i, j, d = np.where(swap, j, i), np.where(swap, i, j), np.where(swap, -d, d)
        if excluded is not None:
            keep = ~excluded[i, j]
            i, j, d = i[keep], j[keep], d[:, keep]
        frame, i, j, d, r = _within(np.full(len(i), f), i, j, d, self.cutoff)
        return frame, i, j, d, r


class _PairList:
    """The non-excluded pairs within the cutoff of a batch of frames, kept compact between the two passes of
    the fit: the key i * n + j of each pair (i < j), ordered by frame, and where each frame's pairs start.
    Pass 2 recomputes their geometry from the positions (:meth:`instances`): 4-8 bytes per pair instead of
    44 for the geometry, and writing that much fresh memory took longer than computing it again.
    """

    def __init__(self, keys: np.ndarray, starts: np.ndarray, n: int):
        self.keys, self.starts, self.n = keys, starts, n   # starts: (B + 1,) first pair of each frame

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.starts.nbytes

    @classmethod
    def scan(cls, search: PairSearch, x, box, excluded, pair_type: Optional[tuple], n_types: int):
        """Search the pairs of frames x (B, n, 3) nm (box (B, 3, 3) nm or None, excluded (n, n) bool; torch).

        pair_type : (bead types (n,), pair-type matrix (T, T)), or None for one type. Returns the list and, per
        pair type, the smallest and largest r (nm) and the number of pairs ((n_types,) numpy arrays).
        """
        n, b = x.shape[1], x.shape[0]
        lo, hi, count = np.full(n_types, np.inf), np.full(n_types, -np.inf), np.zeros(n_types)
        key_type = np.int32 if n * n < 2 ** 31 else np.int64
        keys, per_frame = [], np.zeros(b, dtype=np.int64)
        for frame, i, j, _, r in search.steps(x, box, excluded):
            if len(r) == 0:
                continue
            types = None if pair_type is None else pair_type[1][pair_type[0][i], pair_type[0][j]]
            for t in range(n_types):
                rt = r if types is None else r[types == t]
                if len(rt):
                    lo[t], hi[t], count[t] = min(lo[t], rt.min()), max(hi[t], rt.max()), count[t] + len(rt)
            keys.append((i * n + j).astype(key_type))
            per_frame += np.bincount(frame, minlength=b)
        starts = np.concatenate([[0], np.cumsum(per_frame)])
        keys = np.concatenate(keys) if keys else np.zeros(0, dtype=key_type)
        return cls(keys, starts, n), lo, hi, count

    def instances(self, x: np.ndarray, lengths: Optional[np.ndarray], boxes: Optional[np.ndarray], f0: int,
                  f1: int, pair_type: Optional[tuple], device):
        """Pair instances of frames [f0, f1) of the batch, as :func:`_bonded_instances` (torch, on device):
        frame (Q,) counted from the batch's first frame, atoms (Q, 2) with i < j, type (Q,), r (Q,) nm and the
        unit vector from i to j (Q, 3) = dr/dx_j = -dr/dx_i. x : (f1 - f0, n, 3) nm, the positions of those
        frames; lengths (f1 - f0, 3) / boxes (f1 - f0, 3, 3) as :func:`_pair_vectors`."""
        keys = self.keys[self.starts[f0]:self.starts[f1]].astype(np.int64)
        frame = np.repeat(np.arange(f1 - f0), np.diff(self.starts[f0:f1 + 1]))
        i, j = np.divmod(keys, self.n)
        d = _pair_vectors(x, lengths, boxes, frame, i, j)
        r = np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
        d /= r
        types = np.zeros(len(r), dtype=np.int64) if pair_type is None else \
            pair_type[1][pair_type[0][i], pair_type[0][j]].astype(np.int64)
        out = [torch.from_numpy(a).to(device) for a in (frame + f0, np.stack([i, j]), types, r, d)]
        return out[0], out[1].T, out[2], out[3], out[4].T


def _angle_gradients(u, v):
    """d theta / d(u, v) for theta = angle between u and v (..., 3): two (..., 3) arrays, rad/nm.

    With c = u . v and s = |u x v|: d theta/du = -(v - (c / |u|^2) u) / s and d theta/dv = -(u - (c / |v|^2) v) / s.
    """
    c = (u * v).sum(-1, keepdim=True)
    s = torch.linalg.norm(torch.linalg.cross(u, v, dim=-1), dim=-1, keepdim=True)
    gu = -(v - (c / (u * u).sum(-1, keepdim=True)) * u) / s
    gv = -(u - (c / (v * v).sum(-1, keepdim=True)) * v) / s
    return gu, gv


def _dihedral_gradients(b1, b2, b3):
    """d phi / d(x0, x1, x2, x3) for the dihedral of bond vectors b1 = x1 - x0, b2 = x2 - x1, b3 = x3 - x2
    (..., 3) nm, in the convention of :func:`enpcg.geometry.dihedral_angles`: (..., 4, 3), rad/nm.

    Blondel & Karplus (1996): with m = b1 x b2, n = b2 x b3, p = b1.b2 / |b2|^2 and q = b3.b2 / |b2|^2,
    g0 = d phi/dx0 = -|b2| m / |m|^2, g3 = d phi/dx3 = |b2| n / |n|^2, d phi/dx1 = q g3 - (1 + p) g0 and
    d phi/dx2 = p g0 - (1 + q) g3.
    """
    m = torch.linalg.cross(b1, b2, dim=-1)
    n = torch.linalg.cross(b2, b3, dim=-1)
    b2_sq = (b2 * b2).sum(-1, keepdim=True)
    b2_len = torch.sqrt(b2_sq)
    g0 = -b2_len / (m * m).sum(-1, keepdim=True) * m
    g3 = b2_len / (n * n).sum(-1, keepdim=True) * n
    p = (b1 * b2).sum(-1, keepdim=True) / b2_sq
    q = (b3 * b2).sum(-1, keepdim=True) / b2_sq
    g1 = q * g3 - (p + 1.0) * g0
    g2 = p * g0 - (q + 1.0) * g3
    return torch.stack([g0, g1, g2, g3], dim=-2)


def _bonded_instances(x, box, terms, term_type, family, need_grad: bool = True, damping: float = -1.0):
    """All bonded terms of every frame: frame (Q,) int32, atoms (Q, k) int32, type (Q,), coordinate (Q,) and
    its gradient: for bonds the unit vector (Q, 3) = dr/dx_j = -dr/dx_i, else (Q, k, 3) (rad/nm). Dihedrals with
    ``damping`` > 0 (rad): (Q, 4, 3, 2), [..., 0] = w grad(phi), [..., 1] = grad(w) of the damping weight
    w = f(theta_1) f(theta_2) (:func:`enpcg.models.spline.dihedral_damping`).

    The coordinates are those of :mod:`enpcg.geometry` (bond_angles, dihedral_angles); the gradients are
    analytic (:func:`_angle_gradients`, :func:`_dihedral_gradients`, :func:`_damping_gradient`; autograd took
    2-3x longer; equal to autograd within 1e-14 relative).
    """
    b, k = x.shape[0], terms.shape[1]
    n_terms = terms.shape[0]
    if family == "bonds":  # analytic: dr/dx_j = -dr/dx_i = unit vector
        d = minimum_image(x[:, terms[:, 1]] - x[:, terms[:, 0]], box)
        c = torch.linalg.norm(d, dim=-1)
        g = d / c.unsqueeze(-1)                                      # (B, I, 3)
    elif family == "angles":
        c = bond_angles(x, terms, box)
        if need_grad:
            u = pair_vectors(x, terms[:, 1], terms[:, 0], box)       # x_i - x_j
            v = pair_vectors(x, terms[:, 1], terms[:, 2], box)       # x_k - x_j
            gu, gv = _angle_gradients(u, v)
            g = torch.stack([gu, -(gu + gv), gv], dim=-2)            # (B, I, 3, 3)
    else:
        c = dihedral_angles(x, terms, box)
        if need_grad:
            bv = [pair_vectors(x, terms[:, a], terms[:, a + 1], box) for a in range(3)]   # b1, b2, b3
            g = _dihedral_gradients(*bv)                                                # (B, I, 4, 3)
        if damping > 0:
            theta = [bond_angles(x, terms[:, a:a + 3], box) for a in (0, 1)]                  # (B, I) each
            w1, w2 = (_damping(t, damping) for t in theta)
            if need_grad:
                g = torch.stack([(w1 * w2).unsqueeze(-1).unsqueeze(-1) * g,
                                 _damping_gradient(bv, theta, (w1, w2), damping)], dim=-1)   # (B, I, 4, 3, 2)
    if family != "bonds" and not need_grad:
        shape = (b, n_terms, k, 3) + ((2,) if family == "dihedrals" and damping > 0 else ())
        g = torch.zeros(shape, dtype=x.dtype, device=x.device)
    frames = torch.arange(b, device=x.device, dtype=torch.int32).repeat_interleave(n_terms)
    g = g.reshape(b * n_terms, 3) if family == "bonds" else g.reshape((b * n_terms, k, 3) + tuple(g.shape[4:]))
    return frames, terms.to(torch.int32).repeat(b, 1), term_type.repeat(b), c.reshape(-1), g


def _damping_slope(theta, start: float):
    """df/dtheta (rad^-1) of :func:`enpcg.models.spline.dihedral_damping` f = 1 - S(t) with
    t = (theta - start) / (pi - start) clamped to [0, 1]: -30 t^2 (1 - t)^2 / (pi - start), 0 outside."""
    t = ((theta - start) / (math.pi - start)).clamp(0.0, 1.0)
    return (t * (1.0 - t)).square_().mul_(-30.0 / (math.pi - start))


def _damping_gradient(bv, theta, w, start: float):
    """grad w (B, I, 4, 3), 1/nm, of the dihedral damping weight w = f(theta_1) f(theta_2).

    bv : bond vectors (b1, b2, b3) (B, I, 3) nm of the dihedrals (x0, x1, x2, x3); theta : (theta_1, theta_2)
    (B, I) rad, the angle (x0, x1, x2) at x1 and the angle (x1, x2, x3) at x2; w : (f(theta_1), f(theta_2)).
    grad w = f'(theta_1) f(theta_2) grad theta_1 + f(theta_1) f'(theta_2) grad theta_2 (:func:`_angle_gradients`),
    computed only for the angles past ``start`` (the others have f' = 0).
    """
    b1, b2, b3 = bv
    g = torch.zeros(b1.shape[:-1] + (4, 3), dtype=b1.dtype, device=b1.device)
    for a, (u, v), th, w_other in ((0, (-b1, b2), theta[0], w[1]), (1, (-b2, b3), theta[1], w[0])):
        sel = torch.nonzero(th > start, as_tuple=True)
        if not sel[0].numel():
            continue
        df = (_damping_slope(th[sel], start) * w_other[sel]).unsqueeze(-1)
        keep = df != 0.0  # a straight angle (t = 1): zero slope, and the angle's gradient is singular there
        gu, gv = _angle_gradients(u[sel], v[sel])
        gu = torch.where(keep, gu * df, 0.0)
        gv = torch.where(keep, gv * df, 0.0)
        g[sel + (a,)] += gu
        g[sel + (a + 1,)] -= gu + gv
        g[sel + (a + 2,)] += gv
    return g


def _chunk_views(t, chunk: int) -> list:
    """Views (m, ..., C) of t (..., Q) (last axis contiguous): the m = Q // chunk full chunks of C = chunk
    terms, then the rest as one chunk of C = Q % chunk terms (if any)."""
    q = t.shape[-1]
    full = q - q % chunk
    views = [t[..., :full].unflatten(-1, (full // chunk, chunk)).movedim(-2, 0)] if full else []
    if full < q:
        views.append(t[..., full:].unsqueeze(0))
    return views


def _scatter_terms(a, start, g, db, n_cols: int, distance: bool, chunk: int, g2=None, b2=None):
    """Add Q term instances of one spline to the flat design matrix a (laid out (frame, bead, dim, col)).

    start : (k, Q) int64, index in a of each bead's (dim 0, column j) entry (j: the term's interval);
    g : (3, Q) for a distance (the unit vector e from bead i to bead j: dF_i/dc = +e B', dF_j/dc = -e B'),
    else (k, 3, Q) = d(coordinate)/d(bead position) (dF/dc = -grad B'); db : (4, Q) B-spline derivatives
    dB_{j+m}/dx, m = 0..3, in 1/nm or 1/rad. The last axis of each must be contiguous. Optional g2 (k, 3, Q)
    and b2 (4, Q) (not for distances) add a second product: dF/dc = -(g db + g2 b2) (damped dihedrals:
    g = w grad(phi), db = B', g2 = grad(w), b2 = B).

    The entries (bead, dim d, column j + m) are computed and scattered a few chunks of terms at a time, laid
    out (chunk, bead, dim, column, term within the chunk) in reused buffers: the products run over contiguous
    terms (with the term as the outer axis, torch's broadcasting over 3 x 4 inner entries was 4x slower),
    they stay in the CPU cache until the scatter, and one chunk's scatter touches only the rows of its own
    few frames.
    """
    dev = a.device
    k = start.shape[0]
    entry = ((torch.arange(3, device=dev) * n_cols).unsqueeze(-1) + torch.arange(4, device=dev)).unsqueeze(-1)
    per_chunk = k * 12 * min(chunk, start.shape[1])
    group = max(1, SCATTER_ENTRIES // per_chunk)
    index_buf = torch.empty(group * per_chunk, dtype=torch.int64, device=dev)
    val_buf = torch.empty(group * per_chunk, dtype=torch.float64, device=dev)
    if distance:
        g = g.unsqueeze(0)                                                   # (1, 3, Q)
    second = g2 is not None
    views = [_chunk_views(start, chunk), _chunk_views(g, chunk), _chunk_views(db, chunk)]
    if second:
        views += [_chunk_views(g2, chunk), _chunk_views(b2, chunk)]
    for st, gg, dd, *more in zip(*views):
        m, c = st.shape[0], st.shape[-1]
        st, gg, dd = st[:, :, None, None], gg.unsqueeze(3), dd[:, None, None]   # (m,k,1,1,C) (m,kk,3,1,C) (m,1,1,4,C)
        if second:
            gg2, bb2 = more[0].unsqueeze(3), more[1][:, None, None]
        for c0 in range(0, m, group):
            c1 = min(c0 + group, m)
            shape = (c1 - c0, k, 3, 4, c)
            index = torch.add(st[c0:c1], entry, out=index_buf[:math.prod(shape)].view(shape))
            val = val_buf[:math.prod(shape)].view(shape)
            if distance:
                torch.mul(gg[c0:c1, 0], dd[c0:c1, 0], out=val[:, 0])
                torch.neg(val[:, 0], out=val[:, 1])
            elif second:
                torch.mul(gg[c0:c1], dd[c0:c1], out=val).addcmul_(gg2[c0:c1], bb2[c0:c1]).neg_()
            else:
                torch.mul(gg[c0:c1], dd[c0:c1], out=val).neg_()
            a.scatter_add_(0, index.view(-1), val.view(-1))


def _design_matrix(found, f0, f1, n, n_cols, block_of, chunk: int = SCATTER_CHUNK, out=None):
    """Rows of A for frames [f0, f1) of a batch: (nb * n * 3, n_cols), A = dF/dc (kJ/mol/nm per coefficient),
    rows ordered (frame, bead, dim).

    The columns are every spline's design-matrix columns (``_Block.col``, ``_Block.n_cols``: each term's 4
    active coefficients are 4 consecutive columns); :func:`_column_map` maps them onto the free coefficients.
    found : term instances of the batch (family, frame, atoms, type, coordinate, gradient), sorted by frame.
    out : optional float64 buffer of at least nb * n * 3 * n_cols entries to build A in (reused between calls:
    fresh memory is slow to fill). Each term type is added by :func:`_scatter_terms`.
    """
    nb = f1 - f0
    dev = found[0][1].device if found else "cpu"
    size = nb * n * 3 * n_cols                                                # laid out (frame, bead, dim, col)
    a = torch.zeros(size, dtype=torch.float64, device=dev) if out is None else out[:size].zero_()
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
            if c_t.shape[0] == 0:
                continue
            u, j = _interval(blk, c_t)
            db = _basis_slopes(u, blk.h)                                                    # (4, Q)
            start = ((frame_t.to(torch.int64) - f0) * n).unsqueeze(0) + atoms_t.T.to(torch.int64)
            start = start * (3 * n_cols) + (j + blk.col)                                     # (k, Q)
            distance = blk.family in ("pairs", "bonds")
            # grad: (Q, 3) unit vectors for distances, else (Q, k, 3); as (3, Q) or (k, 3, Q). Damped dihedrals
            # (Q, k, 3, 2): d(w B_k(phi)) = w B_k' grad(phi) + B_k grad(w), as (2, k, 3, Q) with the values B.
            damped = grad_t.dim() == 4
            g = grad_t.T if distance else grad_t.permute(3, 1, 2, 0) if damped else grad_t.permute(1, 2, 0)
            if g.stride(-1) != 1 or (damped and not g.is_contiguous()):
                g = g.contiguous()
            if damped:
                _scatter_terms(a, start, g[0], db, n_cols, distance, chunk, g[1], _basis(u).T.contiguous())
            else:
                _scatter_terms(a, start, g, db, n_cols, distance, chunk)
    return a.view(nb * n * 3, n_cols)


def _column_map(blocks, n_cols: int, n_coef: int, device) -> torch.Tensor:
    """(n_cols, n_coef) 0/1 matrix P from design-matrix columns to free coefficients: A_free = A P, so the
    normal equations of the free coefficients are P^T (A^T A) P and P^T (A^T F)."""
    p = torch.zeros((n_cols, n_coef), dtype=torch.float64)
    for blk in blocks:
        for k, coef in enumerate(blk.column_coefficients()):
            if coef is not None:
                p[blk.col + k, blk.offset + coef] = 1.0
    return p.to(device)


class _NormalEquations:
    """Running sums A^T A (n, n), A^T F (n,) and F^T F of design-matrix rows A (kJ/mol/nm per coefficient)
    and reference forces F (kJ/mol/nm), in float64.

    On the CPU the products go through numpy (OpenBLAS): for the tall, narrow matrices here (~10^4 x 10^2)
    it was twice as fast as torch's matmul (MKL) on the development machine (AMD EPYC); on other devices torch.
    """

    def __init__(self, n: int, device):
        self.device = torch.device(device)
        self.cpu = self.device.type == "cpu"
        if self.cpu:
            self.ata, self.atb = np.zeros((n, n)), np.zeros(n)
        else:
            self.ata = torch.zeros((n, n), dtype=torch.float64, device=self.device)
            self.atb = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.btb = 0.0

    def add(self, a, f: np.ndarray):
        """a : (rows, n) torch float64 on the device; f : (rows,) numpy float64."""
        if self.cpu:
            a = a.numpy()
            self.ata += a.T @ a
            self.atb += a.T @ f
        else:
            ft = torch.as_tensor(f, device=self.device)
            self.ata += a.T @ a
            self.atb += a.T @ ft
        self.btb += float(f @ f)

    def result(self):
        """A^T A, A^T F as float64 tensors on the device, and F^T F (float)."""
        if self.cpu:
            return torch.from_numpy(self.ata), torch.from_numpy(self.atb), self.btb
        return self.ata, self.atb, self.btb


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
    pair_search : "auto", "dense" (all pairs, float32 screen), "kdtree" (scipy's k-d tree, rectangular or no
        boxes) or "vesin" (vesin-torch's cell list); "auto" picks dense for small boxes filled by the cutoff
        sphere, else kdtree, else vesin for triclinic boxes; see :class:`PairSearch` (all on the CPU)
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
    terms = {fam: (torch.as_tensor(getattr(topology, fam)).to(dev),
                   torch.as_tensor(topology.term_type_index(fam)).reshape(-1).to(dev),
                   topology.term_type_names(fam)) for fam in ("bonds", "angles", "dihedrals")}

    def make_batches(size):
        size = max(1, min(n_frames, int(size)))
        return [(s, min(s + size, n_frames)) for s in range(0, n_frames, size)]

    # A batch holds the geometry of its pairs (about 60 per bead) and terms.
    n_terms = sum(int(t[0].shape[0]) * t[0].shape[1] for t in terms.values())
    batches = make_batches(batch_frames or 2e6 / (60 * n + 4 * n_terms + 1))
    # Boxes for the pair geometry (numpy): rectangular edges, or triclinic boxes, or none.
    rectangular = box is None or not np.any(box - np.einsum("fi,ij->fij", box[:, [0, 1, 2], [0, 1, 2]], np.eye(3)))
    lengths = None if box is None or not rectangular else np.ascontiguousarray(box[:, [0, 1, 2], [0, 1, 2]])
    boxes = None if box is None or rectangular else box
    # Pair type of beads i, j: type_matrix[bead_type[i], bead_type[j]] (None: one pair type).
    pair_type = None if len(pair_names) <= 1 else (np.asarray(topology.type_index()),
                                                     np.asarray(topology.pair_type_matrix()))

    def load(s, e):
        x = torch.tensor(pos[s:e], dtype=f64, device=dev)
        b = None if box is None else torch.tensor(box[s:e], dtype=f64, device=dev)
        return x, b

    def bonded(x, b, need_grad=True):
        """(family, frame, atoms, type, coordinate, gradient) of every bonded family in one batch."""
        return [(fam,) + _bonded_instances(x, b, idx, typ, fam, need_grad, damping)
                for fam, (idx, typ, names) in terms.items() if idx.shape[0]]

    def scan_pairs(x, b):
        """(_PairList, lo, hi, count) of one batch, or None without pair types."""
        if not pair_names:
            return None
        return _PairList.scan(search, x, b, excluded_matrix, pair_type, len(pair_names))

    # Pass 1: sampled ranges of every term type. The pairs of each batch (compact, _PairList) and the bonded
    # geometry are kept for pass 2 while they fit in CACHE_BYTES, so pass 2 need not search the pairs again.
    fam_types = {"pairs": pair_names, **{fam: t[2] for fam, t in terms.items()}}
    lo_seen = {fam: torch.full((len(v),), math.inf, dtype=f64, device=dev) for fam, v in fam_types.items()}
    hi_seen = {fam: torch.full((len(v),), -math.inf, dtype=f64, device=dev) for fam, v in fam_types.items()}
    counts = {fam: torch.zeros(len(v), dtype=f64, device=dev) for fam, v in fam_types.items()}
    cache, cache_bytes = [], 0
    for s, e in tqdm(batches, desc="MS-CG ranges", disable=not progress, leave=False):
        x, b = load(s, e)
        found = bonded(x, b, need_grad=cache is not None)
        for fam, _f, _a, typ, c, _g in found:
            lo_seen[fam].scatter_reduce_(0, typ, c, "amin")
            hi_seen[fam].scatter_reduce_(0, typ, c, "amax")
            counts[fam].index_add_(0, typ, torch.ones_like(c))
        pairs = scan_pairs(x, b)
        if pairs is not None:
            pairs, lo, hi, count = pairs
            lo_seen["pairs"] = torch.minimum(lo_seen["pairs"], torch.as_tensor(lo, device=dev))
            hi_seen["pairs"] = torch.maximum(hi_seen["pairs"], torch.as_tensor(hi, device=dev))
            counts["pairs"] += torch.as_tensor(count, device=dev)
        if cache is not None:
            cache_bytes += sum(t.numel() * t.element_size() for item in found for t in item[1:])
            cache_bytes += 0 if pairs is None else pairs.nbytes
            if cache_bytes <= CACHE_BYTES:
                cache.append((pairs, found))
            else:
                cache = None
    for fam in fam_types:  # ranges and counts over every rank's frames
        distributed.all_reduce(lo_seen[fam], "min")
        distributed.all_reduce(hi_seen[fam], "max")
        distributed.all_reduce(counts[fam], "sum")

    blocks = []
    knots = {"pairs": pair_knots, "bonds": bond_knots, "angles": angle_knots, "dihedrals": dihedral_knots}
    offset = col = 0
    for fam, names in fam_types.items():
        for i, key in enumerate(names):
            if counts[fam][i] == 0:
                where = f"within the cutoff {cutoff} nm" if fam == "pairs" else "in the topology"
                raise EnpcgError(f"fit_spline: no samples of {fam} type {key!r} {where}; remove that type "
                                 "from the topology or give frames that sample it")
            blk = _make_block(fam, key, float(lo_seen[fam][i]), float(hi_seen[fam][i]), int(knots[fam]),
                              int(grid_per_knot), cutoff)
            blk.offset, blk.col = offset, col
            offset += blk.n_coef
            col += blk.n_cols
            blocks.append(blk)
    n_coef = offset
    block_of = {fam: [b for b in blocks if b.family == fam] for fam in fam_types}

    # Pass 2: normal equations over the design-matrix columns (n_cols), then restricted to the free ones.
    n_cols = col
    normal = _NormalEquations(n_cols, dev)
    # The design matrix of a sub-batch is kept near DESIGN_ENTRIES doubles so the scattered additions stay in
    # the CPU cache (several times faster than one large matrix per batch).
    sub = max(1, int(DESIGN_ENTRIES // (3 * n * n_cols)))
    design = torch.empty(min(sub, n_frames) * n * 3 * n_cols, dtype=f64, device=dev)
    for batch, (s, e) in enumerate(tqdm(batches, desc="MS-CG normal equations", disable=not progress,
                                        leave=False)):
        if cache is not None:
            pairs, found = cache[batch]
        else:
            x, b = load(s, e)
            found = bonded(x, b)
            pairs = scan_pairs(x, b)
            pairs = None if pairs is None else pairs[0]
        for s2 in range(0, e - s, sub):
            e2 = min(s2 + sub, e - s)
            terms_now = found
            if pairs is not None:  # the pair geometry of these frames, recomputed
                g0, g1 = s + s2, s + e2
                terms_now = [("pairs",) + pairs.instances(
                    pos[g0:g1], None if lengths is None else lengths[g0:g1],
                    None if boxes is None else boxes[g0:g1], s2, e2, pair_type, dev)] + found
            normal.add(_design_matrix(terms_now, s2, e2, n, n_cols, block_of, out=design),
                       frc[s + s2:s + e2].reshape(-1))
    ata, atb, btb = normal.result()
    fold = _column_map(blocks, n_cols, n_coef, dev)
    ata, atb = fold.T @ ata @ fold, fold.T @ atb
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
                      "device": str(dev), "pair_search": "+".join(sorted(search.used)) or search.method,
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
