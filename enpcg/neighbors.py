"""Pair lists of CG models: the non-excluded bead pairs (i < j) that a pair energy acts on.

Units: positions and box in nm (box vectors are the rows of a (3, 3) tensor in OpenMM's reduced form).

A :class:`PairList` is a TorchScript module that a model calls in ``batch_energy``. It returns, for a batch
of frames, the frame index, the two beads and the minimum-image vector r_j - r_i of every candidate pair,
differentiable with respect to the positions. Candidates include every non-excluded pair closer than the
cutoff; they may include farther pairs and padded slots (i = j, a constant vector of length 2 cutoff),
so a model must give zero energy for r >= cutoff (every pair energy of this project does).

Methods (config value ``pair_list``):

* ``"dense"``: every non-excluded pair, a fixed list built once. O(n^2) memory and work: exact, no host
  synchronisation (CUDA graphs capture it); meant for up to a couple of thousand beads.
* ``"vesin"``: vesin-torch's cell list, rebuilt at each call on the CPU (positions are copied to the host
  and back on a GPU, so CUDA graphs cannot capture it). O(n) and the fastest on CPUs.
* ``"cells"``: :class:`enpcg.cell_list.CellList`, a fixed-shape cell list in torch on the positions'
  device, which CUDA graphs capture; its cell grid and capacities are fixed from a reference box (and
  positions) given in the config, and an ``overflow`` flag reports when they no longer suffice.
* ``"auto"``: ``"vesin"``, except on a GPU for up to :data:`DENSE_MAX_BEADS` beads, where the dense list
  (no host round trip) is faster. Measured on 2 CPU cores (demo melt, energy + forces): vesin beats dense
  already at 252 beads (12 vs 21 ms, spline model) and by 17x at 1,008 beads.

``compact=True`` drops the candidates at or beyond the cutoff (a ``nonzero``: a host synchronisation) so
that expensive per-pair networks only see real neighbours; fixed-shape callers (CUDA graphs) pass False.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .errors import EnpcgError
from .geometry import minimum_image

# vesin-torch is a dependency (setup.cfg); importing it registers its TorchScript classes, which scripted
# models and OpenMM's TorchForce need before they load a model that calls them.
from vesin_torch import NeighborList as VesinNeighborList

METHODS = ("auto", "dense", "vesin", "cells")
# Up to this many beads "auto" uses the dense list (n^2 / 2 pairs) on a GPU; above it a cell list is cheaper
# even there, and at 64k beads the dense list would not fit in memory.
DENSE_MAX_BEADS = 2000


def parse_pair_list(spec) -> dict:
    """The ``pair_list`` config value as a dict ``{"method": ..., **options}``; a string names the method.

    Options of ``"cells"``: ``box`` (3x3 nm, required), ``positions`` (n x 3 nm, optional: capacities from
    the densest cell), ``cell_capacity``, ``max_neighbors`` (0: derived). ``compact`` (bool) overrides the
    model's choice (False keeps shapes fixed, for CUDA graphs).
    """
    if spec is None:
        spec = "auto"
    if isinstance(spec, str):
        spec = {"method": spec}
    if not isinstance(spec, dict) or spec.get("method") not in METHODS:
        raise EnpcgError(f"model config field 'pair_list': received {spec!r}; it must be one of {list(METHODS)} "
                         "or a dict {'method': 'cells', 'box': [[...], [...], [...]]}")
    unknown = set(spec) - {"method", "box", "positions", "cell_capacity", "max_neighbors", "compact"}
    if unknown:
        raise EnpcgError(f"model config field 'pair_list': unknown keys {sorted(unknown)}")
    if spec["method"] == "cells" and spec.get("box") is None:
        raise EnpcgError("model config field 'pair_list': method 'cells' needs 'box' (3x3 nm, the reference box "
                         "that fixes the cell grid); export_forces(..., cuda_graphs=True) sets it from the System")
    return dict(spec)


def perpendicular_widths(box) -> np.ndarray:
    """Distances (nm) between opposite faces of the periodic cell with rows ``box`` (3, 3) nm."""
    box = np.asarray(box, dtype=np.float64).reshape(3, 3)
    volume = abs(np.linalg.det(box))
    a, b, c = box
    return volume / np.array([np.linalg.norm(np.cross(b, c)), np.linalg.norm(np.cross(c, a)),
                              np.linalg.norm(np.cross(a, b))])


def graph_safe_pair_list(box, cutoff: float, positions=None) -> dict:
    """A pair list CUDA graphs can capture: the fixed-shape cell list when ``box`` (3, 3) nm holds at least
    3 cells of width >= ``cutoff`` per side, else the dense list without compaction. With ``positions``
    (n, 3) nm, the cell list's capacities are sized on them (the fullest cell and the pairs per particle,
    x 1.5 and 1.25) instead of on the mean density: for a dense melt about 1.6x fewer candidates to scan."""
    if box is not None and np.all(perpendicular_widths(box) >= 3 * float(cutoff)):
        spec = {"method": "cells", "box": np.asarray(box, dtype=np.float64).reshape(3, 3).tolist()}
        if positions is not None:
            from .cell_list import CellList

            x = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
            sized = CellList(len(x), float(cutoff), spec["box"], positions=x)
            spec.update(cell_capacity=sized.cell_capacity, max_neighbors=sized.max_neighbors)
        return spec
    return {"method": "dense", "compact": False}


def resolve_method(method: str, n_beads: int, device: str = "cpu") -> str:
    """The concrete method used for tensors on ``device`` ("cpu" or "cuda"): see the module docstring."""
    if method != "auto":
        return method
    return "dense" if device != "cpu" and n_beads <= DENSE_MAX_BEADS else "vesin"


def frame_sum(values: Tensor, frame: Tensor, n_frames: int) -> Tensor:
    """Per-frame sums (n_frames,) of per-pair values (P,) with frame indices (P,), accumulated in float64 and
    returned in the values' dtype. One frame (every MD step) is a plain reduction: an ``index_add`` would pile
    all P atomic adds onto one address, which a GPU serialises."""
    if n_frames == 1:
        return values.to(torch.float64).sum().reshape(1).to(values.dtype)
    out = torch.zeros(n_frames, dtype=torch.float64, device=values.device)
    return out.index_add(0, frame, values.to(torch.float64)).to(values.dtype)


def pair_keys(i: Tensor, j: Tensor, n: int) -> Tensor:
    """Key i * n + j of each pair (i < j), int64: one number per pair for sorted lookups."""
    return i.to(torch.int64) * n + j.to(torch.int64)


def lookup(sorted_keys: Tensor, values: Tensor, keys: Tensor, default: int) -> Tensor:
    """values[k] where sorted_keys[k] == keys, else ``default`` (binary search; no host synchronisation)."""
    if sorted_keys.shape[0] == 0:
        return torch.full_like(keys, default)
    pos = torch.searchsorted(sorted_keys, keys).clamp(max=sorted_keys.shape[0] - 1)
    hit = sorted_keys.index_select(0, pos) == keys
    return torch.where(hit, values.index_select(0, pos), torch.full_like(keys, default))


class PairList(torch.nn.Module):
    """Candidate pairs (i < j, not excluded) of a batch of frames; see the module docstring.

    n_beads : int; cutoff : float, nm; excluded : (E, 2) array of excluded pairs (any order);
    pair_list : method name or dict (see :func:`parse_pair_list`); compact : drop candidates beyond the cutoff.
    """

    def __init__(self, n_beads: int, cutoff: float, excluded, pair_list="auto", compact: bool = False):
        super().__init__()
        spec = parse_pair_list(pair_list)
        self.method = resolve_method(spec["method"], int(n_beads))
        self.dense_on_gpu = resolve_method(spec["method"], int(n_beads), "cuda") == "dense"
        self.n_beads = int(n_beads)
        self.cutoff = float(cutoff)
        # "cells" exists for CUDA graphs, which a compaction (nonzero) would break.
        self.compact = bool(spec.get("compact", compact)) and self.method != "cells"
        ex = np.asarray(excluded, dtype=np.int64).reshape(-1, 2)
        ex = np.unique(np.sort(ex, axis=1), axis=0)
        # Excluded partners j > i of each bead i, padded with -1: a pair is excluded when j appears in row i
        # (a few comparisons per pair, cheaper than a binary search over all exclusions).
        width = int(np.bincount(ex[:, 0], minlength=1).max()) if len(ex) else 0
        table = np.full((self.n_beads, max(width, 1)), -1, dtype=np.int64)
        fill = np.zeros(self.n_beads, dtype=np.int64)
        for a, b in ex.tolist():
            table[a, fill[a]] = b
            fill[a] += 1
        self.register_buffer("excluded_table", torch.as_tensor(table), persistent=False)
        self.has_exclusions = len(ex) > 0
        self.register_buffer("far", torch.tensor([2.0 * self.cutoff, 0.0, 0.0], dtype=torch.float64),
                             persistent=False)
        if self.method == "dense" or self.dense_on_gpu:
            ii, jj = torch.triu_indices(self.n_beads, self.n_beads, offset=1)
            keep = ~self.is_excluded(ii, jj)
            pairs = torch.stack([ii[keep], jj[keep]], dim=1)
        else:
            pairs = torch.zeros((0, 2), dtype=torch.int64)
        self.register_buffer("pairs", pairs, persistent=False)
        self.cells = torch.nn.ModuleList()
        if self.method == "cells":
            from .cell_list import CellList

            self.cells.append(CellList(self.n_beads, self.cutoff, np.asarray(spec["box"], dtype=np.float64),
                                       positions=None if spec.get("positions") is None
                                       else np.asarray(spec["positions"], dtype=np.float64),
                                       cell_capacity=int(spec.get("cell_capacity", 0) or 0),
                                       max_neighbors=int(spec.get("max_neighbors", 0) or 0)))

    def poison(self, energy: Tensor) -> Tensor:
        """``energy`` (B,) plus NaN once the fixed-capacity cell list has dropped pairs, else plus 0.

        Models add this to their energies. The flag stays on the device (no host sync, CUDA graphs keep
        working); a NaN energy stops the run at its next report, and the runner restarts from the last
        checkpoint with grown capacities, so no result rests on a truncated pair list. Forces are left
        finite (the term has no gradient), so the integrator does not spread NaN through the positions.
        """
        for cl in self.cells:
            nan = torch.full_like(energy, float("nan"))
            energy = energy + torch.where(cl.overflow > 0, nan, torch.zeros_like(nan))
        return energy

    def is_excluded(self, i: Tensor, j: Tensor) -> Tensor:
        """(P,) bool: whether each pair (i < j) is excluded."""
        return (self.excluded_table.index_select(0, i) == j.unsqueeze(-1)).any(dim=-1)

    @torch.jit.unused
    def overflowed(self) -> bool:
        """True when the fixed-capacity cell list dropped pairs since it was built (method "cells")."""
        return bool(len(self.cells) > 0 and self.cells[0].overflowed())

    def forward(self, positions: Tensor, box: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """positions (B, n, 3) nm, box (B, 3, 3) nm or None -> frame, i, j (P,) int64 and d = r_j - r_i (P, 3)
        nm (minimum image). Pairs beyond the cutoff and padded slots may appear unless ``compact``."""
        if self.method == "dense" or (self.dense_on_gpu and positions.is_cuda):
            return self._dense(positions, box)
        frames: List[Tensor] = []
        ii: List[Tensor] = []
        jj: List[Tensor] = []
        dd: List[Tensor] = []
        for f in range(positions.shape[0]):
            x = positions[f]
            b: Optional[Tensor] = None
            if box is not None:
                b = box[f]
            if self.method == "vesin":
                i, j, d = self._vesin(x, b)
            else:
                i, j, d = self._cells(x, b)
            frames.append(torch.full_like(i, f))
            ii.append(i)
            jj.append(j)
            dd.append(d)
        if len(ii) == 1:  # one frame (every MD step): no copies
            frame, i, j, d = frames[0], ii[0], jj[0], dd[0]
        else:
            frame = torch.cat(frames)
            i = torch.cat(ii)
            j = torch.cat(jj)
            d = torch.cat(dd)
        if self.has_exclusions:
            # Excluded pairs become far pairs: zero energy, fixed shape.
            d = torch.where(self.is_excluded(i, j).unsqueeze(-1), self.far.to(d.dtype).expand_as(d), d)
        if self.compact:
            keep = torch.nonzero(torch.linalg.norm(d, dim=-1) < self.cutoff).squeeze(-1)
            return frame[keep], i[keep], j[keep], d[keep]
        return frame, i, j, d

    def _dense(self, positions: Tensor, box: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        n_frames = positions.shape[0]
        n_pairs = self.pairs.shape[0]
        i0 = self.pairs[:, 0]
        j0 = self.pairs[:, 1]
        if self.compact:
            # Select under no_grad over all pairs, then recompute the kept vectors only, so that autograd
            # never touches the full list.
            with torch.no_grad():
                r_all = torch.linalg.norm(minimum_image(positions[:, j0] - positions[:, i0], box), dim=-1)
                sel = torch.nonzero(r_all < self.cutoff)
            frame = sel[:, 0]
            pidx = sel[:, 1]
        else:
            frame = torch.arange(n_frames, device=positions.device).repeat_interleave(n_pairs)
            pidx = torch.arange(n_pairs, device=positions.device).repeat(n_frames)
        i = i0.index_select(0, pidx)
        j = j0.index_select(0, pidx)
        n = positions.shape[1]
        flat = positions.reshape(n_frames * n, 3)
        d = (flat.index_select(0, j + frame * n) - flat.index_select(0, i + frame * n)).unsqueeze(1)
        if box is not None:
            d = minimum_image(d, box.index_select(0, frame))
        return frame, i, j, d.squeeze(1)

    def _vesin(self, x: Tensor, box: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        nl = VesinNeighborList(cutoff=self.cutoff, full_list=False)
        xc = x.detach().cpu()
        if box is None:
            res = nl.compute(xc, torch.zeros((3, 3), dtype=xc.dtype), False, "ij", True)
        else:
            res = nl.compute(xc, box.detach().cpu(), True, "ij", True)
        i = res[0].to(x.device)
        j = res[1].to(x.device)
        # vesin lists each pair once, in either order; the models want i < j. (This path synchronises with
        # the host anyway, so a branch on a tensor value costs nothing more.)
        swap = i > j
        if bool(swap.any()):
            i, j = torch.where(swap, j, i), torch.where(swap, i, j)
        d = x.index_select(0, j) - x.index_select(0, i)
        # The minimum image of r_j - r_i (cutoff <= half the box) is vesin's shifted vector, and cheaper than
        # a (P, 3) x (3, 3) product with the shifts.
        if box is not None:
            d = minimum_image(d.unsqueeze(0), box.unsqueeze(0)).squeeze(0)
        return i, j, d

    def _cells(self, x: Tensor, box: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        if box is None:
            raise RuntimeError("pair_list 'cells' needs a periodic box")
        out = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), x[:0])
        for cl in self.cells:
            i, j, d = cl(x, box)
            out = (i, j, d)
        return out
