"""enpcg.cell_list.CellList against an exhaustive all-pairs search (float64, nm).

The reference tries all 27 lattice images of every pair (after rounding the fractional difference), so it
does not share the cell list's minimum-image shortcut; gases include particles shifted by whole box vectors.
"""
import io
import itertools
import time

import numpy as np
import pytest
import torch

from enpcg.cell_list import CellList


def _box(kind: str) -> np.ndarray:
    if kind == "cubic":
        return np.diag([5.0, 5.0, 5.0])
    if kind == "cubic3":  # 3 cells per dimension: the 27 neighbour cells are the whole box
        return np.diag([3.7, 3.7, 3.7])
    if kind == "ortho":
        return np.diag([5.0, 6.5, 8.0])
    if kind == "triclinic":  # OpenMM reduced form: |bx|, |cx| <= ax / 2, |cy| <= by / 2
        return np.array([[6.0, 0.0, 0.0], [2.9, 5.5, 0.0], [-2.6, 2.4, 5.2]])
    if kind == "dodecahedron":  # rhombic dodecahedron, xy-square reduced form
        a = 5.5
        return np.array([[a, 0.0, 0.0], [0.0, a, 0.0], [a / 2, a / 2, a * np.sqrt(0.5)]])
    raise KeyError(kind)


def _gas(kind: str, n: int, seed: int, outside: bool = True):
    """Uniform gas in the box; with ``outside`` half the particles moved by -2..2 whole box vectors."""
    box = _box(kind)
    rng = np.random.default_rng(seed)
    s = rng.random((n, 3))
    if outside:
        s[: n // 2] += rng.integers(-2, 3, size=(n // 2, 3))
        s = s[rng.permutation(n)]
    return torch.as_tensor(s @ box), torch.as_tensor(box)


def _reference(x: torch.Tensor, box: torch.Tensor, rc: float):
    """All pairs i < j closer than rc: keys i * n + j (sorted), their vectors r_j - r_i (minimum image, with
    autograd through x and box) and lengths."""
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    with torch.no_grad():
        d0 = x[j] - x[i]
        shift = -torch.round(d0 @ torch.linalg.inv(box))  # integer lattice shift (rows of box)
        base = d0 + shift @ box
        images = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=3)), dtype=x.dtype)
        vecs = images @ box  # (27, 3)
        best = torch.empty(i.shape[0], dtype=x.dtype)
        best_k = torch.empty(i.shape[0], dtype=torch.int64)
        # |base + v|^2 - |base|^2 = 2 base.v + |v|^2 for all 27 images at once (one fused matrix product per
        # block of pairs), minimised over the images.
        for lo in range(0, i.shape[0], 1 << 19):
            bb = base[lo:lo + (1 << 19)]
            best[lo:lo + bb.shape[0]], best_k[lo:lo + bb.shape[0]] = \
                torch.addmm((vecs * vecs).sum(-1), bb, 2.0 * vecs.t()).min(dim=1)
        best += (base * base).sum(-1)
        # A margin against the rounding of the expanded square; the exact test follows.
        keep = torch.nonzero(best < (rc + 1e-6) ** 2).squeeze(-1)
        i, j, sh = i[keep], j[keep], shift[keep] + images[best_k[keep]]
        keep = torch.nonzero(torch.linalg.norm(x[j] - x[i] + sh @ box, dim=-1) < rc).squeeze(-1)
    i, j, sh = i[keep], j[keep], sh[keep]
    d = x[j] - x[i] + sh @ box
    return i * n + j, d


def _real(i, j, d, rc, n):
    """Non-padded entries closer than rc, sorted by key i * n + j."""
    with torch.no_grad():
        keep = torch.nonzero((i != j) & (torch.linalg.norm(d, dim=-1) < rc)).squeeze(-1)
    key = i[keep] * n + j[keep]
    order = torch.argsort(key)
    return key[order], d[keep][order]


def _energy(d, rc):
    r = torch.linalg.norm(d, dim=-1)
    return ((rc - r).clamp(min=0.0) ** 2).sum()


CASES = [("cubic", 600, 1.2), ("cubic3", 400, 1.2), ("cubic", 3000, 1.0), ("ortho", 1500, 1.1),
         ("triclinic", 2500, 1.0), ("dodecahedron", 1200, 1.05)]


@pytest.mark.parametrize("kind,n,rc", CASES)
def test_pairs_distances_and_forces_match_brute_force(kind, n, rc):
    x, box = _gas(kind, n, seed=n)
    cl = CellList(n, rc, box.numpy(), positions=x.numpy())
    x1 = x.clone().requires_grad_(True)
    b1 = box.clone().requires_grad_(True)
    i, j, d = cl(x1, b1)
    assert not cl.overflowed()
    assert i.dtype == torch.int64 and j.dtype == torch.int64 and d.dtype == torch.float64
    key, dd = _real(i, j, d, rc, n)
    assert bool((i <= j).all())
    x2 = x.clone().requires_grad_(True)
    b2 = box.clone().requires_grad_(True)
    ref_key, ref_d = _reference(x2, b2, rc)
    assert key.shape == ref_key.shape and torch.equal(key, ref_key)
    assert float((dd - ref_d).detach().abs().max()) < 1e-12
    # Autograd forces (and the box derivative) through the list equal those of the brute force.
    e1, e2 = _energy(d, rc), _energy(ref_d, rc)
    assert abs(float(e1.detach() - e2.detach())) <= 1e-10 * float(e2.detach())
    g1x, g1b = torch.autograd.grad(e1, (x1, b1))
    g2x, g2b = torch.autograd.grad(e2, (x2, b2))
    assert float(torch.linalg.norm(g1x - g2x)) <= 1e-10 * float(torch.linalg.norm(g2x))
    assert float(torch.linalg.norm(g1b - g2b)) <= 1e-10 * float(torch.linalg.norm(g2b))


def test_padding_and_fixed_shapes():
    rc = 1.0
    x, box = _gas("triclinic", 1000, seed=3)
    cl = CellList(1000, rc, box.numpy(), positions=x.numpy())
    x1 = x.clone().requires_grad_(True)
    i, j, d = cl(x1, box)
    assert i.shape == j.shape == (1000 * cl.max_neighbors,) and d.shape == (1000 * cl.max_neighbors, 3)
    pad = i == j
    assert bool(pad.any())
    assert bool((i[pad] == torch.remainder(torch.arange(i.shape[0]), 1000)[pad]).all())  # slot s: (s mod n, s mod n)
    assert torch.allclose(torch.linalg.norm(d[pad], dim=-1), torch.tensor(2.0 * rc, dtype=d.dtype))
    (g,) = torch.autograd.grad(d[pad].sum(), x1, allow_unused=True)
    assert g is None or float(g.abs().max()) == 0.0
    # Every pair appears once, as (min, max) of its indices.
    real = ~pad
    assert bool((j[real] > i[real]).all())
    key = i[real] * 1000 + j[real]
    assert torch.unique(key).shape == key.shape
    # Another configuration (a much denser clump) gives the same shapes.
    y, _ = _gas("triclinic", 1000, seed=4)
    i2, j2, d2 = cl(0.5 * y, box)
    assert i2.shape == i.shape and j2.shape == j.shape and d2.shape == d.shape


def test_torchscript_matches_eager():
    rc = 1.0
    x, box = _gas("triclinic", 800, seed=5)
    cl = CellList(800, rc, box.numpy())
    sc = torch.jit.script(cl)
    for xx in (x, x + 0.37):
        out_e = cl(xx, box)
        out_s = sc(xx, box)
        for a, b in zip(out_e, out_s):
            assert torch.equal(a, b)
    assert not sc.overflowed()
    # Saved and reloaded (as a TorchForce file is), it still gives the same output.
    buf = io.BytesIO()
    torch.jit.save(sc, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    for a, b in zip(cl(x, box), loaded(x, box)):
        assert torch.equal(a, b)
    # float32 positions (as OpenMM's TorchForce passes them) run and find the same pairs, away from the cutoff.
    i, j, d = sc(x.float(), box.float())
    assert d.dtype == torch.float32
    key, dd = _real(i, j, d.double(), rc, 800)
    ref_key, ref_d = _reference(x, box, rc)
    r = torch.linalg.norm(ref_d, dim=-1)
    sure = ref_key[r < rc - 1e-4]
    assert bool(torch.isin(sure, key).all())
    assert key.shape[0] - sure.shape[0] <= int(((r >= rc - 1e-4)).sum())


def test_overflow_flags_and_grown():
    rc = 1.0
    n = 1500
    x, box = _gas("ortho", n, seed=6)
    ref_key, _ = _reference(x, box, rc)
    # Derived capacities (from positions, or from the density alone) do not overflow on these gases.
    for cl in (CellList(n, rc, box.numpy(), positions=x.numpy()), CellList(n, rc, box)):
        cl(x, box)
        assert not cl.overflowed()
    for kwargs in ({"cell_capacity": 2}, {"max_neighbors": 3}):
        cl = CellList(n, rc, box.numpy(), **kwargs)
        sc = torch.jit.script(cl)
        key, _ = _real(*cl(x, box), rc, n)
        assert cl.overflowed() and int(cl.overflow[0]) == 1
        assert bool(torch.isin(key, ref_key).all()) and key.shape[0] < ref_key.shape[0]  # lost, never wrong
        cl.reset_overflow()
        sc(x, box)  # (the scripted module shares the eager module's buffers)
        assert sc.overflowed() and cl.overflowed()
        sc.reset_overflow()
        assert not sc.overflowed()
        out = cl(x, box)
        while cl.overflowed():
            cl = cl.grown()
            out = cl(x, box)
        key, _ = _real(*out, rc, n)
        assert torch.equal(key, ref_key)
    # A box shrunk below n_k cutoffs per dimension flags an overflow (cells narrower than the cutoff).
    cl = CellList(n, rc, box.numpy(), positions=x.numpy())
    cl(x * 0.95, box * 0.95)
    assert cl.overflowed()
    cl(x, box)  # the flag is sticky: a later good call does not clear it
    assert cl.overflowed()
    cl.reset_overflow()
    cl(x * 1.05, box * 1.05)  # a grown box is fine (as long as the cells hold their particles)
    assert not cl.overflowed()
    big = cl.grown(box=box.numpy() * 0.95)
    big(x * 0.95, box * 0.95)
    assert not big.overflowed()


def test_too_small_box_raises():
    with pytest.raises(ValueError, match="too small for a cell list"):
        CellList(100, 1.0, np.diag([5.0, 2.9, 5.0]))
    # A tilted cell whose edges are all longer than 3 cutoffs but whose perpendicular width is not.
    with pytest.raises(ValueError, match="too small for a cell list"):
        CellList(100, 1.0, np.array([[3.5, 0.0, 0.0], [1.75, 2.9, 0.0], [0.0, 0.0, 3.5]]))
    with pytest.raises(ValueError, match="reduced form"):
        CellList(100, 1.0, np.array([[5.0, 1.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]]))


def test_timing_print():
    """Not an assertion: forward + backward cost on the CPU (density 7 / nm^3, cutoff 1 nm)."""
    n, rc = 8000, 1.0
    box = torch.eye(3, dtype=torch.float64) * (n / 7.0) ** (1.0 / 3.0)
    x = torch.rand(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) @ box
    cl = CellList(n, rc, box)
    for name, m in (("eager", cl), ("scripted", torch.jit.script(cl))):
        xx = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        _energy(m(xx, box)[2], rc).backward()
        print(f"CellList n={n} {name}: forward+backward {time.perf_counter() - t0:.3f} s "
              f"(capacity {cl.cell_capacity}, max_neighbors {cl.max_neighbors})")
    assert not cl.overflowed()
