"""Glass protocols (openmm_plugin.protocols) and the glass transition analysis (enpcg.glass_transition).

Real OpenMM runs on the CPU platform with one thread, on 256 Lennard-Jones particles in reduced units mapped
exactly onto OpenMM's: sigma = 1 nm, epsilon = 1 kJ/mol, m = 1 amu, so tau = 1 ps, T[K] = T* / 0.0083144626
and P* = 1 is 16.6054 bar. The pair potential is cut at 2.5 sigma (NonbondedForce CutoffPeriodic with its
default long-range dispersion correction, or a CustomNonbondedForce with the same correction). Timestep
0.005 tau, Langevin friction 1 / tau. State point for the liquid: T* = 2.0, P* = 5.0 (a dense supercritical
liquid, density about 0.78 sigma^-3 here, whose volume relaxes within a few tau).

No literature values are compared against: every physical assertion is an exact identity of the protocol
(the linear ramp, bitwise resume), a known answer (the breakpoint of synthetic data, ballistic motion at
equipartition, the Langevin energy balance) or a statistical check whose tolerance is derived in the test.
"""
import json
import math
import warnings

import numpy as np
import openmm as mm
import pytest

from enpcg.errors import EnpcgError
from enpcg.glass_transition import (GlassTransition, compare_rates, glass_transition, plot_glass_transition,
                                    two_line_fit)
from openmm_plugin.protocols import (EquilibrationWarning, ProtocolRecords, R_KJ_PER_MOL_K, age, equilibrate,
                                     log_spaced_steps, quench, reduced_pressure_to_bar, reduced_temperature_to_kelvin)

T_LIQUID = reduced_temperature_to_kelvin(2.0)  # 240.54 K
P_LIQUID = reduced_pressure_to_bar(5.0)  # 83.03 bar
RUN = dict(platform="CPU", properties={"Threads": "1"}, progress=False, timestep=0.005, friction=1.0)
N_CELLS = 4  # 4^3 fcc cells = 256 particles: the box stays above 2 x 2.5 sigma up to a density of 2.0


def lj_system(rho=0.8, custom=False):
    """256 LJ particles on an fcc lattice at reduced density ``rho``: (System, positions nm, box nm)."""
    a = (4.0 / rho) ** (1.0 / 3.0)
    basis = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    cells = np.array([[i, j, k] for i in range(N_CELLS) for j in range(N_CELLS) for k in range(N_CELLS)])
    pos = ((cells[:, None, :] + basis[None]) * a).reshape(-1, 3)
    length = N_CELLS * a
    system = mm.System()
    system.setDefaultPeriodicBoxVectors(mm.Vec3(length, 0, 0), mm.Vec3(0, length, 0), mm.Vec3(0, 0, length))
    if custom:
        force = mm.CustomNonbondedForce("4*epsilon*((sigma/r)^12-(sigma/r)^6); sigma=1; epsilon=1")
        force.setNonbondedMethod(mm.CustomNonbondedForce.CutoffPeriodic)
        force.setUseLongRangeCorrection(True)
    else:
        force = mm.NonbondedForce()
        force.setNonbondedMethod(mm.NonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(2.5)
    for _ in pos:
        system.addParticle(1.0)
        if custom:
            force.addParticle([])
        else:
            force.addParticle(0.0, 1.0, 1.0)
    system.addForce(force)
    return system, pos, np.eye(3) * length


@pytest.fixture(scope="module")
def liquid():
    """The LJ liquid equilibrated at T* = 2, P* = 5 for 30 tau from an fcc lattice (the melt is fast there)."""
    system, pos, box = lj_system()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EquilibrationWarning)  # judged in test_equilibrate_passes_on_liquid
        res = equilibrate(system, pos, box, temperature=T_LIQUID, pressure=P_LIQUID, steps=6000, seed=11, **RUN)
    return system, res


# ----------------------------------------------------------------------------------------- two_line_fit
T_G_TRUE = 250.0


def hinge(t, t_g=T_G_TRUE, c=1.0, s_glass=-2e-4, s_melt=-6e-4):
    d = np.asarray(t, dtype=float) - t_g
    return c + s_glass * np.minimum(d, 0) + s_melt * np.maximum(d, 0)


def test_two_line_fit_exact_and_noisy_breakpoint():
    """Noise-free hinge data: T_g, slopes and intercept recovered to 1e-6 relative and the error below 1e-4 K
    (rounding-level residuals only). Noisy data
    (sigma = 0.003 g/cm^3 on a slope change of 4e-4 g/cm^3/K, 61 points 150..350 K): T_g within 2 of its stated
    standard errors of the true 250 K, and both slopes within 25 % (the slopes' noise is ~ 10 %)."""
    t = np.linspace(150, 350, 61)
    exact = two_line_fit(t, hinge(t))
    assert exact.t_g == pytest.approx(T_G_TRUE, rel=1e-6)
    assert exact.slope_glass == pytest.approx(-2e-4, rel=1e-6) and exact.slope_melt == pytest.approx(-6e-4, rel=1e-6)
    assert exact.intercept == pytest.approx(1.0, rel=1e-8) and exact.t_g_se < 1e-4  # rounding-level residuals

    rng = np.random.default_rng(7)
    fit = two_line_fit(t[::-1], (hinge(t) + rng.normal(0, 0.003, t.size))[::-1])  # order must not matter
    assert abs(fit.t_g - T_G_TRUE) <= 2 * fit.t_g_se, (fit.t_g, fit.t_g_se)
    assert 0 < fit.t_g_se < 20 and fit.t_g_low < fit.t_g < fit.t_g_high and not fit.se_bounded
    assert fit.slope_glass == pytest.approx(-2e-4, rel=0.25) and fit.slope_melt == pytest.approx(-6e-4, rel=0.25)
    assert fit.n_points == 61 and fit.sigma == pytest.approx(0.003, rel=0.3)
    window = two_line_fit(t, hinge(t) + rng.normal(0, 0.003, t.size), t_min=200, t_max=320)
    assert window.t_range == (200.0, 320.0) and window.n_points == np.sum((t >= 200) & (t <= 320))
    with pytest.raises(EnpcgError, match="at least"):
        two_line_fit(t[:4], hinge(t[:4]))
    with pytest.raises(EnpcgError, match="same length"):
        two_line_fit(t, hinge(t)[:-1])


def test_two_line_fit_standard_error_is_calibrated():
    """Over 50 synthetic repeats (61 points, sigma = 0.003) the spread of T_g (std, ddof=1) matches the mean
    reported profile-RSS standard error within a factor 1.5, and the fraction of repeats with |T_g - 250 K| <=
    stated SE is 0.68 +- 0.2 (binomial sd for 50 repeats: 0.066)."""
    rng = np.random.default_rng(2024)
    t = np.linspace(150, 350, 61)
    fits = [two_line_fit(t, hinge(t) + rng.normal(0, 0.003, t.size)) for _ in range(50)]
    est = np.array([f.t_g for f in fits])
    se = np.array([f.t_g_se for f in fits])
    ratio = est.std(ddof=1) / se.mean()
    coverage = np.mean(np.abs(est - T_G_TRUE) <= se)
    print(f"spread {est.std(ddof=1):.2f} K, mean SE {se.mean():.2f} K, ratio {ratio:.2f}, coverage {coverage:.2f}")
    assert 1 / 1.5 <= ratio <= 1.5, ratio
    assert 0.48 <= coverage <= 0.88, coverage
    assert abs(est.mean() - T_G_TRUE) <= 3 * est.std(ddof=1) / math.sqrt(50)  # unbiased within 3 SE


def test_glass_transition_and_compare_rates_arithmetic(tmp_path):
    """Noise-free quenches with T_g = 240, 250, 255, 265 K: mean 252.5 K, SE = std(ddof=1)/2 = 5.204 K exactly;
    the quenches may be records, dicts, (T, y) pairs or .npz paths. compare_rates: 260 +- 2 vs 250 +- 1.5 K gives
    difference 10 K, SE 2.5 K, z = 4 (> 2: higher); 253 +- 2 vs 250 +- 1.5 is 1.2 SE (not higher)."""
    t = np.linspace(150, 350, 41)
    tgs = [240.0, 250.0, 255.0, 265.0]
    curves = [hinge(t, t_g=v) for v in tgs]
    rec = ProtocolRecords.empty({"cooling_rate": 1.5})
    rec.set_temperature, rec.density = t, curves[0]
    path = tmp_path / "q.npz"
    np.savez(path, set_temperature=t, density=curves[3])
    quenches = [rec, {"set_temperature": t, "density": curves[1]}, (t, curves[2]), path]
    res = glass_transition(quenches)
    assert isinstance(res, GlassTransition) and res.n_quenches == 4 and res.cooling_rate == 1.5
    np.testing.assert_allclose(res.t_g_values, tgs, rtol=1e-7)
    assert res.t_g == pytest.approx(252.5, rel=1e-7)
    assert res.t_g_se == pytest.approx(np.std(tgs, ddof=1) / 2, rel=1e-6)
    assert res.t_g_se == pytest.approx(5.2042, abs=1e-3)
    with pytest.raises(EnpcgError, match="n >= 2"):
        glass_transition([rec])
    with pytest.raises(EnpcgError, match="enthalpy_x"):
        glass_transition([rec, rec], observable="enthalpy_x")

    fast = {"t_g": 260.0, "t_g_se": 2.0, "cooling_rate": 10.0}
    slow = {"t_g": 250.0, "t_g_se": 1.5, "cooling_rate": 1.0}
    cmp = compare_rates(fast, slow)
    assert cmp.difference == pytest.approx(10.0) and cmp.se == pytest.approx(2.5) and cmp.z == pytest.approx(4.0)
    assert cmp.faster_is_higher
    assert not compare_rates(dict(fast, t_g=253.0), slow).faster_is_higher
    with pytest.raises(EnpcgError, match="swap"):
        compare_rates(slow, fast)
    slow_result = GlassTransition(t_g=250.0, t_g_se=1.5, t_g_std=3.0, t_g_values=np.array([248.5, 251.5]),
                                  fits=[], n_quenches=2, cooling_rate=1.0, observable="density")
    assert compare_rates(fast, slow_result).z == pytest.approx(4.0)


# -------------------------------------------------------------------------------------------- equilibrate
def test_equilibrate_passes_on_liquid(liquid):
    """Continuing the equilibrated liquid for 60 tau (NPT, T* = 2, P* = 5): the potential-energy and density
    slopes over the last half lie within 3 standard errors of zero and the kinetic temperature within 3 block
    standard errors of the set 240.54 K; no EquilibrationWarning. (Over 8 seeds of this run the largest |z| was
    2.8; the false-alarm rate of a 3-SE check on 10 block means is a few per cent.)"""
    system, eq = liquid
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = equilibrate(system, eq.positions, eq.box, velocities=eq.velocities, temperature=T_LIQUID,
                          pressure=P_LIQUID, steps=12000, seed=5, **RUN)
    for c in res.checks:
        print(c.message)
    assert [c.name for c in res.checks] == ["potential_energy_drift", "density_drift", "kinetic_temperature"]
    assert res.passed and all(abs(c.value) <= c.limit for c in res.checks)
    assert not [w for w in caught if issubclass(w.category, EquilibrationWarning)]
    rho = res.records.number_density
    print(f"number density {rho.mean():.4f} nm^-3 (sigma^-3), std {rho.std():.4f}")
    assert res.box.shape == (3, 3) and res.positions.shape == (256, 3) and res.velocities.shape == (256, 3)
    # The mass density of unit-mass particles is the number density times 1 amu/nm^3 = 1.66054e-3 g/cm^3.
    np.testing.assert_allclose(res.records.density, rho * 1.66053906660e-3, rtol=1e-8)


def test_equilibrate_flags_drifting_run():
    """An fcc lattice at density 0.8 given Maxwell velocities at T* = 2 melts: after 300 steps (1.5 tau, NVT)
    half the kinetic energy has gone into the potential energy, so the kinetic temperature is far below the set
    one and the potential energy still rises over the last half: both checks fail (> 3 SE). strict=False warns
    (EquilibrationWarning naming the fix 'run longer'); strict=True raises EnpcgError."""
    system, pos, box = lj_system(rho=0.8)
    with pytest.warns(EquilibrationWarning, match="run longer"):
        res = equilibrate(system, pos, box, temperature=T_LIQUID, steps=300, seed=1, **RUN)
    checks = {c.name: c for c in res.checks}
    print({k: (c.value, c.standard_error) for k, c in checks.items()})
    assert not res.passed and set(checks) == {"potential_energy_drift", "kinetic_temperature"}
    assert not checks["potential_energy_drift"].passed and checks["potential_energy_drift"].value > 0
    assert not checks["kinetic_temperature"].passed and checks["kinetic_temperature"].value < 0
    with pytest.raises(EnpcgError, match="run longer"):
        equilibrate(system, pos, box, temperature=T_LIQUID, steps=300, seed=1, strict=True, **RUN)
    with pytest.raises(EnpcgError, match="sample_interval"):
        equilibrate(system, pos, box, temperature=T_LIQUID, steps=300, sample_interval=50, **RUN)


# ------------------------------------------------------------------------------------------------- quench
def test_quench_ramp_kinetic_temperature_and_density(liquid, tmp_path):
    """NPT quench T* = 2.0 -> 0.5 (240.5 -> 60.1 K) at P* = 5 in 10000 steps (50 tau, 3.608 K/ps).
    * set temperature: exactly t_start - rate * time (1e-9 K), i.e. slope -rate;
    * kinetic temperature: follows the set one with the lag that the Langevin energy balance predicts. At
      constant pressure the heat the thermostat removes is -dH, and its power is gamma (N_dof k T_set - 2 K),
      so mean(T_kin - T_set) = -(H_end - H_start) / (t_total gamma N_dof R); measured and predicted agree within
      3 standard errors of the mean deviation (records 1.25 tau apart, longer than the 0.5 tau kinetic-energy
      relaxation time, treated as independent), and the relative deviation stays below 10 % on average;
    * density: rises on cooling (Spearman rank correlation with T below -0.9; final > initial by 20 %);
    * enthalpy H = U + K + P V with P V in kJ/mol (1 bar nm^3 = 0.0602214 kJ/mol)."""
    system, eq = liquid
    t_start, t_end = T_LIQUID, reduced_temperature_to_kelvin(0.5)
    rate = (t_start - t_end) / 50.0
    res = quench(system, eq.positions, eq.box, velocities=eq.velocities, t_start=t_start, t_end=t_end,
                 cooling_rate=rate, pressure=P_LIQUID, record_interval=250, seed=3, **RUN)
    r = res.records
    assert res.completed and len(r) == 41 and r.step[-1] == 10000
    np.testing.assert_allclose(r.time, r.step * 0.005, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.set_temperature, t_start - rate * r.time, rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.diff(r.set_temperature) / np.diff(r.time), -rate, rtol=1e-9)
    assert r.set_temperature[-1] == pytest.approx(t_end, abs=1e-9)
    assert r.metadata["cooling_rate"] == rate and r.metadata["pressure"] == P_LIQUID

    dev = (r.kinetic_temperature - r.set_temperature)[1:]
    se = dev.std(ddof=1) / math.sqrt(dev.size)
    n_dof = 3 * 256
    predicted = -(r.enthalpy[-1] - r.enthalpy[0]) / ((r.time[-1] - r.time[0]) * 1.0 * n_dof * R_KJ_PER_MOL_K)
    print(f"mean lag {dev.mean():.2f} +- {se:.2f} K, energy-balance prediction {predicted:.2f} K")
    assert abs(dev.mean() - predicted) <= 3 * se
    assert abs(np.mean(dev / r.set_temperature[1:])) < 0.10

    from scipy.stats import spearmanr

    rho_cor = spearmanr(r.set_temperature, r.density).statistic
    print(f"density {r.density[0]:.5f} -> {r.density[-1]:.5f} g/cm^3, Spearman {rho_cor:.3f}")
    assert rho_cor < -0.9 and r.density[-1] > 1.2 * r.density[0]
    pv = P_LIQUID * r.volume * 0.0602214076
    np.testing.assert_allclose(r.enthalpy, r.potential_energy + r.kinetic_energy + pv, rtol=1e-10)
    np.testing.assert_allclose(r.kinetic_temperature, 2 * r.kinetic_energy / (n_dof * R_KJ_PER_MOL_K), rtol=1e-12)

    png = plot_glass_transition({rate: [r]}, tmp_path / "tg.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["tg.png"]  # the temporary file was renamed


def test_quench_resume_custom_nonbonded(liquid, tmp_path):
    """A CustomNonbondedForce LJ (with its long-range correction) under the barostat: a quench T* 2.0 -> 1.0 of
    1200 steps with a checkpoint, stopped at max_steps=650 (records up to step 600, checkpoints at 0 and 500:
    20 barostat periods apart), or by an exception raised from the callback after the 7th record (step 600),
    and rerun with the same arguments, gives bitwise the same records and final state as an uninterrupted
    checkpointed run (the random streams are re-seeded from (seed, step) at every checkpoint, so this holds on
    one platform and thread count). The
    box volume changes (the barostat acts) and the density rises. A finished checkpoint returns at once; other
    arguments are refused with an EnpcgError naming the field."""
    _, eq = liquid
    system, _, _ = lj_system(custom=True)
    kw = dict(t_start=T_LIQUID, t_end=reduced_temperature_to_kelvin(1.0), cooling_rate=T_LIQUID / 2 / 6.0,
              pressure=P_LIQUID, record_interval=100, seed=21, velocities=eq.velocities, **RUN)
    full = quench(system, eq.positions, eq.box, checkpoint=tmp_path / "full.npz", **kw)
    part = quench(system, eq.positions, eq.box, checkpoint=tmp_path / "part.npz", max_steps=650, **kw)
    assert not part.completed and part.records.step[-1] == 600 and len(part.records) == 7
    resumed = quench(system, eq.positions, eq.box, checkpoint=tmp_path / "part.npz", **kw)
    assert full.completed and resumed.completed and len(full.records) == 13
    for name, a in full.records.arrays().items():
        np.testing.assert_array_equal(getattr(resumed.records, name), a, err_msg=name)
    np.testing.assert_array_equal(resumed.positions, full.positions)
    np.testing.assert_array_equal(resumed.velocities, full.velocities)
    np.testing.assert_array_equal(part.records.potential_energy, full.records.potential_energy[:7])

    class Interrupt(Exception):
        pass

    def stop_at_seventh(records):
        if len(records) == 7:
            raise Interrupt

    with pytest.raises(Interrupt):  # an interruption from the callback at step 600; the checkpoint is at 500
        quench(system, eq.positions, eq.box, checkpoint=tmp_path / "cb.npz", callback=stop_at_seventh, **kw)
    assert ProtocolRecords.load(tmp_path / "cb.npz").step.tolist() == [0, 100, 200, 300, 400, 500]
    after_cb = quench(system, eq.positions, eq.box, checkpoint=tmp_path / "cb.npz", **kw)
    np.testing.assert_array_equal(after_cb.records.density, full.records.density)

    v = full.records.volume
    print(f"volume {v[0]:.2f} -> {v[-1]:.2f} nm^3, density {full.records.density[0]:.5f} -> "
          f"{full.records.density[-1]:.5f} g/cm^3")
    assert np.unique(v).size > 5 and full.records.density[-1] > full.records.density[0]

    again = quench(system, eq.positions, eq.box, checkpoint=tmp_path / "full.npz", **kw)
    np.testing.assert_array_equal(again.records.enthalpy, full.records.enthalpy)
    loaded = ProtocolRecords.load(tmp_path / "full.npz")
    np.testing.assert_array_equal(loaded.density, full.records.density)
    assert loaded.metadata["cooling_rate"] == kw["cooling_rate"] and "_run" not in loaded.metadata
    full.records.save(tmp_path / "records.npz")
    assert json.dumps(ProtocolRecords.load(tmp_path / "records.npz").metadata) == json.dumps(full.records.metadata)
    with pytest.raises(EnpcgError, match="cooling_rate"):
        quench(system, eq.positions, eq.box, checkpoint=tmp_path / "full.npz", **dict(kw, cooling_rate=1.0))


def test_quench_input_errors(liquid):
    """Bad arguments are EnpcgErrors that name the argument: heating, no pressure, non-periodic System, a System
    that already has a barostat, wrong position shape."""
    system, eq = liquid
    kw = dict(t_start=200.0, t_end=100.0, cooling_rate=10.0, pressure=1.0, record_interval=10, **RUN)
    with pytest.raises(EnpcgError, match="t_end"):
        quench(system, eq.positions, eq.box, **dict(kw, t_end=300.0))
    with pytest.raises(EnpcgError, match="pressure"):
        quench(system, eq.positions, eq.box, **dict(kw, pressure=None))
    with pytest.raises(EnpcgError, match="record_interval"):
        quench(system, eq.positions, eq.box, **dict(kw, record_interval=0))
    with pytest.raises(EnpcgError, match=r"positions must have shape \(256, 3\)"):
        quench(system, eq.positions[:10], eq.box, **kw)
    with_baro = mm.XmlSerializer.clone(system)
    with_baro.addForce(mm.MonteCarloBarostat(1.0, 200.0))
    with pytest.raises(EnpcgError, match="MonteCarloBarostat"):
        quench(with_baro, eq.positions, eq.box, **kw)
    open_system = mm.System()
    open_system.addParticle(1.0)
    with pytest.raises(EnpcgError, match="periodic"):
        quench(open_system, np.zeros((1, 3)), None, **kw)


# ---------------------------------------------------------------------------------------------------- age
def test_age_log_spaced_saves_and_ballistic_msd(liquid, tmp_path):
    """NVT ageing at T* = 2 for 10 tau with 12 saves at log-spaced waiting times (0, then 1 .. 2000 steps).
    Known answers: at short times motion is ballistic with equipartition velocities, MSD(t) = 3 k_B T t^2 / m
    (the force term is O(t^4), the friction correction -gamma t / 3 below 0.3 % at one step): after one step the
    ratio is 1 within 4 x sqrt(2 / N_dof) = 20 % (one snapshot of 768 velocity components); the log-log slope of
    the MSD between 1 and 5 steps is 2 +- 0.1 and between the last two saves (5 and 10 tau) 1 +- 0.2
    (diffusive). Without a barostat the enthalpy is NaN and the box constant."""
    system, eq = liquid
    res = age(system, eq.positions, eq.box, velocities=eq.velocities, temperature=T_LIQUID, duration_ps=10.0,
              record_interval=200, n_saves=12, out_dir=tmp_path, seed=4, **RUN)
    steps = log_spaced_steps(2000, 12)
    np.testing.assert_array_equal(res.save_steps, steps)
    assert steps[0] == 0 and steps[1] == 1 and steps[-1] == 2000
    np.testing.assert_allclose(res.save_times, steps * 0.005)
    ratios = steps[2:] / steps[1:-1]
    assert np.all(ratios > 1) and np.ptp(np.log(steps[1:])[1:] - np.log(steps[1:])[:-1]) < 0.5  # near-even log

    msd = np.mean(np.sum((res.saved_positions - res.saved_positions[0]) ** 2, axis=-1), axis=-1)  # nm^2
    kt_over_m = R_KJ_PER_MOL_K * T_LIQUID / 1.0  # kJ/mol/amu = nm^2/ps^2
    ballistic = 3 * kt_over_m * res.save_times ** 2
    print("MSD / ballistic:", np.round(msd[1:6] / ballistic[1:6], 3), "MSD (nm^2):", np.round(msd, 4))
    assert abs(msd[1] / ballistic[1] - 1) < 4 * math.sqrt(2 / 768)
    early = math.log(msd[3] / msd[1]) / math.log(steps[3] / steps[1])  # steps 1 and 5 (0.005 and 0.025 tau)
    assert early == pytest.approx(2.0, abs=0.1), early
    late = math.log(msd[-1] / msd[-2]) / math.log(steps[-1] / steps[-2])
    assert late == pytest.approx(1.0, abs=0.2), late

    r = res.records
    assert len(r) == 11 and np.all(np.isnan(r.enthalpy)) and np.ptp(r.volume) == 0
    z = np.load(res.configurations_path)
    np.testing.assert_array_equal(z["positions"], res.saved_positions)
    np.testing.assert_array_equal(ProtocolRecords.load(res.records_path).kinetic_energy, r.kinetic_energy)
