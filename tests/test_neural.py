"""Neural CG model (kind "neural") and its force-matching trainer.

Symmetry and force tests run in float64 (tolerances ~1e-10 relative) with a small random model; the known-
answer test fits a pair potential from noisy forces; the trainer is tested for interruption and resume.
Forces are compared as ||dF|| / ||F||.
"""
import json

import numpy as np
import pytest
import torch

from enpcg.fitting.trainer import CHECKPOINT, CURVE, HISTORY, STOP_ENV, train_force_matching
from enpcg.models import batch_forces, create_model, load_model, save_model
from enpcg.models.neural import pair_classes
from enpcg.topology import CGTopology


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def chains_topology(n_chains=3, chain_len=5, n_free=4) -> CGTopology:
    """Linear chains of alternating types A/B (so 1-2, 1-3, 1-4 classes occur) plus free beads of type C."""
    names, types, mol, bonds = [], [], [], []
    for c in range(n_chains):
        for k in range(chain_len):
            i = len(names)
            names.append(f"C{c}B{k}")
            types.append("A" if k % 2 == 0 else "B")
            mol.append(c)
            if k > 0:
                bonds.append((i - 1, i))
    for f in range(n_free):
        names.append(f"F{f}")
        types.append("C")
        mol.append(n_chains + f)
    return CGTopology(names, types, np.full(len(names), 28.0), np.array(mol), bonds=bonds)


def cluster_positions(top, rng, spacing=0.38):
    """A non-periodic cluster (n, 3) nm: chains as random walks with bond ~spacing, free beads nearby."""
    pos = []
    for c in range(top.n_molecules):
        idx = np.flatnonzero(top.molecule_index == c)
        start = rng.uniform(-0.8, 0.8, 3)
        for k in range(len(idx)):
            pos.append(start.copy())
            step = rng.normal(size=3)
            start = start + spacing * step / np.linalg.norm(step)
    return np.array(pos)


def random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def forces(model, pos, box=None):
    """Energy (B,) kJ/mol and forces (B, n, 3) kJ/mol/nm as numpy float64, for pos (B, n, 3) nm."""
    dt = next(model.parameters()).dtype
    x = torch.as_tensor(pos, dtype=dt)
    b = None if box is None else torch.as_tensor(box, dtype=dt)
    e, f = batch_forces(model, x, b)
    return e.detach().double().numpy(), f.detach().double().numpy()


def random_model(top, seed, dtype=torch.float64, **config):
    """A neural model whose many-body readout is switched on (it starts at zero by design) so that the
    tests exercise both the pair channel and the message-passing branch."""
    cfg = dict(cutoff=0.9, n_rbf=8, hidden=16, n_layers=2, seed=seed)
    cfg.update(config)
    m = create_model("neural", top, **cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.readout2.weight.copy_(torch.randn(m.readout2.weight.shape, generator=gen))
    return m.to(dtype)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small tensors: one thread is as fast, and far faster when other jobs share the two cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def top():
    return chains_topology()


@pytest.fixture(scope="module")
def model64(top):
    return random_model(top, seed=3)


def test_pair_classes_follow_the_bond_graph(top):
    """Class of (0, k) in a chain is the bond-graph distance k for k <= 3, else 0; free beads are 0."""
    pairs = np.array([[0, 1], [0, 2], [0, 3], [0, 4], [0, 15], [5, 10]])
    assert pair_classes(top, pairs).tolist() == [1, 2, 3, 0, 0, 0]


def test_rotation_translation_reflection_invariance(top, model64):
    """Energy invariant (rel 1e-10) and forces rotate with the system (rel 1e-10), reflections included."""
    rng = np.random.default_rng(0)
    x = cluster_positions(top, rng)
    e0, f0 = forces(model64, x[None])
    assert np.abs(f0).max() > 1e-3  # the test is not vacuous
    for reflect in (False, True):
        rot = random_rotation(rng)
        if reflect:
            rot = rot @ np.diag([1.0, 1.0, -1.0])
        shift = rng.normal(size=3) * 5.0
        e1, f1 = forces(model64, (x @ rot.T + shift)[None])
        assert abs(e1[0] - e0[0]) <= 1e-10 * max(1.0, abs(e0[0]))
        assert rel(f1[0], f0[0] @ rot.T) < 1e-10


def test_periodic_images_and_batches(top, model64):
    """Shifting beads by box vectors (triclinic box) leaves energy (rel 1e-10) and forces (rel 1e-10) unchanged;
    a batch gives the same energies as single frames (rel 1e-12)."""
    rng = np.random.default_rng(1)
    box = np.array([[2.0, 0.0, 0.0], [0.4, 2.1, 0.0], [-0.3, 0.5, 2.2]])  # OpenMM reduced form
    x = rng.uniform(0.0, 2.0, size=(top.n_beads, 3))
    shifts = rng.integers(-2, 3, size=(top.n_beads, 3)) @ box
    e0, f0 = forces(model64, x[None], box[None])
    e1, f1 = forces(model64, (x + shifts)[None], box[None])
    assert abs(e1[0] - e0[0]) <= 1e-10 * max(1.0, abs(e0[0]))
    assert rel(f1, f0) < 1e-10
    y = rng.uniform(0.0, 2.0, size=(top.n_beads, 3))
    eb, fb = forces(model64, np.stack([x, y]), np.stack([box, box * 1.05]))
    ey, fy = forces(model64, y[None], (box * 1.05)[None])
    assert abs(eb[0] - e0[0]) <= 1e-12 * max(1.0, abs(e0[0]))
    assert abs(eb[1] - ey[0]) <= 1e-12 * max(1.0, abs(ey[0]))
    assert rel(fb[1], fy[0]) < 1e-12


def test_permutation_of_equivalent_beads(top, model64):
    """Swapping two free beads of one type, or two identical chains, permutes forces and keeps the energy
    (rel 1e-12)."""
    rng = np.random.default_rng(2)
    x = cluster_positions(top, rng)
    e0, f0 = forces(model64, x[None])
    perm = np.arange(top.n_beads)
    free = np.flatnonzero(np.array(top.bead_types) == "C")
    perm[free[0]], perm[free[2]] = free[2], free[0]
    chain0, chain1 = np.arange(0, 5), np.arange(5, 10)
    perm[chain0], perm[chain1] = chain1, chain0
    e1, f1 = forces(model64, x[perm][None])
    assert abs(e1[0] - e0[0]) <= 1e-12 * max(1.0, abs(e0[0]))
    assert rel(f1[0], f0[0][perm]) < 1e-12


def test_forces_are_central_differences(top, model64):
    """Autograd forces equal central differences of the energy (step 1e-5 nm, rel 1e-7)."""
    rng = np.random.default_rng(3)
    x = cluster_positions(top, rng)
    _, f = forces(model64, x[None])
    h = 1e-5
    fd = np.zeros_like(x)
    for i in range(top.n_beads):
        for k in range(3):
            xp, xm = x.copy(), x.copy()
            xp[i, k] += h
            xm[i, k] -= h
            ep, _ = forces(model64, xp[None])
            em, _ = forces(model64, xm[None])
            fd[i, k] = -(ep[0] - em[0]) / (2 * h)
    assert rel(fd, f[0]) < 1e-7


def test_smooth_cutoff():
    """Two beads: zero energy and force at r >= rc (exactly), and the force falls off smoothly to zero at rc:
    |F(rc - 1e-3 nm)| < 1e-4 max|F|."""
    top = CGTopology(["a", "b"], ["A", "A"], [1.0, 1.0], [0, 1])
    rc = 0.8
    m = random_model(top, seed=1, cutoff=rc)

    def fx(r):
        e, f = forces(m, np.array([[[0.0, 0.0, 0.0], [r, 0.0, 0.0]]]))
        return e[0], f[0, 1, 0]

    e_far, _ = fx(10.0)
    assert e_far == 0.0  # separated beads: no edge, and bead energies are relative to the isolated bead
    for r in (rc, rc + 1e-9, rc + 0.05, 2.5):
        e, f = fx(r)
        assert f == 0.0 and e == e_far
    f_max = max(abs(fx(r)[1]) for r in np.linspace(0.2, rc, 61))
    assert f_max > 1e-3
    assert abs(fx(rc - 1e-3)[1]) < 1e-4 * f_max


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_scripted_equals_eager(top, dtype, tol):
    """torch.jit.script gives the eager energy and forces (rel 1e-5 float32, 1e-12 float64), through
    forward() and batch_energy(), periodic and not."""
    m = random_model(top, seed=4, dtype=dtype)
    s = torch.jit.script(m)
    rng = np.random.default_rng(5)
    x = torch.as_tensor(rng.uniform(0.0, 2.0, size=(top.n_beads, 3)), dtype=dtype)
    for box in (None, torch.eye(3, dtype=dtype) * 2.0):
        with torch.no_grad():
            e_e = float(m(x, box))
            for _ in range(3):  # the profiling executor recompiles over the first calls
                e_s = float(s(x, box))
        assert abs(e_s - e_e) <= tol * max(1.0, abs(e_e))
        b = None if box is None else box[None]
        _, f_e = batch_forces(m, x[None], b)
        _, f_s = batch_forces(s, x[None], b)
        assert rel(f_s.detach(), f_e.detach()) < tol


@pytest.mark.parametrize("config", [dict(n_layers=0), dict(pair_term=False, core=False), dict(core=False)])
def test_model_variants_script_and_are_invariant(top, config):
    """Pair-only, many-body-only and core-free variants: scripted == eager (rel 1e-12) and rotation
    invariant (rel 1e-10), float64."""
    m = random_model(top, seed=8, **config)
    s = torch.jit.script(m)
    rng = np.random.default_rng(9)
    x = cluster_positions(top, rng)
    e0, f0 = forces(m, x[None])
    e1, f1 = forces(s, x[None])
    assert abs(e1[0] - e0[0]) <= 1e-12 * max(1.0, abs(e0[0])) and rel(f1, f0) < 1e-12
    rot = random_rotation(rng)
    e2, f2 = forces(m, (x @ rot.T)[None])
    assert abs(e2[0] - e0[0]) <= 1e-10 * max(1.0, abs(e0[0])) and rel(f2[0], f0[0] @ rot.T) < 1e-10


@pytest.mark.parametrize("config,field", [(dict(cutoff=-1.0), "cutoff"), (dict(hidden=1), "hidden"),
                                          (dict(n_layers=0, pair_term=False), "n_layers"),
                                          (dict(energy_scale=0.0), "energy_scale")])
def test_bad_config_is_a_user_error(top, config, field):
    """A bad config raises EnpcgError naming the field (create_model wraps unknown keys the same way)."""
    from enpcg.errors import EnpcgError

    with pytest.raises(EnpcgError, match=field):
        create_model("neural", top, **config)
    with pytest.raises(EnpcgError, match="bogus"):
        create_model("neural", top, bogus=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_load_round_trip(top, tmp_path, dtype):
    """save_model/load_model reproduce the forces exactly (bitwise) and the dtype."""
    m = random_model(top, seed=6, dtype=dtype)
    save_model(m, tmp_path / "m")
    m2 = load_model(tmp_path / "m")
    assert next(m2.parameters()).dtype == dtype and m2.config == m.config
    x = cluster_positions(top, np.random.default_rng(7))[None]
    _, f1 = forces(m, x)
    _, f2 = forces(m2, x)
    assert np.array_equal(f1, f2)


# ------------------------------------------------------------------------------------------ training
def lj_pair_force(r, eps, sig):
    """Lennard-Jones force magnitude -dU/dr (kJ/mol/nm, positive = repulsive) at r (nm)."""
    return 24.0 * eps / r * (2.0 * (sig / r) ** 12 - (sig / r) ** 6)


@pytest.fixture
def deterministic_openmm_cpu():
    """One CPU-platform thread while data are generated: with several, the force summation order varies and
    the trajectory (hence the data) differs from run to run."""
    import openmm

    cpu = openmm.Platform.getPlatformByName("CPU")
    old = cpu.getPropertyDefaultValue("Threads")
    cpu.setPropertyDefaultValue("Threads", "1")
    yield
    cpu.setPropertyDefaultValue("Threads", old)


def test_known_answer_lj_dimers(tmp_path, deterministic_openmm_cpu):
    """Neural fit of LJ dimers (OpenMM data, Gaussian noise of twice the force RMS) on top of the package's
    Boltzmann-inverted priors (harmonic bond + weak r^-12 repulsion, from the positions only):

    * held-out force RMSE against the noise-free forces < 5% of their RMS;
    * force between two isolated beads (prior + neural) within 5% of max|F_LJ| over the 1st-99th
      percentiles of the sampled intermolecular pair distances (within the LJ cutoff).

    Data: 56 dimers, 500 frames 0.2 ps apart; the last 60 frames are the test set, never shown to the
    trainer. Noisy validation losses cannot rank the last epochs, so the final EMA weights of a cosine
    schedule are kept; weight decay on the many-body branch makes the fit prefer pair explanations (liquid
    data cannot tell a pair force from a mean-field many-body term). Over data seeds 0-3 this gives 2.1-3.2%
    held-out error (a least-squares cubic-spline pair fit reaches ~2-3% on such data) and 1.7-3.4% on the
    pair curve, in ~15 s of training on one core.
    """
    from known_answer import make_known_answer_data

    from enpcg.fitting import fit_priors
    from enpcg.geometry import all_pairs, pair_vectors
    from enpcg.models.composite import SumModel

    data = make_known_answer_data("lj_dimers", n_frames=500, noise=2.0, seed=0, n_molecules=56, stride=20,
                                  equilibration=2000)
    p = data.params
    top = data.topology
    fit, test = slice(0, -60), slice(-60, None)
    prior = fit_priors(data.positions[fit], data.box[fit], top, data.temperature)
    config = dict(cutoff=0.8, n_rbf=8, hidden=16, n_layers=1, energy_scale=5.0, seed=0)
    model, history = train_force_matching(
        create_model("neural", top, **config), data.positions[fit], data.forces[fit], data.box[fit],
        prior=prior, out_dir=tmp_path, epochs=8, batch_size=4, lr=3e-2, schedule="cosine", min_lr=1e-5,
        weight_decay=3.0, ema_decay=0.99, val_fraction=0.05, select_best=False, progress=False)
    assert history["epoch"] == list(range(1, 9)) and history["val_rmse"][-1] < history["val_rmse"][0]

    x = torch.tensor(data.positions[test])  # copies: the data arrays are read-only
    box = torch.tensor(data.box[test])
    _, f_prior = batch_forces(prior, x, box)
    _, f_nn = batch_forces(model, x.float(), box.float())
    exact = data.forces_exact[test]
    err = f_nn.detach().double().numpy() + f_prior.detach().numpy() - exact
    assert np.sqrt(np.mean(err ** 2)) < 0.05 * np.sqrt(np.mean(exact ** 2))

    # Pair curve: the trained weights bound to a two-bead topology (graph buffers come from the topology),
    # plus the prior's repulsion between the two beads.
    pair_top = CGTopology(["a", "b"], ["A", "A"], [p["mass"]] * 2, [0, 1])
    pair_nn = create_model("neural", pair_top, **config)
    pair_nn.load_state_dict(model.state_dict())
    pair_prior = create_model("priors", pair_top, periodic=False, cutoff=prior.config["cutoff"],
                              repulsion=prior.config["repulsion"])
    pair_model = SumModel(pair_top, [pair_prior, pair_nn.double()])
    pairs = all_pairs(top.n_beads, torch.as_tensor(top.excluded_pairs()))
    r = torch.linalg.norm(pair_vectors(torch.tensor(data.positions), pairs[:, 0], pairs[:, 1],
                                       torch.tensor(data.box)), dim=-1).numpy().ravel()
    lo, hi = np.percentile(r[r < p["cutoff"]], [1.0, 99.0])
    grid = np.linspace(lo, hi, 200)
    xy = torch.zeros(len(grid), 2, 3, dtype=torch.float64)
    xy[:, 1, 0] = torch.as_tensor(grid)
    _, f2 = batch_forces(pair_model, xy, None)
    f_ref = lj_pair_force(grid, p["epsilon"], p["sigma"])
    assert np.abs(f2[:, 1, 0].detach().numpy() - f_ref).max() < 0.05 * np.abs(f_ref).max()


def small_training_set(top, n_frames=24, seed=11, min_distance=0.3):
    """Non-periodic frames of the chain cluster without overlaps (non-bonded pairs >= min_distance nm), with
    forces (kJ/mol/nm) of a random 'teacher' network."""
    rng = np.random.default_rng(seed)
    frames = []
    while len(frames) < n_frames:
        x = cluster_positions(top, rng, spacing=0.38) * 1.6
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        bonded = np.zeros_like(d, dtype=bool)
        bonded[top.bonds[:, 0], top.bonds[:, 1]] = bonded[top.bonds[:, 1], top.bonds[:, 0]] = True
        np.fill_diagonal(bonded, True)
        if d[~bonded].min() >= min_distance:
            frames.append(x)
    pos = np.stack(frames)
    teacher = random_model(top, seed=99)
    _, f = forces(teacher, pos)
    return pos, f


def test_interrupt_and_resume_match_uninterrupted_fit(top, tmp_path, monkeypatch):
    """A fit stopped by ENPCG_STOP_AFTER_EPOCH=3 and resumed ends with the same weights and history as an
    uninterrupted one (max |dw| <= 1e-6 max |w|; val RMSE rel 1e-6); the same holds for a fit run as
    epochs=3, then epochs=6 (plateau schedule). Checkpoint, history JSON and PNG curve are written."""
    pos, f = small_training_set(top)
    # CPU: bitwise reproducible (CUDA index_add_ uses atomics, so GPU runs agree only to round-off).
    kw = dict(epochs=6, batch_size=4, lr=3e-3, progress=False, seed=5, device="cpu")

    def fresh():
        return create_model("neural", top, cutoff=0.9, hidden=8, n_layers=1, seed=2)

    def same(a, b):
        wa, wb = a.state_dict(), b.state_dict()
        scale = max(float(v.abs().max()) for v in wa.values())
        return max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6 * scale

    for extra in (dict(schedule="cosine", ema_decay=0.9, weight_decay=0.1), dict(schedule="plateau")):
        tag = extra["schedule"]
        ref, h_ref = train_force_matching(fresh(), pos, f, None, out_dir=tmp_path / f"{tag}_ref", **kw, **extra)
        assert len(h_ref["val_rmse"]) == 6
        out = tmp_path / f"{tag}_split"
        if tag == "cosine":
            monkeypatch.setenv(STOP_ENV, "3")
            with pytest.raises(KeyboardInterrupt):
                train_force_matching(fresh(), pos, f, None, out_dir=out, **kw, **extra)
            monkeypatch.delenv(STOP_ENV)
            assert torch.load(out / CHECKPOINT, weights_only=True)["epoch"] == 3
        else:
            train_force_matching(fresh(), pos, f, None, out_dir=out, **{**kw, "epochs": 3}, **extra)
        res, h_res = train_force_matching(fresh(), pos, f, None, out_dir=out, **kw, **extra)
        assert h_res["epoch"] == list(range(1, 7))
        assert np.allclose(h_res["val_rmse"], h_ref["val_rmse"], rtol=1e-6, atol=0)
        assert same(res, ref)
        assert json.loads((out / HISTORY).read_text())["epoch"] == list(range(1, 7))
        assert (out / CURVE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Training lowered the validation error on this easy set (sanity: the fit is not a no-op).
    assert h_ref["val_rmse"][-1] < 0.9 * h_ref["val_rmse"][0]


def test_resume_refuses_a_foreign_checkpoint(top, tmp_path):
    """A checkpoint written for other data is not silently resumed: EnpcgError names the file."""
    from enpcg.errors import EnpcgError

    pos, f = small_training_set(top, n_frames=8)
    kw = dict(epochs=1, batch_size=4, progress=False, device="cpu")
    train_force_matching(create_model("neural", top, hidden=8, n_layers=1), pos, f, None, out_dir=tmp_path, **kw)
    with pytest.raises(EnpcgError, match="checkpoint.pt"):
        train_force_matching(create_model("neural", top, hidden=8, n_layers=1), pos * 1.01, f, None,
                             out_dir=tmp_path, **kw)
