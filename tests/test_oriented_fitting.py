"""Known-answer fits of the ``oriented_neural`` model to Gay–Berne ellipsoids (OpenMM's GayBerneForce, see
tests/known_answer_oriented.py), without and with an added chiral pair term.

Units: nm, kJ/mol, kJ/mol/nm (forces), kJ/mol (torques). Force and torque sets are compared as
||d|| / ||ref|| over all beads and frames (axial torque components of director beads left out, as in
:func:`enpcg.oriented.fit.oriented_errors`); energies after removing the mean difference (energies are
defined up to a constant).

Data: 40 frames of 64 ellipsoids (default GB parameters, 300 K); frames 0-29 train (noisy forces and
torques, noise 10% of the RMS exact component), frames 30-39 are held out and compared with the EXACT
forces, torques and energies.

Chiral known answer: E_chiral = kappa * sum_{i<j} ((u_i x u_j) . r_hat_ij) (u_i . u_j) w(r_ij), with
w(r) = exp(-(r / R_W)^2) (1 - r / R_C)^2 for r < R_C (0 beyond; value and slope vanish at R_C), minimum
image, r_hat_ij = (R_j - R_i) / r_ij. It is invariant under u_i -> -u_i and under i <-> j, and changes sign
under a mirror reflection (the triple product is a pseudoscalar). Its forces and torques come from autograd
below (checked against finite differences in ``test_chiral_reference_is_consistent``); the Gay–Berne part
of the total is the data's exact/noisy values on the same configurations (force matching needs exact
gradients at each frame, not Boltzmann statistics of the total potential).

Models are trained in float32 (2-3x faster than float64 on the CPU; the tolerances are >= 1e-2). All seeds
are fixed and training runs a fixed number of epochs, so results are deterministic on one torch thread.
Runtime: about 160 s of CPU (data 10 s, achiral fit 45 s, chiral fits 2 x 2 s, contact-model checks 5 s, two
prior + correction fits 2 x 47 s);
about 2x the wall time when the 2 cores are shared with other jobs.
"""
import copy
import time

import numpy as np
import pytest
import torch

from enpcg.models import create_model
from enpcg.oriented.data import OrientedData
from enpcg.oriented.fit import (chiral_energy_fraction, energy_parts, fit_oriented, fit_prior_and_correction,
                               oriented_errors)
from enpcg.oriented.frames import rotation_about

from known_answer_oriented import gay_berne_data

N_FRAMES = 40
N_TRAIN = 30
LENGTH_SCALE = 0.3  # nm, torque weight l: |tau|/l ~ |F| for these data (RMS 23 kJ/mol vs 80 kJ/mol/nm)
R_C = 1.4           # nm, cutoff of the chiral term (= the GB cutoff)
R_W = 0.5           # nm, Gaussian width of the chiral weight
KAPPA = 180.0       # kJ/mol, chiral strength: about 20% of the total force variance (checked below)

# Learned orientation-dependent contact distance (LJ core in the gap h = r - sigma(f) + 0.4 nm, radial basis
# of h) with two Berne-Pechukas channels (learned anisotropies; log-linear contact head), head-tail symmetric
# director features, OpenMM-style switch from 1.2 nm (as the GB reference). Adam with the gradient norm clipped
# at 3x the running median (without it one deep-wall frame froze the anisotropies for the rest of the fit).
MODEL = {"cutoff": 1.4, "n_rbf": 16, "hidden": 32, "depth": 2, "chiral": True, "core_radius": 0.35,
         "energy_scale": 5.0, "seed": 0, "contact": True, "contact_init": 0.4, "contact_width": 0.4,
         "contact_depth": 3.0, "apolar": True, "switch_distance": 1.2, "shape_channels": 2}
FIT = {"lr": 1e-2, "batch_size": 2, "length_scale": LENGTH_SCALE, "val_fraction": 0.0, "seed": 0,
       "device": "cpu", "grad_clip": 3.0}
EPOCHS = 160         # achiral fit from scratch
CHIRAL_EPOCHS = 8    # chiral fits, warm-started from the achiral fit
CHIRAL_LR = 5e-3


# ----------------------------------------------------------------------------------------------- chiral term
def chiral_energy(positions, u, box, kappa):
    """E_chiral (B,) kJ/mol of positions (B, n, 3) nm, directors u (B, n, 3), orthorhombic box (B, 3, 3) nm."""
    n = positions.shape[1]
    i, j = torch.triu_indices(n, n, 1)
    edge = torch.diagonal(box, dim1=-2, dim2=-1).unsqueeze(1)
    d = positions[:, j] - positions[:, i]
    d = d - edge * torch.round(d / edge)
    r = torch.linalg.norm(d, dim=-1)
    r_hat = d / r.unsqueeze(-1)
    ui, uj = u[:, i], u[:, j]
    p = (torch.linalg.cross(ui, uj, dim=-1) * r_hat).sum(-1)
    c = (ui * uj).sum(-1)
    w = torch.where(r < R_C, torch.exp(-(r / R_W) ** 2) * (1.0 - r / R_C) ** 2, torch.zeros_like(r))
    return kappa * (p * c * w).sum(-1)


def chiral_reference(positions, axes, box, kappa):
    """Exact (energies (F,), forces (F, n, 3), torques (F, n, 3)) of the chiral term, float64 autograd:
    F = -dE/dR, tau = -u x dE/du."""
    x = torch.tensor(np.asarray(positions), dtype=torch.float64, requires_grad=True)
    u = torch.tensor(np.asarray(axes)[..., 0], dtype=torch.float64, requires_grad=True)
    e = chiral_energy(x, u, torch.tensor(np.asarray(box), dtype=torch.float64), kappa)
    gx, gu = torch.autograd.grad(e.sum(), (x, u))
    tau = -torch.linalg.cross(u, gu, dim=-1)
    return e.detach().numpy(), -gx.numpy(), tau.detach().numpy()


# Neural correction on top of a fitted Gay-Berne prior (fit_prior_and_correction): the prior starts 25-150% off
# the truth; the correction is a plain oriented_neural term (radial basis of r, head-tail symmetric features,
# chiral channel), energy scale 1 kJ/mol, Adam lr 3e-3 with decoupled weight decay 1, 80 epochs, 20% of the
# training frames held out for the best state.
PRIOR_START = {"sigma": 0.5, "epsilon": 2.0, "s_par": 1.0, "s_perp": 0.5, "e_par": 0.5, "e_perp": 1.0}
CORRECTION = {"cutoff": 1.4, "n_rbf": 16, "hidden": 32, "depth": 2, "chiral": True, "energy_scale": 1.0,
              "seed": 0, "apolar": True, "switch_distance": 1.2}
CORRECTION_FIT = {"epochs": 80, "lr": 3e-3, "weight_decay": 1.0, "val_fraction": 0.2, "length_scale": LENGTH_SCALE,
                  "seed": 0, "device": "cpu"}


# -------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def gb():
    return gay_berne_data(n_frames=N_FRAMES)


def _data(d, forces, torques, energies, frames):
    return OrientedData(d["positions"][frames], d["axes"][frames], forces[frames], torques[frames],
                        d["box"][frames], d["topology"], energies[frames])


TRAIN, TEST = slice(0, N_TRAIN), slice(N_TRAIN, N_FRAMES)


@pytest.fixture(scope="module")
def achiral_fit(gb):
    model = create_model("oriented_neural", gb["topology"], **MODEL).float()
    t0 = time.perf_counter()
    fit_oriented(model, _data(gb, gb["forces"], gb["torques"], gb["energies"], TRAIN), epochs=EPOCHS, **FIT)
    seconds = time.perf_counter() - t0
    test = _data(gb, gb["forces_exact"], gb["torques_exact"], gb["energies"], TEST)
    return {"model": model, "test": test, "seconds": seconds}


def prior_and_correction_fit(gb, kappa, chiral_reference_data):
    """Fit prior + correction to the noisy GB (+ kappa x chiral) training frames; held-out errors of the prior
    alone and of the sum against the exact total."""
    e1, f1, t1 = chiral_reference_data
    train = _data(gb, gb["forces"] + kappa * f1, gb["torques"] + kappa * t1, gb["energies"] + kappa * e1, TRAIN)
    test = _data(gb, gb["forces_exact"] + kappa * f1, gb["torques_exact"] + kappa * t1,
                 gb["energies"] + kappa * e1, TEST)
    p = gb["params"]
    prior = create_model("gay_berne", gb["topology"], cutoff=p["cutoff"], switch_distance=p["switch_distance"],
                         **PRIOR_START).double()
    correction = create_model("oriented_neural", gb["topology"], **CORRECTION).float()
    t0 = time.perf_counter()
    model, _ = fit_prior_and_correction(prior, correction, train, **CORRECTION_FIT)
    seconds = time.perf_counter() - t0
    return {"prior": oriented_errors(model.terms[0], test), "sum": oriented_errors(model, test),
            "chiral_fraction": chiral_energy_fraction(model, test), "seconds": seconds}


@pytest.fixture(scope="module")
def chiral_reference_data(gb):
    return chiral_reference(gb["positions"], gb["axes"], gb["box"], 1.0)


@pytest.fixture(scope="module")
def chiral_fits(gb, achiral_fit, chiral_reference_data):
    """Fits to GB + kappa E_chiral and to its mirror image GB - kappa E_chiral, both warm-started from the
    achiral fit (whose odd channel is near zero, so neither sign is favoured)."""
    e1, f1, t1 = chiral_reference_data
    out = {}
    for sign in (+1, -1):
        k = sign * KAPPA
        model = copy.deepcopy(achiral_fit["model"])
        train = _data(gb, gb["forces"] + k * f1, gb["torques"] + k * t1, gb["energies"] + k * e1, TRAIN)
        t0 = time.perf_counter()
        fit_oriented(model, train, epochs=CHIRAL_EPOCHS, **{**FIT, "lr": CHIRAL_LR})
        test = _data(gb, gb["forces_exact"] + k * f1, gb["torques_exact"] + k * t1, gb["energies"] + k * e1,
                     TEST)
        out[sign] = {"model": model, "test": test, "true_odd": k * e1[TEST],
                     "seconds": time.perf_counter() - t0}
    return out


# ------------------------------------------------------------------------------------------------------ tests
def test_chiral_reference_is_consistent(gb, chiral_reference_data):
    """The chiral reference itself: (a) forces and torques equal -dE/dR and -dE/dtheta by central differences
    (step 1e-5 nm / rad, float64) within 1e-6 relative; (b) E(mirror) = -E (x -> -x of positions and
    directors) and E(u_i -> -u_i) = E to 1e-10 relative; (c) kappa gives the chiral term 10-30% of the
    variance of the total force components and of the (perpendicular) torque components."""
    pos, axes, box = gb["positions"][:1], gb["axes"][:1], gb["box"][:1]
    e, f, tau = chiral_reference(pos, axes, box, KAPPA)
    h = 1e-5
    beads = [0, 17, 42]
    fd_f, fd_t, ref_f, ref_t = [], [], [], []
    for b in beads:
        for k in range(3):
            ep = []
            for s in (1, -1):
                x = pos.copy()
                x[0, b, k] += s * h
                ep.append(chiral_reference(x, axes, box, KAPPA)[0][0])
            fd_f.append(-(ep[0] - ep[1]) / (2 * h))
            ref_f.append(f[0, b, k])
            et = []
            for s in (1, -1):
                a = axes.copy()
                a[0, b] = rotation_about(np.eye(3)[k], s * h) @ a[0, b]
                et.append(chiral_reference(pos, a, box, KAPPA)[0][0])
            fd_t.append(-(et[0] - et[1]) / (2 * h))
            ref_t.append(tau[0, b, k])
    fd_f, fd_t, ref_f, ref_t = map(np.array, (fd_f, fd_t, ref_f, ref_t))
    assert np.linalg.norm(fd_f - ref_f) / np.linalg.norm(ref_f) < 1e-6
    assert np.linalg.norm(fd_t - ref_t) / np.linalg.norm(ref_t) < 1e-6

    mirror = np.diag([-1.0, 1.0, 1.0])
    e_m = chiral_reference(pos @ mirror, np.einsum("ab,fnbc->fnac", mirror, axes), box, KAPPA)[0]
    assert abs(e_m[0] + e[0]) <= 1e-10 * abs(e[0])
    flipped = axes.copy()
    flipped[0, ::3] *= -1.0
    assert abs(chiral_reference(pos, flipped, box, KAPPA)[0][0] - e[0]) <= 1e-10 * abs(e[0])

    e1, f1, t1 = chiral_reference_data
    u = gb["axes"][..., 0]
    t_gb = gb["torques_exact"] - np.sum(gb["torques_exact"] * u, -1, keepdims=True) * u
    share_f = np.var(KAPPA * f1) / np.var(gb["forces_exact"] + KAPPA * f1)
    share_t = np.var(KAPPA * t1) / np.var(t_gb + KAPPA * t1)
    print(f"chiral share of force variance {share_f:.3f}, of torque variance {share_t:.3f}")
    assert 0.1 <= share_f <= 0.3 and 0.1 <= share_t <= 0.3


# History (one torch thread, held-out relative RMS force / torque / centred energy): the first model
# (isotropic core, radial basis of r, polar features) 0.48 / 0.56 / 1.26; the contact-distance model (softplus
# of an MLP of polynomial features, lr 3e-2, 80 epochs) 0.19 / 0.23 / 0.29. Its contact distance could not be
# made accurate enough: regressed directly on the exact GB contact distance it stayed 0.006 nm RMS off, and on
# the r^-12 wall a 1% error of the contact distance is a ~13% force error. With the Berne-Pechukas channels
# (log-linear contact head, exact for Gay-Berne ellipsoids at the right anisotropies: checked by setting the
# weights by hand, 3e-7) and clipped Adam: forces and torques about 0.04 (the claim below), the centred
# energy 0.06-0.14 depending on the run length and frame count (measured variants: 30 or 60 training frames,
# 80-240 epochs, 2-10 channels, L-BFGS polish, weight averaging). The energy's variance over frames comes
# mostly from the attractive wells (r = 0.5-0.9 nm), whose forces are small next to the wall's, and the fits
# end in a local minimum (loss 330-370 against the noise floor of 285 (kJ/mol/nm)^2) where the wall is matched
# with well depths 15-20% off pair by pair. Even with the anisotropies started at the exact values (0.8, 0.382)
# and the MLPs frozen at zero (60 training frames, Adam then L-BFGS), the fit stops at loss 299: forces 0.019,
# torques 0.017, energy 0.126. The 6-parameter Gay-Berne fit on the same frames reaches forces 0.0015 and
# energy 0.0047: the energy needs forces good to ~0.5%, i.e. a fit converged to the noise floor. So the energy
# claim of the network trained from scratch stays a strict expected failure (an XPASS fails the run, so the
# marker must be removed once it holds). The claim itself holds with the product's recommended route, a fitted
# Gay-Berne prior plus a neural correction (test_neural_correction_on_gay_berne_prior_known_answer), and that
# correction does learn what the prior lacks (test_neural_correction_learns_what_the_prior_lacks).
ENERGY_REASON = ("forces and torques reach ~0.04, but the held-out centred energy stays at ~0.06-0.14: the fit "
                 "ends in a local minimum with the attractive wells 15-20% off; see the comment above")


def test_neural_known_answer_forces_and_torques(achiral_fit):
    """The neural model reproduces held-out forces and torques within 5% RMS (exact reference): force and torque
    relative RMS errors <= 0.05 each (observed 0.040 and 0.041, 160 epochs, about 45 s of training)."""
    err = oriented_errors(achiral_fit["model"], achiral_fit["test"])
    print(f"held-out relative RMS errors {err} after {achiral_fit['seconds']:.1f} s of training")
    assert err["force"] <= 0.05
    assert err["torque"] <= 0.05


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=ENERGY_REASON)
def test_neural_known_answer_energies(achiral_fit):
    """The neural model reproduces held-out energies within 5% RMS: centred energy relative RMS error <= 0.05
    (observed 0.125; see the comment above)."""
    err = oriented_errors(achiral_fit["model"], achiral_fit["test"])
    print(f"held-out relative RMS errors {err}")
    assert err["energy"] <= 0.05


def test_neural_correction_on_gay_berne_prior_known_answer(gb, chiral_reference_data):
    """Known answer 1 with the product's recommended route for uniaxial beads: a Gay-Berne prior fitted first,
    then a neural correction (fit_prior_and_correction). Held-out energies (centred), forces and torques within
    5% RMS of the exact reference: each relative RMS error <= 0.05 (observed 0.015 / 0.005 / 0.003: the
    correction leaves the converged prior's 0.0045 / 0.0024 / 0.0024 nearly intact), the chiral channel < 1% of
    the energy variance."""
    res = prior_and_correction_fit(gb, 0.0, chiral_reference_data)
    print(f"prior alone {res['prior']}, prior + correction {res['sum']}, chiral fraction "
          f"{res['chiral_fraction']:.4f}, {res['seconds']:.1f} s")
    assert res["sum"]["energy"] <= 0.05
    assert res["sum"]["force"] <= 0.05 and res["sum"]["torque"] <= 0.05
    assert res["chiral_fraction"] < 0.01


def test_neural_correction_learns_what_the_prior_lacks(gb, chiral_reference_data):
    """The same route on GB + chiral data (the chiral term is about 20% of the force variance): the achiral
    prior alone misses it (held-out force error > 0.3; observed 0.46, energy 0.97), the correction learns it:
    forces <= 0.08, torques and centred energies <= 0.05 (observed 0.058 / 0.018 / 0.020), and the
    pseudoscalar channel carries most of the energy variance (> 0.5; observed 0.99)."""
    res = prior_and_correction_fit(gb, KAPPA, chiral_reference_data)
    print(f"prior alone {res['prior']}, prior + correction {res['sum']}, chiral fraction "
          f"{res['chiral_fraction']:.4f}, {res['seconds']:.1f} s")
    assert res["prior"]["force"] > 0.3
    assert res["sum"]["force"] <= 0.08
    assert res["sum"]["torque"] <= 0.05 and res["sum"]["energy"] <= 0.05
    assert res["chiral_fraction"] > 0.5


def test_achiral_data_give_no_chiral_energy(achiral_fit):
    """On achiral GB data the pseudoscalar channel carries < 1% of the energy variance of held-out frames
    (observed 0.0006 with fit_oriented's default odd_decay = 1; without the decay the channel soaked up noise
    and reached 2-5%)."""
    frac = chiral_energy_fraction(achiral_fit["model"], achiral_fit["test"])
    print(f"achiral chiral_energy_fraction {frac:.4f}")
    assert frac < 0.01


def test_neural_fit_learns_gay_berne(achiral_fit):
    """Guard of the energy level reached now (NOT the issue's claim, see test_neural_known_answer_energies):
    held-out centred energy relative RMS <= 0.25 (observed 0.125; 1.0 is the zero model), and the odd channel
    carries < 10% of the energy variance (observed 0.0006)."""
    err = oriented_errors(achiral_fit["model"], achiral_fit["test"])
    frac = chiral_energy_fraction(achiral_fit["model"], achiral_fit["test"])
    print(f"held-out errors {err}, chiral fraction {frac:.4f}")
    assert err["energy"] <= 0.25
    assert frac < 0.1


def _odd_vs_true(fit):
    _, odd = energy_parts(fit["model"], fit["test"])
    true = fit["true_odd"]
    r = float(np.corrcoef(odd, true)[0, 1])
    slope = float(np.cov(odd, true)[0, 1] / np.var(true, ddof=1))
    return r, slope


@pytest.mark.parametrize("sign", [+1, -1], ids=["kappa", "mirror"])
def test_chiral_sign_is_recovered(chiral_fits, sign):
    """Fitted to GB + s kappa E_chiral (s = +1, and s = -1 for the mirror data), the model's odd energy on
    held-out frames follows the true chiral energy s kappa E_chiral with the right sign: Pearson r > 0.8 and
    least-squares slope of E_odd on s kappa E_chiral in [0.5, 1.5] (so the two fits' odd energies have
    opposite signs), and chiral_energy_fraction > 0.01."""
    fit = chiral_fits[sign]
    r, slope = _odd_vs_true(fit)
    frac = chiral_energy_fraction(fit["model"], fit["test"])
    err = oriented_errors(fit["model"], fit["test"])
    print(f"sign {sign:+d}: r {r:.3f}, slope {slope:.3f}, chiral fraction {frac:.3f}, errors {err}, "
          f"{fit['seconds']:.1f} s")
    assert r > 0.8
    assert 0.5 <= slope <= 1.5
    assert frac > 0.01


# ------------------------------------------------------------------- contact-distance / apolar model options
@pytest.mark.parametrize("kind,extra", [("director", {"apolar": True}), ("director", {"apolar": True, "shape_channels": 3}),
                                        ("director", {}), ("frame", {})],
                         ids=["director-apolar", "director-apolar-shape", "director-polar", "frame"])
def test_contact_model_is_consistent(kind, extra):
    """``contact=True`` (learned orientation-dependent contact distance, LJ core in the gap h) with random
    weights, float64: torques are -dE/dtheta by central differences (1e-6 relative), the energy is invariant
    under a global rotation + translation (1e-12), the TorchScript model gives the same energy (1e-12), and
    with ``apolar`` flipping any director u -> -u leaves the energy unchanged (1e-12)."""
    from enpcg.oriented import forces_and_torques, random_rotations
    from enpcg.topology import CGTopology

    n = 10
    topo = CGTopology([f"M{i}" for i in range(n)], ["A"] * n, [150.0] * n, list(range(n)), orientations=[kind] * n)
    model = create_model("oriented_neural", topo, cutoff=1.0, hidden=16, contact=True, contact_init=0.3,
                         contact_width=0.3, switch_distance=0.8, seed=2, **extra).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(std=0.4 if name.startswith(("even.", "odd.")) else 0.1)
    rng = np.random.default_rng(3)
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n] * 0.6
    pos = grid + rng.normal(scale=0.05, size=(n, 3))
    axes = random_rotations(n, rng)
    box = np.eye(3) * 1.8
    e, _, tau = forces_and_torques(model, pos, axes, box)
    h = 1e-5
    fd = np.zeros_like(tau)
    for i in range(n):
        for k in range(3):
            ep = []
            for s in (1, -1):
                a = axes.copy()
                a[i] = rotation_about(np.eye(3)[k], s * h) @ a[i]
                ep.append(forces_and_torques(model, pos, a, box)[0])
            fd[i, k] = -(ep[0] - ep[1]) / (2 * h)
    assert np.linalg.norm(tau - fd) / np.linalg.norm(tau) < 1e-6
    e0 = forces_and_torques(model, pos, axes, None)[0]
    rot = random_rotations(1, rng)[0]
    assert abs(forces_and_torques(model, pos @ rot.T + 0.3, rot @ axes, None)[0] - e0) <= 1e-12 * max(1, abs(e0))
    scripted = torch.jit.script(model)
    x, q = torch.tensor(pos)[None], torch.tensor(axes)[None]
    b = torch.tensor(box)[None]
    assert abs(float(scripted.batch_energy(x, q, b)[0].detach()) - e) <= 1e-12 * max(1, abs(e))
    if extra.get("apolar"):
        flipped = axes.copy()
        flipped[::2, :, 0] *= -1.0
        assert abs(forces_and_torques(model, pos, flipped, box)[0] - e) <= 1e-12 * max(1, abs(e))


def test_default_model_keeps_old_weights():
    """Without the new keys the model has the old state-dict keys (saved models still load)."""
    from enpcg.topology import CGTopology

    topo = CGTopology(["M0", "M1"], ["A"] * 2, [1.0] * 2, [0, 1], orientations=["director"] * 2)
    keys = set(create_model("oriented_neural", topo, seed=0).state_dict())
    assert not any(k.startswith("contact") for k in keys)
    assert {"core_logit", "pair_type_embedding.weight", "even.out.weight", "odd.out.weight"} <= keys
