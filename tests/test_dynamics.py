"""Known-answer tests of enpcg.dynamics (time correlation functions) and enpcg.pair_structure (g(r), S(q)).

Every test builds a trajectory whose answer is known analytically (ballistic ideal gas, free Brownian
particles, free Brownian rotors, fixed-length jumps, ideal gas, simple cubic lattice), runs the analysis on a
real mdtraj trajectory (float32 positions, wrapped into the periodic box) and compares with the formula.
Statistical tolerances were set from the seed-to-seed scatter measured for these exact sizes (quoted in
each docstring) and are at least ~3.5 of those standard deviations; the seeds are fixed so the tests are
deterministic. No OpenMM context is needed: every input is an analytic trajectory.

Units: nm, ps, amu, K, 1/nm (q), nm^2/ps (D), 1/ps (D_r).
"""
import math

import mdtraj as md
import numpy as np
import pytest

from enpcg import dynamics as dy
from enpcg import pair_structure as ps
from enpcg.errors import EnpcgError

ARGON_MASS = 39.9481  # amu, mdtraj's element mass (the topology below uses argon)


def _topology(n):
    top = md.Topology()
    chain = top.add_chain()
    for _ in range(n):
        res = top.add_residue("AR", chain)
        top.add_atom("Ar", md.element.argon, res)
    return top


def _traj(xyz, lengths, dt=1.0):
    """mdtraj trajectory of positions xyz (F, N, 3) nm wrapped into an orthorhombic box of edges lengths (nm)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    n_frames = len(xyz)
    lengths = np.broadcast_to(np.asarray(lengths, dtype=np.float64), (n_frames, 3))
    wrapped = np.mod(xyz, lengths[:, None, :])
    return md.Trajectory(wrapped.astype(np.float32), _topology(xyz.shape[1]), time=dt * np.arange(n_frames),
                         unitcell_lengths=np.array(lengths), unitcell_angles=np.full((n_frames, 3), 90.0))


def _brownian(n, n_frames, box, diff, dt, seed):
    """Unwrapped positions (F, N, 3) nm of free Brownian particles: Gaussian steps of variance 2 D dt per axis."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(0.0, math.sqrt(2 * diff * dt), (n_frames - 1, n, 3))
    x0 = rng.uniform(0.0, box, (1, n, 3))
    return np.concatenate([x0, x0 + np.cumsum(steps, axis=0)])


def _rotor(n, n_frames, d_rot, dt, seed):
    """Unit vectors (F, N, 3) of free Brownian rotors: each step rotates by a rotation vector with independent
    Gaussian components of variance 2 D_r dt about lab axes (Rodrigues formula)."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    out = np.empty((n_frames, n, 3))
    out[0] = u
    for f in range(1, n_frames):
        w = rng.normal(0.0, math.sqrt(2 * d_rot * dt), (n, 3))
        th = np.linalg.norm(w, axis=1, keepdims=True)
        k = w / th
        u = u * np.cos(th) + np.cross(k, u) * np.sin(th) + k * np.sum(k * u, axis=1, keepdims=True) * (1 - np.cos(th))
        out[f] = u
    return out


# Free Brownian particles shared by several tests: D = 0.01 nm^2/ps, 1 ps frames, 3 nm box; the largest of
# the 1.2e6 Gaussian steps (sd 0.14 nm per axis) stays far below the 0.45 box-edge unwrap limit (1.35 nm).
BROWN_N, BROWN_F, BROWN_L, BROWN_D, BROWN_DT = 1000, 400, 3.0, 0.01, 1.0


@pytest.fixture(scope="module")
def brownian():
    x = _brownian(BROWN_N, BROWN_F, BROWN_L, BROWN_D, BROWN_DT, seed=7)
    return x, _traj(x, BROWN_L, BROWN_DT)


# --------------------------------------------------------------------------------------- translations
def test_lag_indices_are_log_spaced_and_complete():
    """lag_indices: unique increasing integers starting 0, 1 and ending at n_frames - 1; successive ratios
    of the lags above 10 stay below 1.25 (quasi-log spacing of 60 lags over 3 decades: 10^(3/59) = 1.12)."""
    lags = dy.lag_indices(1000)
    assert lags[0] == 0 and lags[1] == 1 and lags[-1] == 999
    assert np.all(np.diff(lags) > 0)
    big = lags[lags >= 10]
    assert np.max(big[1:] / big[:-1]) < 1.25
    assert list(dy.lag_indices(3)) == [0, 1, 2]
    with pytest.raises(EnpcgError, match="n_frames"):
        dy.lag_indices(1)


def test_ballistic_ideal_gas_unwrap_and_msd():
    """Ideal gas moving ballistically, x(t) = x0 + v t, v Maxwell-Boltzmann for argon at 120 K
    (kT/m = R T / m with R = openmm.unit.MOLAR_GAS_CONSTANT_R), written wrapped into a 2 nm box:
    * unwrap recovers x(t) to 1e-4 nm (float32 storage; particles cross the box up to ~4 times);
    * MSD (remove_drift=False) equals mean|v|^2 t^2 of the sample to 1e-4 relative, and 3 (kT/m) t^2 within
      3 x the sampling sd sqrt(2 / (3 N)) = 1.8 % for N = 2000;
    * remove_drift=True gives mean|v - v_com|^2 t^2 to 1e-4 relative;
    * diffusion_coefficient refuses: the MSD never becomes diffusive (slope 2 throughout)."""
    import openmm.unit as u

    n, n_frames, dt, box, temp = 2000, 100, 0.5, 2.0, 120.0
    r_gas = u.MOLAR_GAS_CONSTANT_R.value_in_unit(u.kilojoule_per_mole / u.kelvin)
    kt_over_m = r_gas * temp / ARGON_MASS  # nm^2/ps^2
    rng = np.random.default_rng(11)
    x0 = rng.uniform(0.0, box, (n, 3))
    v = rng.normal(0.0, math.sqrt(kt_over_m), (n, 3))
    t = dt * np.arange(n_frames)
    x = x0[None] + v[None] * t[:, None, None]
    traj = _traj(x, box, dt)

    unwrapped = dy.unwrap(traj)
    err = np.abs(unwrapped - x).max()
    assert err < 1e-4, f"unwrap differs from the true path by {err:.3g} nm (tolerance 1e-4 nm)"

    tl, msd = dy.mean_squared_displacement(traj, remove_drift=False, progress=False)
    v2 = np.mean(np.sum(v ** 2, axis=1))
    np.testing.assert_allclose(msd[1:], v2 * tl[1:] ** 2, rtol=1e-4)
    rel = abs(v2 / (3 * kt_over_m) - 1)
    assert rel < 3 * math.sqrt(2 / (3 * n)), f"<v^2> is {rel:.3%} off 3kT/m (tolerance 3 sd = 5.5 %)"

    tl, msd_rel = dy.mean_squared_displacement(traj, remove_drift=True, progress=False)
    v2_rel = np.mean(np.sum((v - v.mean(axis=0)) ** 2, axis=1))
    np.testing.assert_allclose(msd_rel[1:], v2_rel * tl[1:] ** 2, rtol=1e-4)

    with pytest.raises(EnpcgError, match="too short to reach the diffusive regime.*run longer"):
        dy.diffusion_coefficient(tl, msd)


def test_brownian_msd_and_diffusion_coefficient(brownian):
    """Free Brownian particles (D = 0.01 nm^2/ps, N = 1000, 400 frames of 1 ps, wrapped in a 3 nm box):
    * MSD in the lab frame (remove_drift=False) = 6 D t within 4 % up to t = 100 ps;
    * fitted D (default window) = D within 4 % without drift removal and D (1 - 1/N) within 4 % with it
      (the centre of mass of N free particles takes 1/N of the MSD). Measured seed-to-seed sd of the fit
      over 12 seeds at these sizes: 1.0 %, so 4 % is 4 sd (the least-squares stderr, ~0.2 %, ignores the
      correlation between MSD points and is only a lower bound)."""
    _, traj = brownian
    tl, msd_lab = dy.mean_squared_displacement(traj, remove_drift=False, progress=False)
    early = (tl > 0) & (tl <= 100)
    dev = np.max(np.abs(msd_lab[early] / (6 * BROWN_D * tl[early]) - 1))
    assert dev < 0.04, f"lab-frame MSD deviates {dev:.3%} from 6 D t (tolerance 4 %)"

    fit_lab = dy.diffusion_coefficient(tl, msd_lab)
    assert abs(fit_lab["D"] / BROWN_D - 1) < 0.04, fit_lab
    tl, msd = dy.mean_squared_displacement(traj, progress=False)
    fit = dy.diffusion_coefficient(tl, msd)
    expected = BROWN_D * (1 - 1 / BROWN_N)
    assert abs(fit["D"] / expected - 1) < 0.04, fit
    assert 0 < fit["stderr"] < 0.01 * expected
    assert fit["t_min"] > 1.0 and fit["t_max"] <= 0.5 * tl[-1] < fit["t_max"] * 1.3 and fit["n_points"] >= 10
    # an explicit window is honoured
    fit_w = dy.diffusion_coefficient(tl, msd, t_min=50.0, t_max=200.0)
    assert fit_w["t_min"] >= 50.0 and fit_w["t_max"] <= 200.0
    assert abs(fit_w["D"] / expected - 1) < 0.06, fit_w


def test_diffusion_window_skips_ballistic_and_cage_plateau():
    """Glass-like analytic MSD: ballistic start, a cage plateau of height A = 0.01 nm^2, then diffusion,
    msd = A (1 - exp(-(t / 0.1 ps)^2)) + 6 D t with D = 1e-4 nm^2/ps, on log-spaced lags to 1000 ps. The
    default window must start after the slope has risen back through 0.9 (6 D t >= 9 A, t >= 150 ps) and the
    fit must return D and the intercept A to 1e-6 relative (the curve is exactly linear there). Cut at 5 ps
    (still on the plateau) it must refuse with the fix (run longer)."""
    t = dy.lag_indices(100_000).astype(float) * 0.01
    d, a = 1e-4, 0.01
    msd = a * (1 - np.exp(-(t / 0.1) ** 2)) + 6 * d * t
    fit = dy.diffusion_coefficient(t, msd)
    assert fit["t_min"] >= 150.0, fit
    assert fit["D"] == pytest.approx(d, rel=1e-6) and fit["intercept"] == pytest.approx(a, rel=1e-6)
    short = t < 5.0
    with pytest.raises(EnpcgError, match="too short.*run longer"):
        dy.diffusion_coefficient(t[short], msd[short])


def test_drift_removal_cancels_uniform_drift(brownian):
    """Adding the same drift u t to every particle (u = 0.02 nm/ps per axis, 8 nm over the run) leaves the
    drift-corrected MSD unchanged to 1e-5 relative (float32 storage), while the lab-frame MSD grows by
    |u|^2 t^2 (checked to 1e-3 relative of the drift term at the longest lag). The corrected MSD also
    obeys the exact identity msd_com = msd_lab - <|d_com|^2> (d_com: centre-of-mass displacement), 1e-6."""
    x, traj = brownian
    drift = np.array([0.02, -0.02, 0.02])  # nm/ps
    t = BROWN_DT * np.arange(BROWN_F)
    drifted = _traj(x + drift * t[:, None, None], BROWN_L, BROWN_DT)
    lags = dy.lag_indices(BROWN_F, 30)
    tl, msd = dy.mean_squared_displacement(traj, lags=lags, progress=False)
    _, msd_drift = dy.mean_squared_displacement(drifted, lags=lags, progress=False)
    np.testing.assert_allclose(msd_drift[1:], msd[1:], rtol=1e-5)

    _, lab = dy.mean_squared_displacement(drifted, lags=lags, remove_drift=False, progress=False)
    _, lab0 = dy.mean_squared_displacement(traj, lags=lags, remove_drift=False, progress=False)
    extra = lab[-1] - lab0[-1]
    # the drift term plus the cross term 2 u . <d> with the (random) COM displacement of the sample
    com = x.mean(axis=1)
    cross = 2 * np.mean([drift @ (com[i + lags[-1]] - com[i]) * lags[-1] for i in range(BROWN_F - lags[-1])])
    expected_extra = np.sum(drift ** 2) * tl[-1] ** 2 + cross
    assert abs(extra / expected_extra - 1) < 1e-3

    dcom2 = np.array([np.mean(np.sum((com[lag:] - com[:BROWN_F - lag]) ** 2, axis=1)) if lag else 0.0
                      for lag in lags])
    np.testing.assert_allclose(msd[1:], (lab0 - dcom2)[1:], rtol=1e-6)


def test_self_intermediate_scattering_and_alpha2_of_gaussian_displacements(brownian):
    """Brownian displacements are Gaussian, so F_s(q, t) = exp(-q^2 <r^2>(t) / 6) with the measured MSD, to
    0.01 absolute at q = 2 nm^-1 (measured max 0.006, at the longest lags where one origin of 1000
    particles leaves a sampling sd ~0.002); tau_alpha (1/e) = 1 / (q^2 D (1 - 1/N)) within 4 % (measured
    0.2 %); alpha_2 = 0 within 0.05 for lags with >= 100 origins (measured max |alpha_2| there: 0.014)."""
    _, traj = brownian
    q = 2.0
    tl, fs = dy.self_intermediate_scattering(traj, q, progress=False)
    _, msd = dy.mean_squared_displacement(traj, progress=False)
    assert fs[0] == 1.0
    np.testing.assert_allclose(fs, np.exp(-q * q * msd / 6), atol=0.01)
    tau = dy.alpha_relaxation_time(tl, fs)
    expected = 1 / (q * q * BROWN_D * (1 - 1 / BROWN_N))
    assert abs(tau / expected - 1) < 0.04, (tau, expected)

    tl, a2 = dy.non_gaussian_parameter(traj, progress=False)
    assert a2[0] == 0.0
    many = tl <= (BROWN_F - 100) * BROWN_DT
    assert np.max(np.abs(a2[many])) < 0.05, np.max(np.abs(a2[many]))


def test_fixed_length_jumps_give_alpha2_minus_0p4():
    """Isotropic jumps of fixed length a = 0.3 nm between two frames: <r^2> = a^2 and <r^4> = a^4 exactly,
    so alpha_2 = 3/5 - 1 = -0.4, F_s(q) = sin(q a) / (q a) and MSD = a^2, all to 1e-4 (float32 positions)."""
    n, a, box = 5000, 0.3, 4.0
    rng = np.random.default_rng(3)
    x0 = rng.uniform(0.0, box, (n, 3))
    e = rng.normal(size=(n, 3))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    traj = _traj(np.stack([x0, x0 + a * e]), box, dt=2.0)
    t, a2 = dy.non_gaussian_parameter(traj, remove_drift=False, progress=False)
    assert list(t) == [0.0, 2.0]
    assert abs(a2[1] + 0.4) < 1e-4, a2
    _, msd = dy.mean_squared_displacement(traj, remove_drift=False, progress=False)
    assert abs(msd[1] / a ** 2 - 1) < 1e-4
    for q in (5.0, 12.0):
        _, fs = dy.self_intermediate_scattering(traj, q, remove_drift=False, progress=False)
        assert abs(fs[1] - math.sin(q * a) / (q * a)) < 1e-4, (q, fs[1])


# --------------------------------------------------------------------------------------- rotations
def test_free_brownian_rotor_correlations():
    """Free rotational diffusion (Debye): C_l(t) = exp(-l (l + 1) D_r t). 2000 rotors, D_r = 0.01 /ps,
    600 frames of 1 ps (tau_1 = 50 ps, tau_2 = 16.7 ps); the discrete Gaussian rotation steps change the
    decay rate by 0.2 % (exact one-step value 1/3 + 2/3 (1 - s^2) exp(-s^2/2), s^2 = 2 D_r dt, for l = 1).
    Vectors are given unnormalised (random lengths 0.5-2). Asserts: |C_l - exp| < 0.02 for t <= 3 tau_l;
    relaxation_time (1/e and integral) = 1 / (l (l + 1) D_r) within 4 %. Measured seed-to-seed sd over 6
    seeds: 0.8 % (l = 1, 1/e), 1.2 % (l = 1, integral), 0.4 % and 0.6 % (l = 2)."""
    n, n_frames, d_rot, dt = 2000, 600, 0.01, 1.0
    u = _rotor(n, n_frames, d_rot, dt, seed=5)
    lengths = np.random.default_rng(6).uniform(0.5, 2.0, (n_frames, n, 1))
    times = dt * np.arange(n_frames)
    for l in (1, 2):
        tl, c = dy.rotational_correlation(u * lengths, times, l, progress=False)
        tau = 1.0 / (l * (l + 1) * d_rot)
        assert c[0] == pytest.approx(1.0, abs=1e-12)
        near = tl <= 3 * tau
        dev = np.max(np.abs(c[near] - np.exp(-tl[near] / tau)))
        assert dev < 0.02, f"C_{l} deviates {dev:.3g} from exp(-t/tau) (tolerance 0.02)"
        for method in ("1/e", "integral"):
            got = dy.relaxation_time(tl, c, method=method)
            assert abs(got / tau - 1) < 0.04, f"l={l} {method}: {got:.4g} ps vs {tau:.4g} ps (tolerance 4 %)"


def test_relaxation_times_of_known_curves():
    """On an exact exponential exp(-t/7.3 ps) sampled at log-spaced lags (0, 1, ..., 999 ps):
    1/e crossing = 7.3 ps to 0.5 % (log-linear interpolation error), integral = 7.3 ps to 1 % (trapezoid error
    with the single-exponential tail closure); a stretched exponential exp(-(t/7.3)^0.5) gives the 1/e time
    7.3 ps to 1 %. A curve that never decays raises an EnpcgError naming the fix (run longer)."""
    tau = 7.3
    t = dy.lag_indices(1000).astype(float)
    c = np.exp(-t / tau)
    assert abs(dy.alpha_relaxation_time(t, c) / tau - 1) < 0.005
    assert abs(dy.relaxation_time(t, c, method="integral") / tau - 1) < 0.01
    assert abs(dy.alpha_relaxation_time(t, np.exp(-np.sqrt(t / tau))) / tau - 1) < 0.01
    flat = 0.9 + 0.0 * t
    with pytest.raises(EnpcgError, match="never falls below.*run longer"):
        dy.alpha_relaxation_time(t, flat)
    with pytest.raises(EnpcgError, match="never drops below.*run longer"):
        dy.relaxation_time(t, flat, method="integral")
    with pytest.raises(EnpcgError, match="method"):
        dy.relaxation_time(t, c, method="fit")


# --------------------------------------------------------------------------------------- errors
def test_unwrap_errors_and_no_box():
    """unwrap: a step of 0.48 box edges between frames (inside the 0.45-0.5 ambiguity band; a longer true step
    is indistinguishable from a short one the other way and cannot be caught) raises an EnpcgError naming the
    fix (save frames more often); a triclinic box raises; a trajectory without a unit cell comes back
    unchanged (exactly); unequal frame spacing and a negative q raise."""
    box = 2.0
    x = np.zeros((3, 2, 3)) + 0.5
    x[2, 1, 0] += 0.48 * box  # ambiguous jump: 0.96 nm > 0.45 box edges
    traj = _traj(x, box)
    with pytest.raises(EnpcgError, match="particle 1.*frames 1 and 2.*save frames more often"):
        dy.unwrap(traj)
    with pytest.raises(EnpcgError, match="particle 1"):
        dy.mean_squared_displacement(traj, progress=False)

    tri = _traj(np.zeros((2, 2, 3)) + 0.5, box)
    tri.unitcell_angles = np.full((2, 3), 70.0)
    with pytest.raises(EnpcgError, match="orthorhombic"):
        dy.unwrap(tri)

    far = np.cumsum(np.full((4, 2, 3), 3.0), axis=0)  # 3 nm steps, fine without a box
    free = md.Trajectory(far.astype(np.float32), _topology(2), time=np.arange(4.0))
    np.testing.assert_array_equal(dy.unwrap(free), far.astype(np.float32))
    _, msd = dy.mean_squared_displacement(free, remove_drift=False, progress=False)
    np.testing.assert_allclose(msd, 27.0 * np.arange(4) ** 2, rtol=1e-6)

    bad_time = _traj(np.zeros((3, 2, 3)), box)
    bad_time.time = np.array([0.0, 1.0, 5.0])
    with pytest.raises(EnpcgError, match="equally spaced"):
        dy.mean_squared_displacement(bad_time, progress=False)
    with pytest.raises(EnpcgError, match="q must be"):
        dy.self_intermediate_scattering(traj[:2], -1.0, progress=False)


# --------------------------------------------------------------------------------------- pair structure
@pytest.fixture(scope="module")
def ideal_gas():
    n, n_frames, box = 600, 10, 3.0
    x = np.random.default_rng(21).uniform(0.0, box, (n_frames, n, 3))
    return _traj(x, box), box


def test_ideal_gas_partial_rdf_is_one(ideal_gas):
    """Uniform random positions (600 particles, 10 frames, 3 nm box): g_aa (a = first 300, a == b) and g_ab
    (disjoint halves) equal 1 within Poisson noise: every bin's z = (g - 1) / sqrt(1 / expected count) lies
    within +-5, the mean z^2 is 1 within 0.3 (150 bins), and the count-weighted mean of g is 1 within 1 %.
    Default r_max = 1.5 nm (half the box) with 0.01 nm bins."""
    traj, box = ideal_gas
    a, b = np.arange(300), np.arange(300, 600)
    for ia, ib, n_pairs in ((a, a, 300 * 299 / 2), (a, b, 300 * 300)):
        r, g = ps.partial_rdf(traj, ia, ib)
        assert len(r) == 150 and r[-1] == pytest.approx(1.495, abs=1e-9)
        shell = 4 / 3 * np.pi * ((r + 0.005) ** 3 - (r - 0.005) ** 3)
        expected = n_pairs * traj.n_frames * shell / box ** 3
        z = (g - 1) * np.sqrt(expected)
        assert np.max(np.abs(z)) < 5, np.max(np.abs(z))
        assert abs(np.mean(z ** 2) - 1) < 0.3, np.mean(z ** 2)
        assert abs(np.sum(g * expected) / np.sum(expected) - 1) < 0.01
    with pytest.raises(EnpcgError, match="r_max"):
        ps.partial_rdf(traj, a, b, r_max=2.0)


def test_ideal_gas_structure_factor(ideal_gas):
    """Ideal gas: S_aa(q) = 1 and S_ab(q) = 0 for disjoint uncorrelated sets (Ashcroft-Langreth). Each shell
    averages M vectors x 10 frames of exponential (S_aa, sd 1) or symmetric (S_ab, sd 1/sqrt 2) variables,
    so z = (S - expected) sqrt(M F) / sd must lie within +-5, and the vector-weighted mean of S_aa must be 1
    within 5 / sqrt(total samples)."""
    traj, _ = ideal_gas
    a, b = np.arange(300), np.arange(300, 600)
    q, s = ps.structure_factor(traj, a, q_max=20.0, max_vectors_per_shell=40, progress=False)
    # default shells are half a reciprocal-lattice spacing (pi / L) wide; the first holds |n| = 1 only
    assert np.all(np.diff(q) > 0) and q[0] == pytest.approx(2 * np.pi / 3.0, rel=1e-6)
    counts = _shell_counts(q, 3.0, 20.0, 40)
    z = (s - 1) * np.sqrt(counts * traj.n_frames)
    assert np.max(np.abs(z)) < 5, np.max(np.abs(z))
    mean = np.sum(s * counts) / counts.sum()
    assert abs(mean - 1) < 5 / math.sqrt(counts.sum() * traj.n_frames), mean
    q2, s_ab = ps.structure_factor(traj, a, b, q_max=20.0, max_vectors_per_shell=40, progress=False)
    np.testing.assert_allclose(q2, q)
    z = s_ab * np.sqrt(counts * traj.n_frames) * math.sqrt(2)
    assert np.max(np.abs(z)) < 5, np.max(np.abs(z))


def _shell_counts(q, box, q_max, cap):
    """Number of vectors used per default shell (width pi / L) of a cubic box, matching q's order."""
    n, qn = ps.reciprocal_vectors(np.full(3, box), q_max)
    shell = np.round(qn / (np.pi / box)).astype(int)
    counts = np.array([min(np.sum(shell == k), cap) for k in np.unique(shell)])
    assert len(counts) == len(q)
    return counts


def test_simple_cubic_lattice_bragg_peak():
    """Simple cubic lattice, 8 x 8 x 8 sites (N = 512), a = 0.5 nm, in a 4 nm box, thermal-free: with exact
    shells S(q) = N at the Bragg shell q = 2 pi / a (the only vectors with |n| = 8 are (8, 0, 0) and its
    permutations, all Bragg vectors) to 1e-4 relative, and S < 1e-6 N (numerically zero) on every shell below
    it; first_peak returns 2 pi / a."""
    m, a = 8, 0.5
    g = np.arange(m) * a + 0.1
    sites = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    traj = _traj(np.stack([sites, sites]), m * a)
    q_bragg = 2 * np.pi / a
    q, s = ps.structure_factor(traj, q_max=q_bragg * 1.004, shell_width=0, progress=False)
    assert q[-1] == pytest.approx(q_bragg, rel=1e-9)
    assert abs(s[-1] / len(sites) - 1) < 1e-4, s[-1]
    assert np.max(np.abs(s[:-1])) < 1e-6 * len(sites), np.max(np.abs(s[:-1]))
    assert ps.first_peak(q, s) == pytest.approx(q_bragg, rel=1e-9)


# --------------------------------------------------------------------------------------- summary and plot
def test_dynamics_summary_and_plot(brownian, tmp_path):
    """dynamics_summary on Brownian particles with rotor axes (D_r = 0.02 /ps): D within 4 % of
    D (1 - 1/N), tau_alpha within 4 % of 1 / (q^2 D (1 - 1/N)) at q = 2 /nm, tau_2 within 5 % of
    1 / (6 D_r) (200 rotors, so a looser bound), curves identical to the single-purpose functions (1e-12).
    A ballistic run too short to relax gives D = None and tau_alpha = None rather than an error.
    plot_dynamics writes one PNG atomically (no temporary file left beside it)."""
    x, traj = brownian
    d_rot = 0.02
    axes = _rotor(200, BROWN_F, d_rot, BROWN_DT, seed=9)
    res = dy.dynamics_summary(traj, q=2.0, vectors=axes, progress=False)
    expected_d = BROWN_D * (1 - 1 / BROWN_N)
    assert abs(res["D"] / expected_d - 1) < 0.04, res["D_fit"]
    assert abs(res["tau_alpha"] * 4.0 * expected_d - 1) < 0.04, res["tau_alpha"]
    assert abs(res["tau_2"] * 6 * d_rot - 1) < 0.05, res["tau_2"]
    tl, msd = dy.mean_squared_displacement(traj, progress=False)
    np.testing.assert_allclose(res["msd"][1], msd, rtol=1e-12)
    np.testing.assert_allclose(res["msd"][0], tl)

    rng = np.random.default_rng(2)
    v = rng.normal(0.0, 0.1, (300, 3))
    xb = rng.uniform(0, 3.0, (300, 3))[None] + v[None] * np.arange(20)[:, None, None]
    short = dy.dynamics_summary(_traj(xb, 3.0), q=0.1, progress=False)
    assert short["D"] is None and short["tau_alpha"] is None and short["tau_2"] is None
    assert "c2" not in short

    path = dy.plot_dynamics([res, short], tmp_path / "plots" / "dynamics.png", labels=["brownian", "ballistic"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert sorted(p.name for p in path.parent.iterdir()) == ["dynamics.png"]
    with pytest.raises(EnpcgError, match="labels"):
        dy.plot_dynamics([res, short], tmp_path / "x.png", labels=["one"])


# --------------------------------------------------------------------------------------- real LJ liquid
# Lennard-Jones liquid near the triple point in reduced units mapped exactly onto OpenMM's (sigma = 1 nm,
# epsilon = 1 kJ/mol, m = 1 amu, so tau = 1 ps and T[K] = T* / R): rho* = 0.8442, T* = 0.722, N = 500,
# cutoff 2.5 sigma (plain, no tail correction).
LJ_N, LJ_RHO, LJ_TSTAR, LJ_DT, LJ_EVERY, LJ_FRAMES = 500, 0.8442, 0.722, 0.005, 4, 1000


@pytest.fixture(scope="module")
def lj_liquid():
    """OpenMM CPU (1 thread): fcc start melted 1000 steps at 2 T*, 2000 Langevin steps at T*, then 4000 NVE
    velocity-Verlet steps (dt = 0.005 tau) saving wrapped positions, velocities and forces every 4 steps."""
    import openmm as mm
    import openmm.unit as u

    r_gas = u.MOLAR_GAS_CONSTANT_R.value_in_unit(u.kilojoule_per_mole / u.kelvin)
    temp = LJ_TSTAR / r_gas  # K
    box = (LJ_N / LJ_RHO) ** (1.0 / 3.0)
    system = mm.System()
    system.setDefaultPeriodicBoxVectors(mm.Vec3(box, 0, 0), mm.Vec3(0, box, 0), mm.Vec3(0, 0, box))
    nb = mm.NonbondedForce()
    nb.setNonbondedMethod(mm.NonbondedForce.CutoffPeriodic)
    nb.setCutoffDistance(2.5)
    nb.setUseDispersionCorrection(False)
    for _ in range(LJ_N):
        system.addParticle(1.0)
        nb.addParticle(0.0, 1.0, 1.0)
    system.addForce(nb)
    cell = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    grid = np.stack(np.meshgrid(*[np.arange(5)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    pos = ((grid[:, None, :] + cell[None]) * box / 5).reshape(-1, 3)
    platform = mm.Platform.getPlatformByName("CPU")
    lang = mm.LangevinMiddleIntegrator(2 * temp, 1.0, LJ_DT)
    lang.setRandomNumberSeed(2)
    ctx = mm.Context(system, lang, platform, {"Threads": "1"})
    ctx.setPositions(pos)
    ctx.setVelocitiesToTemperature(2 * temp, 2)
    lang.step(1000)
    lang.setTemperature(temp)
    lang.step(2000)
    state = ctx.getState(getPositions=True, getVelocities=True)
    verlet = mm.VerletIntegrator(LJ_DT)
    nve = mm.Context(system, verlet, platform, {"Threads": "1"})
    nve.setPositions(state.getPositions())
    nve.setVelocities(state.getVelocities())
    xs, vs, fs = [], [], []
    for _ in range(LJ_FRAMES):
        st = nve.getState(getPositions=True, getVelocities=True, getForces=True, enforcePeriodicBox=True)
        xs.append(st.getPositions(asNumpy=True).value_in_unit(u.nanometer))
        vs.append(st.getVelocities(asNumpy=True).value_in_unit(u.nanometer / u.picosecond))
        fs.append(st.getForces(asNumpy=True).value_in_unit(u.kilojoule_per_mole / u.nanometer))
        verlet.step(LJ_EVERY)
    del ctx, nve
    xyz = np.array(xs)
    traj = md.Trajectory(xyz.astype(np.float32), _topology(LJ_N), time=LJ_DT * LJ_EVERY * np.arange(LJ_FRAMES),
                         unitcell_lengths=np.full((LJ_FRAMES, 3), box),
                         unitcell_angles=np.full((LJ_FRAMES, 3), 90.0))
    return traj, np.array(vs), np.array(fs)


def test_lj_liquid_short_time_msd_and_green_kubo(lj_liquid):
    """Real OpenMM NVE trajectory of the LJ liquid, saved wrapped every 0.02 tau:
    * short-time expansion of the MSD (stationarity gives <v.a> = 0, <v.j> = -<a^2>):
      MSD(t) = <|v|^2> t^2 - <|a|^2> t^4 / 12 + O(t^6), with <|v|^2> and <|a|^2> = <|F|^2> / m^2 measured from
      OpenMM's velocities and forces at the saved frames; at the first lag (0.02 tau) they agree within
      0.3 % (measured 0.06-0.07 % over 3 seeds, while dropping the t^4 term is 0.8 % off);
    * alpha_2 at the first lag (Maxwell-Boltzmann velocities, Gaussian displacements) is 0 within 0.02
      (measured -0.002 to -0.006), and simple-liquid heterogeneity gives a positive maximum;
    * Einstein D (diffusion_coefficient, default window) agrees with the Green-Kubo integral
      (1/3) int_0^5tau <v(0).v(t)> dt of the same run within 12 % (measured 1-8 % over 3 seeds;
      both are noisy for 500 particles x 20 tau)."""
    traj, vel, forces = lj_liquid
    tl, msd = dy.mean_squared_displacement(traj, remove_drift=False, progress=False)
    v2 = np.mean(np.sum(vel ** 2, axis=2))
    a2 = np.mean(np.sum(forces ** 2, axis=2))  # mass 1 amu
    predicted = v2 * tl[1] ** 2 - a2 * tl[1] ** 4 / 12
    assert abs(msd[1] / predicted - 1) < 0.003, (msd[1], predicted, msd[1] / (v2 * tl[1] ** 2))

    tl, alpha2 = dy.non_gaussian_parameter(traj, progress=False)
    assert abs(alpha2[1]) < 0.02, alpha2[1]
    assert alpha2.max() > 0.05, alpha2.max()

    tl, msd = dy.mean_squared_displacement(traj, progress=False)
    fit = dy.diffusion_coefficient(tl, msd)
    dv = vel - vel.mean(axis=1, keepdims=True)  # centre-of-mass frame, as remove_drift
    dt = LJ_DT * LJ_EVERY
    n_lag = int(round(5.0 / dt))
    vacf = np.array([np.mean(np.sum(dv[:LJ_FRAMES - k] * dv[k:], axis=2)) for k in range(n_lag + 1)])
    d_gk = (np.sum(vacf) - 0.5 * (vacf[0] + vacf[-1])) * dt / 3
    assert abs(fit["D"] / d_gk - 1) < 0.12, (fit, d_gk)


def test_lj_liquid_summary_uses_structure_factor_peak(lj_liquid, tmp_path):
    """dynamics_summary(q=None) takes q from the first peak of the directly computed S(q) of the LJ liquid,
    within one shell width pi / L (measured 6.71-6.73 /nm, i.e. q sigma = 6.7, peak height 2.69-2.74; no
    literature value is asserted), and, on 50 frames spread over the run, the S(q) of the direct method
    agrees with the Fourier transform of partial_rdf (128 vectors per shell),
    S(q) = 1 + 4 pi rho int_0^{L/2} (g - 1) r^2 sin(qr)/(qr) dr, within 0.06 absolute for q in [9, 15] /nm,
    beyond the first peak where the truncation of g at L/2 matters less (measured max 0.025). F_s at the
    first lag matches the Gaussian exp(-q^2 MSD / 6) within 1e-3 (displacements are Gaussian there)."""
    traj, _, _ = lj_liquid
    res = dy.dynamics_summary(traj, progress=False)
    # 128 vectors per shell x 50 frames keep the shell noise (sd ~ S / sqrt(6400) <= 0.02) below the tolerance
    q, s = ps.structure_factor(traj, q_max=15.5, max_vectors_per_shell=128, max_frames=50, progress=False)
    box = traj.unitcell_lengths[0, 0]
    assert abs(res["q"] - ps.first_peak(q, s)) <= np.pi / box + 1e-9  # within one default shell width
    assert 6.0 < res["q"] < 7.5 and s.max() > 2.0
    assert res["D"] is not None and res["tau_alpha"] is not None
    t, fs = res["fs"]
    assert abs(fs[1] - math.exp(-res["q"] ** 2 * res["msd"][1][1] / 6)) < 1e-3

    sub = traj[::20]  # 50 frames spread over the run, like structure_factor(max_frames=50)
    r, g = ps.partial_rdf(sub, np.arange(LJ_N), np.arange(LJ_N), bin_width=0.005)
    dr = r[1] - r[0]
    for qq, sq in zip(q, s):
        if 9.0 <= qq <= 15.0:
            s_ft = 1 + 4 * np.pi * LJ_RHO * np.sum((g - 1) * r ** 2 * np.sinc(qq * r / np.pi)) * dr
            assert abs(sq - s_ft) < 0.06, (qq, sq, s_ft)
    path = dy.plot_dynamics(res, tmp_path / "lj.png", labels="LJ liquid")
    assert path.stat().st_size > 10_000
