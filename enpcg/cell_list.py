"""Fixed-shape cell-list neighbour search in pure torch, capturable by CUDA graphs.

Purpose: the half neighbour list (each pair once, i < j) of n particles within a cutoff in a periodic box,
for CG models exported as OpenMM TorchForces with ``useCUDAGraphs``. A captured graph replays the same
kernels on the same memory, so the search must

* give outputs whose shapes depend only on construction-time numbers (n, cell grid, capacities), never on
  the positions;
* never synchronise with the host: no ``.item()``, ``nonzero``, boolean-mask indexing, ``torch.unique``,
  unsized ``bincount``, ``.cpu()``, and no Python branch on a tensor value;
* keep every tensor on the positions' device;
* compile with ``torch.jit.script`` (a TorchForce is a TorchScript module).

Method: fractional coordinates s = r inverse(box), wrapped into [0, 1), are binned into n_x n_y n_z cells,
n_k = floor(perpendicular box width_k / cutoff) fixed from a reference box. Particles are sorted by cell
(``argsort``), cell counts come from ``index_add_`` and start offsets from ``cumsum``, so the particles of a
cell are a contiguous range of the sorted order. Particles are taken in that (cell) order, so that
neighbouring rows read the same cells. Each scans a half shell of neighbour cells, its own cell and the 13
cells of positive offset (the other 13 see it from their side), up to ``cell_capacity`` slots each: every
pair of neighbouring cells is scanned once, half the candidates of a 27-cell scan. It keeps the candidates
within the cutoff (in its own cell those of higher index only); they are compacted, in candidate order, into
one flat list of n x ``max_neighbors`` slots by a running cumulative sum and a ``scatter_`` whose
non-partners and overflowing entries land in a discarded region. Each kept pair is returned as (min, max) of
its two indices. A flat list sized on the total (an extensive number, which fluctuates little) holds far
fewer padded slots than per-particle rows sized on the fullest row: for the demo melt at 1.2 nm, 39 slots
per bead against about 27 real pairs, where rows needed 101. What does not fit (a cell with more than
``cell_capacity`` particles, more pairs than slots, a box shrunk so that a cell is narrower than the cutoff)
sets the persistent ``overflow`` buffer instead of changing a shape: the caller checks it at report time (for
example ``cell_list.overflowed()``) and, when set, rebuilds the model with ``cell_list.grown()`` (doubled
capacities) and restarts from the last good state (``openmm_plugin.simulate.run_simulation`` does this by
itself when given ``cell_lists``).

Units: positions, box, cutoff and displacements in nm. Box vectors are the rows of a (3, 3) tensor in
OpenMM's reduced form (a along x, b in the xy plane, c with positive z; triclinic allowed), for which
fractional coordinates are a triangular solve and rounding fractional differences gives the exact minimum
image of every pair closer than half the smallest perpendicular width (n_k >= 3 guarantees cutoff <= width / 3).
"""

import itertools
import math
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

# Relative margins on the selection radius: the selection uses wrapped positions, which differ from the
# unwrapped ones by rounding (about eps * box length); the margin makes sure every pair that the final,
# unwrapped displacement puts below the cutoff was selected. Pairs inside the margin are harmless extras.
_SKIN_FLOAT64 = 1e-9
_SKIN_FLOAT32 = 1e-4
# Tolerance of the "cell narrower than the cutoff" test, so that a box whose width is exactly n_k cutoffs
# (and the float32 copy of a float64 box) does not raise a false overflow.
_WIDTH_RTOL = 1e-6
# Entries after the last pair slot that absorb the writes of non-partners (spread, not one address).
_DISCARD = 4096  # a power of 2 (a bitwise and picks the entry)
# Neighbour cells each particle scans: its own and the 13 of positive offset (a half shell).
_HALF_SHELL = 14
# Default cap on candidates (particles x 14 x cell_capacity) processed at once: bounds peak memory
# (about 100 bytes per candidate in float64) without changing any output.
_CHUNK_CANDIDATES = 1 << 22


def fractional(positions: Tensor, box: Tensor) -> Tensor:
    """Fractional coordinates s with positions = s @ box, (n, 3), for a reduced-form box (lower triangular).

    A triangular solve by hand: ``torch.linalg.inv`` checks its error code on the host (a synchronisation).
    """
    z = positions[:, 2] / box[2, 2]
    y = (positions[:, 1] - z * box[2, 1]) / box[1, 1]
    x = (positions[:, 0] - z * box[2, 0] - y * box[1, 0]) / box[0, 0]
    return torch.stack([x, y, z], dim=1)


def perpendicular_widths(box: Tensor) -> Tensor:
    """Distances between opposite faces of the box, (3,): V/|b x c|, V/|c x a|, V/|a x b| (nm)."""
    a = box[0]
    b = box[1]
    c = box[2]
    bc = torch.linalg.cross(b, c, dim=-1)
    ca = torch.linalg.cross(c, a, dim=-1)
    ab = torch.linalg.cross(a, b, dim=-1)
    volume = torch.abs((a * bc).sum())
    areas = torch.stack([torch.linalg.norm(bc, dim=-1), torch.linalg.norm(ca, dim=-1),
                         torch.linalg.norm(ab, dim=-1)])
    return volume / areas


def _reference_box(box) -> np.ndarray:
    if isinstance(box, Tensor):
        box = box.detach().cpu().numpy()
    b = np.asarray(box, dtype=np.float64)
    if b.shape != (3, 3) or not np.all(np.isfinite(b)):
        raise ValueError(f"CellList: box must be a finite 3x3 matrix of box vectors (rows, nm); got shape {b.shape}")
    # The upper triangle must vanish (fractional coordinates are a triangular solve); rounding-level noise
    # from a float conversion is tolerated and ignored.
    upper = max(abs(b[0, 1]), abs(b[0, 2]), abs(b[1, 2]))
    if upper > 1e-9 * float(np.abs(b).max()) or min(b[0, 0], b[1, 1], b[2, 2]) <= 0.0:
        raise ValueError("CellList: box must be in OpenMM's reduced form (a = (ax, 0, 0), b = (bx, by, 0), "
                         f"c = (cx, cy, cz) with ax, by, cz > 0); got {b.tolist()}")
    return b


def _widths_np(box: np.ndarray) -> np.ndarray:
    a, b, c = box
    vol = abs(float(np.dot(a, np.cross(b, c))))
    return vol / np.array([np.linalg.norm(np.cross(b, c)), np.linalg.norm(np.cross(c, a)),
                           np.linalg.norm(np.cross(a, b))])


class CellList(torch.nn.Module):
    """Fixed-shape half neighbour list (each pair once, i < j) within ``cutoff`` nm, periodic (OpenMM box).

    n_particles : int. cutoff : float, nm. box : (3, 3) reference box (numpy or tensor, nm, rows, reduced
    form): fixes the cell grid n_k = floor(perpendicular width_k / cutoff), which must be >= 3 in every
    dimension. positions : optional (n, 3) reference positions (nm) from which the capacities are derived.
    cell_capacity : max particles per cell; max_neighbors : pair slots per particle, on average (the list
    holds n x max_neighbors pairs in all). 0 derives them: from ``positions``, the fullest cell x ``headroom``
    and the mean pairs per particle x (1 + (headroom - 1) / 2), rounded up; without positions from the mean
    density (3 x the mean cell occupancy with a Poisson margin; 1.3 x the ideal-gas pairs per particle plus a
    margin). chunk_candidates : candidates processed at once (memory bound only; outputs do not depend on it).

    ``forward(positions (n, 3), box (3, 3)) -> (i, j, d)``: i, j (P,) int64 and d (P, 3) nm with
    P = n * max_neighbors: the pairs found first (particle by particle, in candidate order), then padding,
    each pair as i = min, j = max of its indices. d is the minimum-image r_j - r_i, differentiable w.r.t.
    positions and box. Padded slot s has i = j = s mod n and d = (2 cutoff, 0, 0) without gradient, so a
    pair energy that vanishes beyond the cutoff gives zero for them. Real entries include every pair closer
    than the cutoff and possibly a few pairs within a rounding margin beyond it: callers mask by r < cutoff.

    ``overflow`` (int64 buffer (1,)) is set to 1, never reset, by a forward call that lost pairs or could
    have: a cell holding more than ``cell_capacity`` particles, more than n x ``max_neighbors`` pairs, or a
    box shrunk so that a cell is narrower than the cutoff. Check it at report time with
    :meth:`overflowed`; rebuild with :meth:`grown` (doubled capacities) and restart from the last good state;
    :meth:`reset_overflow` clears it.
    """

    chunk_starts: List[int]
    chunk_sizes: List[int]

    def __init__(self, n_particles: int, cutoff: float, box, positions=None, cell_capacity: int = 0,
                 max_neighbors: int = 0, headroom: float = 1.5, chunk_candidates: int = _CHUNK_CANDIDATES):
        super().__init__()
        n = int(n_particles)
        if n < 2:
            raise ValueError(f"CellList: n_particles must be >= 2; got {n}")
        cutoff = float(cutoff)
        if not cutoff > 0.0:
            raise ValueError(f"CellList: cutoff must be positive (nm); got {cutoff}")
        if not headroom >= 1.0:
            raise ValueError(f"CellList: headroom must be >= 1; got {headroom}")
        ref_box = _reference_box(box)
        widths = _widths_np(ref_box)
        # The 1e-10 lets a width of exactly k cutoffs (up to rounding) give k cells.
        grid = [int(math.floor(w / cutoff * (1.0 + 1e-10))) for w in widths]
        if min(grid) < 3:
            raise ValueError(
                f"CellList: box too small for a cell list: perpendicular widths {np.round(widths, 6).tolist()} nm "
                f"hold {grid} cells of at least the cutoff {cutoff} nm per dimension, and a cell list needs >= 3 in "
                "every dimension (27 distinct neighbour cells); use the dense pair list for this system")
        self.n_particles = n
        self.cutoff = cutoff
        self.headroom = float(headroom)
        self.chunk_candidates = int(chunk_candidates)
        self.r2_select_f64 = (cutoff * (1.0 + _SKIN_FLOAT64)) ** 2
        self.r2_select_f32 = (cutoff * (1.0 + _SKIN_FLOAT32)) ** 2
        self.ref_box: List[List[float]] = ref_box.tolist()
        self.nx, self.ny, self.nz = grid
        self.n_cells = grid[0] * grid[1] * grid[2]

        # Neighbour-cell table: for each cell (id = (x * ny + y) * nz + z) its half shell (itself first, then
        # the 13 offsets after (0, 0, 0) in lexicographic order) after periodic wrap, and the lattice shift (in
        # box vectors) that takes a particle of the wrapped neighbour cell to the image adjacent to the home
        # cell. With >= 3 cells per dimension the 27 offsets reach 27 distinct cells, so each unordered pair of
        # neighbouring cells is in exactly one half shell.
        g = np.array(grid)
        cx, cy, cz = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), np.arange(grid[2]), indexing="ij")
        home = np.stack([cx.ravel(), cy.ravel(), cz.ravel()], axis=1)  # (n_cells, 3) in cell-id order
        offsets = np.array(list(itertools.product((-1, 0, 1), repeat=3)))[13:]  # (14, 3): (0, 0, 0) first
        unwrapped = home[:, None, :] + offsets[None, :, :]
        wrapped = np.mod(unwrapped, g)
        nbr = (wrapped[..., 0] * grid[1] + wrapped[..., 1]) * grid[2] + wrapped[..., 2]
        shift = (unwrapped - wrapped) // g
        self.register_buffer("nbr_cells", torch.as_tensor(nbr, dtype=torch.int64), persistent=False)
        self.register_buffer("nbr_shift", torch.as_tensor(shift, dtype=torch.float64), persistent=False)
        self.register_buffer("grid_sizes", torch.as_tensor(g, dtype=torch.float64), persistent=False)
        # Smallest allowed perpendicular widths (n_k cutoffs), compared with the current box in forward.
        self.register_buffer("min_widths", torch.as_tensor(g * cutoff * (1.0 - _WIDTH_RTOL), dtype=torch.float64),
                             persistent=False)
        # Run-time state, not part of a model's weights (a state dict loads into any pair-list method).
        self.register_buffer("overflow", torch.zeros(1, dtype=torch.int64), persistent=False)

        ref_pos: Optional[Tensor] = None
        if positions is not None:
            p = np.asarray(positions.detach().cpu().numpy() if isinstance(positions, Tensor) else positions,
                           dtype=np.float64)
            if p.shape != (n, 3):
                raise ValueError(f"CellList: positions must have shape ({n}, 3); got {p.shape}")
            ref_pos = torch.as_tensor(p)
        ref_box_t = torch.as_tensor(ref_box)

        if int(cell_capacity) > 0:
            cap = int(cell_capacity)
        elif ref_pos is not None:
            counts = self._bin(ref_pos, ref_box_t)[4]
            cap = int(math.ceil(int(counts.max()) * self.headroom))
        else:
            mean = n / self.n_cells
            cap = int(math.ceil(max(3.0 * mean, mean + 5.0 * math.sqrt(mean) + 5.0)))
        self.cell_capacity = max(1, min(cap, n))

        if int(max_neighbors) > 0:
            nb = int(max_neighbors)
        elif ref_pos is not None:
            # half the headroom on a total, which fluctuates far less than the fullest cell
            nb = int(math.ceil(int(self._partner_counts(ref_pos, ref_box_t).sum()) / n
                               * (1.0 + 0.5 * (self.headroom - 1.0))))
        else:
            volume = abs(float(np.linalg.det(ref_box)))
            half = 0.5 * 4.0 / 3.0 * math.pi * cutoff ** 3 * n / volume  # pairs per particle, ideal gas
            # The total is extensive: 30 % above the ideal gas (denser regions, a barostat's compression),
            # plus a Poisson margin on the total for small systems.
            nb = int(math.ceil(1.3 * half + 5.0 * math.sqrt(half / n) + 1.0))
        self.max_neighbors = max(1, min(nb, n - 1))

        # Fixed chunks of particle rows so that rows x 14 x capacity stays under chunk_candidates.
        rows = max(1, self.chunk_candidates // (_HALF_SHELL * self.cell_capacity))
        self.chunk_starts = list(range(0, n, rows))
        self.discard = _DISCARD
        self.chunk_sizes = [min(rows, n - s) for s in self.chunk_starts]

    def extra_repr(self) -> str:
        return (f"n_particles={self.n_particles}, cutoff={self.cutoff}, grid=({self.nx}, {self.ny}, {self.nz}), "
                f"cell_capacity={self.cell_capacity}, max_neighbors={self.max_neighbors}")

    def _bin(self, pos: Tensor, box: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Detached inputs -> (s unwrapped fractional, xw wrapped Cartesian, cell id, sorted order, counts,
        start offsets)."""
        s = fractional(pos, box)
        sw = s - torch.floor(s)
        # Wrapped Cartesian positions, consistent with the cells they are binned in.
        xw = sw @ box
        # Clamp after the integer conversion: s - floor(s) can round to 1.0, and a NaN converts to garbage;
        # both must still give a valid cell id (NaN positions then simply have no partners).
        g = self.grid_sizes.to(sw.dtype)
        c = torch.floor(sw * g).to(torch.int64)
        cx = c[:, 0].clamp(0, self.nx - 1)
        cy = c[:, 1].clamp(0, self.ny - 1)
        cz = c[:, 2].clamp(0, self.nz - 1)
        cell = (cx * self.ny + cy) * self.nz + cz
        order = torch.argsort(cell, stable=True)
        counts = torch.zeros(self.n_cells, dtype=torch.int64, device=pos.device)
        counts.index_add_(0, cell, torch.ones_like(cell))
        start = torch.cumsum(counts, 0) - counts
        return s, xw, cell, order, counts, start

    def _sorted(self, xw: Tensor, order: Tensor, cap: int) -> Tuple[Tensor, Tensor]:
        """(order_ext (n + cap,), xs (3, n + cap)): particle index and wrapped coordinates in cell order,
        component-major, padded with cap dummy entries so that a cell's cap slots never index past the end.

        Reading candidates from the cell-sorted copy touches contiguous memory; component-major arrays keep
        the per-candidate arithmetic on contiguous (rows, 14, cap) blocks (a reduction over a trailing axis of
        3 is several times slower on CPUs)."""
        pad = torch.zeros(cap, dtype=order.dtype, device=order.device)
        order_ext = torch.cat([order, pad])
        xs = torch.cat([xw.index_select(0, order), torch.zeros((cap, 3), dtype=xw.dtype, device=xw.device)])
        return order_ext, xs.t().contiguous()

    def _candidates(self, xs: Tensor, order: Tensor, order_ext: Tensor, xw: Tensor, cell: Tensor,
                    counts: Tensor, start: Tensor, shift_cart: Tensor, row0: int, rows: int, cap: int,
                    r2_select: float) -> Tuple[Tensor, Tensor]:
        """Candidates of rows [row0, row0 + rows) of the cell-sorted order (so that neighbouring rows scan
        the same cells, which keeps the reads local): (slot (rows, 14 cap) int64, the sorted position of each
        candidate partner; keep (rows, 14 cap) bool, whether it is a partner: a filled slot, within the
        selection radius, and of higher index than the row's particle when in its own cell)."""
        dev = xw.device
        h = self.nbr_cells.shape[1]  # 14 (a module global is not visible to TorchScript)
        m = h * cap
        pid = order.narrow(0, row0, rows)  # the rows' particles
        ci = cell.index_select(0, pid)
        nb = self.nbr_cells.index_select(0, ci).reshape(-1)  # (rows * 14,)
        st = start.index_select(0, nb).view(rows, h, 1)
        ct = counts.index_select(0, nb).view(rows, h, 1)
        k = torch.arange(cap, device=dev)
        filled = k < ct  # slots past a cell's count are empty (they read a dummy entry)
        slot = st + k  # (rows, 14, cap)
        flat = slot.reshape(-1)
        # Image of each neighbour cell adjacent to the home cell, minus the home particle: (rows, 14, 3).
        off = shift_cart.index_select(0, ci) - xw.index_select(0, pid).unsqueeze(1)
        dx = xs[0].index_select(0, flat).view(rows, h, cap) + off[:, :, 0:1]
        dy = xs[1].index_select(0, flat).view(rows, h, cap) + off[:, :, 1:2]
        dz = xs[2].index_select(0, flat).view(rows, h, cap) + off[:, :, 2:3]
        r2 = torch.addcmul(torch.addcmul(dx * dx, dy, dy), dz, dz)
        keep = filled & (r2 < r2_select)
        # In the own cell (column 0 of the half shell) each pair is seen from both ends: keep j > i there. In
        # the other 13 cells the pair is seen from this side only (and j != i).
        j_own = order_ext.index_select(0, slot[:, 0, :].reshape(-1)).view(rows, cap)
        keep[:, 0, :] = keep[:, 0, :] & (j_own > pid.unsqueeze(1))
        return slot.view(rows, m), keep.view(rows, m)

    def _select_radius2(self, dtype: torch.dtype) -> float:
        if dtype == torch.float64:
            return self.r2_select_f64
        return self.r2_select_f32

    def _partner_counts(self, pos: Tensor, box: Tensor) -> Tensor:
        """Pairs found in each row (a particle's half shell; rows in cell order) within the selection radius
        (eager)."""
        with torch.no_grad():
            s, xw, cell, order, counts, start = self._bin(pos, box)
            cap = max(1, int(counts.max()))
            order_ext, xs = self._sorted(xw, order, cap)
            shift_cart = torch.matmul(self.nbr_shift.to(pos.dtype), box)
            rows = max(1, self.chunk_candidates // (_HALF_SHELL * cap))
            out: List[Tensor] = []
            for r0 in range(0, self.n_particles, rows):
                m = min(rows, self.n_particles - r0)
                out.append(self._candidates(xs, order, order_ext, xw, cell, counts, start, shift_cart, r0, m, cap,
                                            self._select_radius2(pos.dtype))[1].sum(1))
            return torch.cat(out)

    def forward(self, positions: Tensor, box: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """positions (n, 3) nm, box (3, 3) nm rows -> i (P,), j (P,) int64, d (P, 3) nm, P = n * max_neighbors."""
        n = self.n_particles
        nmax = self.max_neighbors
        cap = self.cell_capacity
        dev = positions.device
        dt = positions.dtype
        box = box.to(dt)
        # Selection (which pairs) on detached tensors: no autograd graph over the n x 14 x cap candidates.
        pos0 = positions.detach()
        box0 = box.detach()
        s, xw, cell, order, counts, start = self._bin(pos0, box0)
        order_ext, xs = self._sorted(xw, order, cap)
        shift_cart = torch.matmul(self.nbr_shift.to(dt), box0)  # (n_cells, 14, 3)
        r2_select = self._select_radius2(dt)
        slots = n * nmax
        # Compaction into one flat list of ``slots`` pairs: the k-th partner found (in candidate order, chunk
        # after chunk) goes to slot k, by a running cumulative sum kept on the device. Non-partners and
        # partners past the last slot go to a discard region after it, spread over its entries so that
        # the writes do not all hit one address (fixed shape, no boolean indexing, no host synchronisation).
        # One int64 per pair: row * stride + sorted position of the partner (decoded after the loop), so a
        # single scatter per chunk moves both ends.
        stride = n + cap
        code = torch.full((slots + self.discard,), -1, dtype=torch.int64, device=dev)
        found = torch.zeros(1, dtype=torch.int64, device=dev)
        for c in range(len(self.chunk_starts)):
            row0 = self.chunk_starts[c]
            rows = self.chunk_sizes[c]
            slot, keep = self._candidates(xs, order, order_ext, xw, cell, counts, start, shift_cart, row0, rows,
                                          cap, r2_select)
            keep = keep.reshape(-1)
            keep_l = keep.to(torch.int64)
            dest = torch.cumsum(keep_l, 0) - 1 + found
            # (the partner's sorted position varies from candidate to candidate: it spreads the discards)
            discard = slots + torch.bitwise_and(slot.reshape(-1), self.discard - 1)
            dest = torch.where(keep & (dest < slots), dest, discard)
            rows_code = torch.arange(row0, row0 + rows, device=dev).unsqueeze(1) * stride
            code.scatter_(0, dest, (slot + rows_code).reshape(-1))
            found = found + keep_l.sum()

        # Overflow: flag, never branch (a branch on a tensor would synchronise).
        too_narrow = perpendicular_widths(box0.to(torch.float64)) < self.min_widths
        flag = (counts > cap).any() | (found > slots).any() | too_narrow.any()
        self.overflow.copy_(torch.maximum(self.overflow, flag.to(torch.int64).reshape(1).to(self.overflow.device)))

        code = code.narrow(0, 0, slots)
        real = code >= 0
        code = torch.clamp(code, min=0)
        row = torch.div(code, stride, rounding_mode="floor")
        pi = order.index_select(0, row)
        pj = order_ext.index_select(0, code - row * stride)
        # Real pairs as (min, max); padded slot s is (s mod n, s mod n): its zero gradients then scatter over
        # all particles in the backward pass instead of piling atomic adds onto one (on a GPU, millions of adds
        # to one address serialise).
        spread = torch.remainder(torch.arange(slots, device=dev), n)
        a = torch.where(real, pi, spread)
        b = torch.where(real, pj, spread)
        ii = torch.minimum(a, b)
        jj = torch.maximum(a, b)
        real = real.reshape(-1, 1)
        # Displacements recomputed from the (differentiable) inputs: d = r_j - r_i - shift @ box, with the
        # integer lattice shift from rounding the fractional difference (exact minimum image below the
        # cutoff); d/dpositions is exact and d/dbox = -shift.
        shift = torch.round(s.index_select(0, jj) - s.index_select(0, ii))
        d = positions.index_select(0, jj) - positions.index_select(0, ii) - torch.matmul(shift, box)
        far = torch.cat([torch.full((1,), 2.0 * self.cutoff, dtype=dt, device=dev),
                         torch.zeros(2, dtype=dt, device=dev)])
        d = torch.where(real, d, far)
        return ii, jj, d

    @torch.jit.export
    def reset_overflow(self) -> None:
        """Clear the overflow flag (after a rebuild or a restart)."""
        self.overflow.zero_()

    @torch.jit.export
    def overflowed(self) -> bool:
        """True when a forward call since construction (or the last reset) may have lost pairs. Reads the
        flag on the host: call it at report time, not inside a captured step."""
        return bool(self.overflow[0] != 0)

    def needed(self, positions, box) -> Tuple[int, int]:
        """(cell_capacity, max_neighbors) that ``positions`` (n, 3) nm in ``box`` (3, 3) nm need: the particles
        in the fullest cell and the pairs (within the selection radius) per particle, rounded up. Plain
        Python (eager, a host synchronisation): for sizing a restart after an overflow, not for a step."""
        pos = torch.as_tensor(positions, device=self.overflow.device)
        b = torch.as_tensor(box, dtype=pos.dtype, device=pos.device)
        counts = self._bin(pos.detach(), b.detach())[4]
        total = int(self._partner_counts(pos.detach(), b.detach()).sum())
        return int(counts.max()), -(-total // self.n_particles)

    def with_capacities(self, cell_capacity: int, max_neighbors: int) -> "CellList":
        """A new CellList of the same cutoff and cell grid with these capacities (clamped to 1..n and 1..n - 1),
        on the same device; plain Python, like :meth:`grown`."""
        new = CellList(self.n_particles, self.cutoff, self.ref_box, cell_capacity=max(1, int(cell_capacity)),
                       max_neighbors=max(1, int(max_neighbors)), headroom=self.headroom,
                       chunk_candidates=self.chunk_candidates)
        return new.to(self.overflow.device)

    def grown(self, box=None, positions=None, factor: int = 2) -> "CellList":
        """A new CellList with ``factor`` x the capacities, on the same device, for a restart after an
        overflow. Pass the current ``box`` when the box shrank (the cell grid is rebuilt from it); plain
        Python (not available on a scripted module: grow the eager one and script it again)."""
        new = CellList(self.n_particles, self.cutoff, self.ref_box if box is None else box, positions=positions,
                       cell_capacity=factor * self.cell_capacity, max_neighbors=factor * self.max_neighbors,
                       headroom=self.headroom, chunk_candidates=self.chunk_candidates)
        return new.to(self.overflow.device)
