"""Kob-Andersen binary Lennard-Jones mixture (``systems.kob_andersen``): the force field against a numpy double
loop, the virial pressure, and state "N" (density 1.2) thermodynamics and dynamics against reference values.

Units: OpenMM's, which ARE the reduced LJ units here (sigma_AA = 1 nm, eps_AA = 1 kJ/mol, m = 1 amu, so
tau = 1 ps): energies kJ/mol = eps_AA, pressures kJ/mol/nm^3 = eps_AA/sigma_AA^3, D nm^2/ps = sigma_AA^2/tau,
times ps = tau, q 1/nm = 1/sigma_AA, temperatures T* = k_B T / eps_AA (Kelvin = T* / 0.0083144626).

Reference values (``systems/data/kob_andersen_reference.json``; each entry names its source):

* T* = 0.8: U/N = -6.346 and W/N = 5.534 (so P = rho (T + W/N) = 7.601) from RUMD3 (N = 10000, inferred
  from the normalisation of the heat capacity next to them; ensemble not stated, the gamdpy run they check is
  NVT), density 1.200, each pair cut at 2.5 sigma_ab with the potential shifted ("ShiftedPotential"), as
  hard-coded for comparison in the gamdpy repository (github.com/jklust/gamdpy, examples/kablj.py, the
  "Rumd3" block; gamdpy/RUMD are the Roskilde group's codes). Same model, same cutoff convention, same
  density; energies and pressures of a liquid at N = 1000 and N = 10000 differ by O(1/N), far below 0.5%.
* T* = 1.028 (the melting temperature at density 1.2): U/N = -5.974, W/N = 7.444 from U. R. Pedersen,
  T. B. Schroder and J. C. Dyre, Phys. Rev. Lett. 120, 165501 (2018), data repository
  github.com/urpedersen/PRL_120_165501_data, figure_4/liquid.csv (row x_B = 0.200, density 1.200). Not
  simulated here (budget); the independent long run below reproduces it and the T* = 0.8 point
  (:func:`test_independent_reference_reproduces_literature`), which also confirms the shifted-cutoff convention
  of both sources (a truncated, unshifted potential would lower U/N by 0.57 at T* = 0.8).
* T* = 2.0 (U/N, P, D_A, D_B, tau_alpha of A) and T* = 0.8 (D_A, D_B): RUMD3 simulation output shipped in
  the gamdpy 0.8.2 source distribution on PyPI (``pip download gamdpy==0.8.2 --no-binary :all: --no-deps``),
  extracted by ``systems/data/extract_rumd3_kob_andersen.py`` (methods, file hashes and checks in its docstring
  and in the JSON key "rumd3_gamdpy"). These are RELEASED SIMULATION DATA of the RUMD3 code, not a table in a
  paper. T* = 2.0: folder docs/source/examples/Data/NVT_N4000_T2.0_rho1.2_KABLJ_rumd3/ (its TrajectoryFiles also
  in github.com/jklust/gamdpy, examples/Data/..., commit e8fc7bc1): N = 4000 (3200 A, 800 B), density 1.2000,
  NVT (Nose-Hoover, relaxation time 0.2), dt = 0.000665 tau, two blocks of 2791 tau, pairs cut at 2.5 sigma_ab
  and shifted (verified by recomputing the energy and virial of its restart0000.xyz.gz: shifted U/N = -4.5897
  equals the file's per-particle sum; unshifted would be -5.159). U/N = -4.65395 +- 0.0002, P = 19.3177 +-
  0.0013 (energies_mean.dat, errors from 16 blocks of the raw energies); D_A = 0.04743 +- 0.00003, D_B =
  0.0716 +- 0.0019 (slope/6 of msd_000b_000b.dat over 10-2790 tau, mean and half-difference of the two
  blocks); tau_A = 0.350 +- 0.011 (F_s,A = 1/e in Fs_000b_000b.dat, column A at q = 7.26: ln F linear in ln t
  between t = 0.341 and 0.681; the uncertainty is the spread of four two-point interpolations on that factor-2
  grid; applied to our finely sampled independent F_s the stated one reads 1.5% low, the others 0.2-2.7%
  high). T* = 0.8: docs/source/examples/Data/KABLJ_msd_R1.200_T0.800_rumd3.dat (the RUMD3 MSD that gamdpy's
  examples/kablj.py loads for this state; dt = 0.004; N and ensemble not stated): D_A = 0.00539 +- 0.00005,
  D_B = 0.00893 +- 0.00009 (slope/6 over 60-4200 tau; spread over other windows). The files named
  KABLJ_*_R1.200_T0.800_rumd3.dat INSIDE the T2.0 folder are T* = 2.0 data (mislabelled) and are not used.
  Caveats: (i) N = 4000 there vs 1000 here: D has a 1/L hydrodynamic finite-size term (Yeh-Hummer), so
  D(N = 1000) is expected a few % lower; our independent N = 1000 runs are 4.2% (A) and 1.4% (B) below
  RUMD3 at T* = 2.0, inside the 15% tolerance. U and P differ by O(1/N), negligible. (ii) q = 7.26 in the
  RUMD3 F_s vs 7.25 here: recomputing F_s from the shipped trajectory frames at both q gives tau(7.25) /
  tau(7.26) = 1.0025 (Gaussian estimate (7.26 / 7.25)^2 = 1.0028), negligible against 10%; RUMD's F_s averages
  cos(q dx) over the three axes, ours is the isotropic sin(qr)/(qr), the same function for an isotropic
  liquid. (iii) RUMD's NVT thermostat vs our NVE / Nose-Hoover dynamics: a weak global thermostat, no
  measurable effect expected on D or tau_alpha at these tolerances. No published tau_alpha at T* = 0.8 was
  found. Kob and Andersen (PRE 51, 4626 and 52, 4134 (1995)) show D and tau only in figures (and, per a
  public analysis script, in the time unit tau / sqrt(48); not checked against the paper's text here).
* Cross-check: an INDEPENDENT long run, not literature: the torch code :func:`_independent_reference` below
  (all pairs, float64, no OpenMM), 16 replicas of N = 1000 in lock-step on an H100, Langevin (BAOAB)
  thermodynamics and velocity-Verlet NVE dynamics with the same analysis windows as here (JSON key
  "independent"). It agrees with all literature and RUMD3 points above
  (:func:`test_independent_reference_reproduces_literature`), and the tests below also compare with it.

Protocol (one session-scoped fixture, N = 1000, OpenMM CPU platform, 1 thread, time step 0.005 tau; ~55 s
on this 2-core machine when lightly loaded): a random subset of a simple cubic lattice melts in 3 tau of
Langevin dynamics at T* = 2.0; thermodynamics are sampled with Langevin friction 10/tau (a strong bath
decorrelates U and P in ~0.1-0.15 tau instead of ~0.5-0.8 tau at friction 1/tau, measured). At T* = 2.0 the
dynamics run 10 tau in NVE (``VerletIntegrator``), started at the sampled canonical mean energy. T* = 0.8 is
reached by quenching that liquid and equilibrating 25 tau (~10 tau_alpha) with friction 1/tau; 25 tau of
sampling follow, then 70 tau of Nose-Hoover dynamics (``NoseHooverIntegrator``, 1/tau), which serve both
the dynamics and, being canonical, the thermodynamics: at T* = 0.8 slow structural fluctuations make the
pressure the hardest number (0.4% standard error from 95 tau, against the 1% tolerance), so no sampled
time is wasted. N = 1000 as in Kob and Andersen's runs, so the finite-size (1/L hydrodynamic) part of D is
the same as theirs.
"""
import json
import math
from pathlib import Path

import numpy as np
import openmm as mm
import pytest
from openmm import unit

from enpcg import dynamics as dyn
from enpcg.errors import EnpcgError
from systems import kob_andersen as ka

REFERENCE_PATH = Path(ka.__file__).parent / "data" / "kob_andersen_reference.json"
N = 1000
THREADS = 1
Q = 7.25                     # 1/sigma_AA, first peak of S_AA(q) (Kob & Andersen)
FIT_WINDOWS = {2.0: (1.0, 4.0), 0.8: (8.0, 20.0)}  # tau, MSD fit windows (diffusive regime at both T)


def _reference():
    return json.loads(REFERENCE_PATH.read_text())


# ----------------------------------------------------------------------------- numpy reference (double loop)
def numpy_energy_forces_virial(positions, types, box):
    """Direct double loop over pairs i < j (vectorised over j), minimum image in a cubic box of edge ``box`` nm:
    returns U (kJ/mol), forces (N, 3) kJ/mol/nm and W = sum_pairs r_ij . f_ij (kJ/mol). Written from the model
    definition alone (no code shared with systems.kob_andersen)."""
    sig = np.array([[1.0, 0.8], [0.8, 0.88]])
    eps = np.array([[1.0, 1.5], [1.5, 0.5]])
    x = np.asarray(positions, dtype=float)
    n = len(x)
    energy, virial = 0.0, 0.0
    forces = np.zeros_like(x)
    for i in range(n - 1):
        d = x[i] - x[i + 1:]
        d -= box * np.round(d / box)
        r = np.sqrt(np.sum(d * d, axis=1))
        s = sig[types[i], types[i + 1:]]
        e = eps[types[i], types[i + 1:]]
        inside = r < 2.5 * s
        sr6 = (s / r) ** 6
        u = 4 * e * (sr6 * sr6 - sr6) - 4 * e * (2.5 ** -12 - 2.5 ** -6)
        energy += np.sum(u[inside])
        rf = 24 * e * (2 * sr6 * sr6 - sr6) * inside           # r . f_ij = -r du/dr
        virial += np.sum(rf)
        fij = (rf / r ** 2)[:, None] * d                          # force on i from j
        forces[i] += fij.sum(axis=0)
        forces[i + 1:] -= fij
    return energy, forces, virial


def _reference_context(system):
    return mm.Context(system.system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("Reference"))


@pytest.fixture(scope="module")
def liquid_configuration():
    """A T* = 2 liquid configuration of N = 300 (box 6.30 nm > 2 x 2.5 nm): lattice, 300 Langevin steps."""
    system = ka.create_system(300)
    traj = ka.equilibrate(system, ka.lattice_positions(300, seed=11), 2.0, 300, threads=THREADS, seed=11,
                          progress=False, compute_pressure=False)
    return system, traj.final_positions


# ----------------------------------------------------------------------------- units and the pair potential
def test_reduced_unit_mapping_known_values():
    """T* = 0.8 is 0.8 / 0.00831446262 K = 96.2179 K and T* = 2.0 is 240.5447 K (R = N_A k_B, exact since
    SI 2019); 1 kJ/mol/nm^3 = 1e3 J / (6.02214076e23 x 1e-27 m^3) = 16.60539 bar; conversions invert to
    1e-12 relative."""
    assert ka.temperature_kelvin(0.8) == pytest.approx(96.2179, abs=1e-4)
    assert ka.temperature_kelvin(2.0) == pytest.approx(240.5447, abs=1e-4)
    assert ka.pressure_bar(1.0) == pytest.approx(16.605391, abs=1e-6)
    assert ka.temperature_reduced(ka.temperature_kelvin(0.8)) == pytest.approx(0.8, rel=1e-12)
    assert ka.pressure_reduced(ka.pressure_bar(7.6)) == pytest.approx(7.6, rel=1e-12)
    np.testing.assert_allclose(ka.temperature_kelvin(np.array([0.8, 2.0])), [96.2179, 240.5447], atol=1e-4)


def test_pair_potential_known_values():
    """Analytic values: u_ab(rc_ab) = 0 (shifted, cut at 2.5 sigma_ab = 2.5, 2.0, 2.2 nm), u = 0 beyond;
    u_ab(2^(1/6) sigma_ab) = -eps_ab - u_LJ(2.5 sigma) with u_LJ(2.5 sigma) = 4 eps (2.5^-12 - 2.5^-6)
    = -0.016316891 eps; u_ab(sigma_ab) = 0.016316891 eps_ab. Exact to 1e-12."""
    shift = 4 * (2.5 ** -12 - 2.5 ** -6)
    assert shift == pytest.approx(-0.016316891136, abs=1e-12)
    for (a, b), (s, e) in {(0, 0): (1.0, 1.0), (0, 1): (0.8, 1.5), (1, 1): (0.88, 0.5)}.items():
        assert ka.pair_potential(2.5 * s * (1 - 1e-12), a, b) == pytest.approx(0.0, abs=1e-10)
        assert ka.pair_potential(2.5 * s * (1 + 1e-9), a, b) == 0.0
        assert ka.pair_potential(2 ** (1 / 6) * s, a, b) == pytest.approx(-e - e * shift, abs=1e-12)
        assert ka.pair_potential(s, b, a) == pytest.approx(-e * shift, abs=1e-12)
    np.testing.assert_allclose(ka.CUTOFF, [[2.5, 2.0], [2.0, 2.2]], atol=1e-15)


def test_create_system_validates_inputs():
    """Bad inputs raise EnpcgError naming the argument; N = 100 at density 1.2 gives a 4.37 nm box, less than
    twice the 2.5 nm cutoff, and the message says the smallest N (150)."""
    with pytest.raises(EnpcgError, match=r"n_particles: .*at least 150"):
        ka.create_system(100)
    with pytest.raises(EnpcgError, match="density"):
        ka.create_system(1000, density=-1.0)
    with pytest.raises(EnpcgError, match="fraction_b"):
        ka.create_system(1000, fraction_b=1.5)
    with pytest.raises(EnpcgError, match="n_particles"):
        ka.create_system(10.5)
    s = ka.create_system(1000)
    assert s.n_particles == 1000 and int(s.types.sum()) == 200
    assert s.box_length == pytest.approx((1000 / 1.2) ** (1 / 3), rel=1e-12)   # 9.4104 nm
    assert [a.name for a in s.topology.atoms()][798:802] == ["A", "A", "B", "B"]
    x = ka.lattice_positions(1000, seed=0)
    d = x[:, None, :] - x[None, :, :]
    d -= s.box_length * np.round(d / s.box_length)
    r = np.sqrt((d ** 2).sum(-1)) + np.eye(1000) * 1e9
    assert r.min() == pytest.approx(s.box_length / 10, rel=1e-9)              # lattice spacing 0.941 nm


# ----------------------------------------------------------------------------- force field and pressure
def test_energy_and_forces_match_numpy_double_loop(liquid_configuration):
    """OpenMM Reference platform (double precision) vs the numpy double loop on a T* = 2 liquid of 300
    particles (all pair types, pairs on both sides of each cutoff): energy to 1e-6 relative and
    ||F_openmm - F_numpy|| / ||F_numpy|| < 1e-6 (measured ~1e-15). The CPU platform (single precision) agrees
    to 1e-5 relative."""
    system, x = liquid_configuration
    u_np, f_np, _ = numpy_energy_forces_virial(x, system.types, system.box_length)
    ctx = _reference_context(system)
    ctx.setPositions(x)
    st = ctx.getState(getEnergy=True, getForces=True)
    u_mm = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    f_mm = st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    assert abs(u_mm - u_np) / abs(u_np) < 1e-6, (u_mm, u_np)
    rel_f = np.linalg.norm(f_mm - f_np) / np.linalg.norm(f_np)
    assert rel_f < 1e-6, rel_f
    cpu = mm.Context(system.system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("CPU"),
                     {"Threads": str(THREADS)})
    cpu.setPositions(x)
    st = cpu.getState(getEnergy=True, getForces=True)
    assert abs(st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) - u_np) / abs(u_np) < 1e-5
    f_cpu = st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    assert np.linalg.norm(f_cpu - f_np) / np.linalg.norm(f_np) < 1e-5


def test_virial_pressure_matches_numpy_and_volume_derivative(liquid_configuration):
    """The pressure route (virial W = sum r_ij . f_ij from a second CustomNonbondedForce) on the Reference
    platform equals the numpy double-loop virial to 1e-9 relative, and equals the thermodynamic definition
    P_conf = -dU/dV: central difference of U with positions and box scaled by (1 +- 1e-4)^(1/3), to 1e-4
    relative (the difference error is O(h^2) plus pairs crossing a cutoff, whose energy is continuous there;
    measured ~1e-6)."""
    system, x = liquid_configuration
    L = system.box_length
    _, _, w_np = numpy_energy_forces_virial(x, system.types, L)
    vp = ka.VirialPressure(system.types, L, platform="Reference")
    w_mm = vp.virial(x, L)
    assert abs(w_mm - w_np) / abs(w_np) < 1e-9, (w_mm, w_np)

    ctx = _reference_context(system)
    h = 1e-4

    def energy(scale):
        s = scale ** (1 / 3)
        ctx.setPeriodicBoxVectors(mm.Vec3(L * s, 0, 0), mm.Vec3(0, L * s, 0), mm.Vec3(0, 0, L * s))
        ctx.setPositions(x * s)
        return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    volume = L ** 3
    p_fd = -(energy(1 + h) - energy(1 - h)) / (2 * h * volume)
    p_vir = w_mm / (3 * volume)
    assert abs(p_fd - p_vir) / abs(p_vir) < 1e-4, (p_fd, p_vir)
    # total pressure with a kinetic energy K: (2K + W) / (3V)
    assert vp.pressure(x, L, 450.0) == pytest.approx((900.0 + w_mm) / (3 * volume), rel=1e-12)


# ----------------------------------------------------------------------------- state N runs (shared fixture)
def _mean_and_error(x, n_blocks=5):
    """Mean and the standard error from n_blocks consecutive block means (correlated samples)."""
    x = np.asarray(x, dtype=float)
    blocks = x[:len(x) // n_blocks * n_blocks].reshape(n_blocks, -1).mean(axis=1)
    return float(x.mean()), float(blocks.std(ddof=1) / math.sqrt(n_blocks))


def _dynamics(traj, system, frame_dt, window):
    """D_A, D_B (nm^2/ps) from MSD fits over ``window`` (ps) and tau_alpha (ps) of A and B from
    F_s(q = 7.25 / sigma_AA, t) = 1/e, with enpcg.dynamics (all time origins)."""
    md = traj.to_mdtraj(system.topology)
    assert np.allclose(md.time[1] - md.time[0], frame_dt)
    lags = dyn.lag_indices(md.n_frames, 50)
    out = {}
    for name, t in (("A", 0), ("B", 1)):
        idx = np.flatnonzero(system.types == t)
        lt, msd = dyn.mean_squared_displacement(md, idx, lags=lags, remove_drift=False, progress=False)
        out["D_" + name] = dyn.diffusion_coefficient(lt, msd, t_min=window[0], t_max=window[1])["D"]
        lt, fs = dyn.self_intermediate_scattering(md, Q, idx, lags=lags, remove_drift=False, progress=False)
        out["tau_" + name] = dyn.alpha_relaxation_time(lt, fs)
    return out


@pytest.fixture(scope="session")
def state_n():
    """The slow part, shared: N = 1000 at density 1.2, T* = 2.0 and T* = 0.8 (see the module docstring)."""
    system = ka.create_system(N)
    common = dict(threads=THREADS, progress=False)
    melt = ka.equilibrate(system, ka.lattice_positions(N, seed=1), 2.0, 600, seed=1, compute_pressure=False,
                          **common)
    res = {"system": system}
    # T* = 2.0: 15 tau of Langevin sampling (friction 10/tau, frames every 0.05 tau), then 10 tau of NVE
    th2 = ka.equilibrate(system, melt.final_positions, 2.0, 3000, velocities=melt.final_velocities,
                         report_interval=10, friction=10.0, seed=2, **common)
    u2 = th2.potential_energy_per_particle[20:]                     # t > 1 tau after the melt stage
    nve2 = ka.run(system, th2.final_positions, 2.0, 2000, 4, velocities=th2.final_velocities,
                  total_energy=N * u2.mean() + 0.5 * (3 * N - 3) * 2.0, compute_pressure=False, **common)
    res[2.0] = {"samples": [(th2, 20)], "dynamics": nve2, "frame_dt": 4 * ka.TIMESTEP}
    # T* = 0.8: quench, 25 tau equilibration (friction 1/tau), 25 tau Langevin sampling (friction 10/tau),
    # 70 tau Nose-Hoover (collision frequency 1/tau) for the dynamics, sampled too
    eq8 = ka.equilibrate(system, nve2.final_positions, 0.8, 5000, velocities=nve2.final_velocities, seed=3,
                         compute_pressure=False, **common)
    th8 = ka.equilibrate(system, eq8.final_positions, 0.8, 5000, velocities=eq8.final_velocities,
                         report_interval=10, friction=10.0, seed=4, **common)
    nh8 = ka.run(system, th8.final_positions, 0.8, 14000, 20, velocities=th8.final_velocities,
                 ensemble="nose-hoover", collision_frequency=1.0, **common)
    res[0.8] = {"samples": [(th8, 0), (nh8, 0)], "dynamics": nh8, "frame_dt": 20 * ka.TIMESTEP}
    for temp in (2.0, 0.8):
        r = res[temp]
        r["dyn"] = _dynamics(r["dynamics"], system, r["frame_dt"], FIT_WINDOWS[temp])
    return res


def _thermo(res, temp):
    """Time-weighted U/N and P (and their block standard errors) over the sampling runs of ``temp``."""
    out = []
    for quantity in ("potential_energy_per_particle", "pressure"):
        parts = [(_mean_and_error(getattr(tr, quantity)[skip:]), tr.times[-1] - tr.times[skip])
                 for tr, skip in res[temp]["samples"]]
        span = sum(w for _, w in parts)
        mean = sum(m * w for (m, _), w in parts) / span
        err = math.sqrt(sum((e * w) ** 2 for (_, e), w in parts)) / span
        out.append((mean, err))
    t_kin = float(np.mean(np.concatenate([tr.temperature[skip:] for tr, skip in res[temp]["samples"]])))
    return out[0], out[1], t_kin


def test_thermodynamics_T08_against_rumd3(state_n):
    """T* = 0.8, density 1.2: U/N within 0.5% and P within 1% of RUMD3 (U/N = -6.346, P = 1.2 (0.8 + 5.534)
    = 7.601; N = 10000; gamdpy repository examples/kablj.py), time-weighted over 25 tau of Langevin and
    70 tau of Nose-Hoover sampling. Measured: U/N = -6.3506 +- 0.005 (+0.07%), P = 7.579 +- 0.03 (-0.29%);
    the independent long runs give -6.348 and 7.588."""
    ref = _reference()["literature"]["T0.8"]
    (u, u_err), (p, p_err), t_kin = _thermo(state_n, 0.8)
    print(f"\nT*=0.8: U/N = {u:.4f} +- {u_err:.4f} (ref {ref['U_per_N']}), P = {p:.4f} +- {p_err:.4f} "
          f"(ref {ref['P']:.4f}), T_kin = {t_kin:.4f}")
    assert abs(u / ref["U_per_N"] - 1) < 0.005, (u, ref["U_per_N"])
    assert abs(p / ref["P"] - 1) < 0.01, (p, ref["P"])


def test_thermodynamics_T2_against_rumd3(state_n):
    """T* = 2.0, density 1.2: U/N within 0.5% and P within 1% of RUMD3 (U/N = -4.65395, P = 19.3177; N = 4000,
    NVT, 2 x 2791 tau; energies_mean.dat of docs/source/examples/Data/NVT_N4000_T2.0_rho1.2_KABLJ_rumd3 in the
    gamdpy 0.8.2 sdist on PyPI, JSON key "rumd3_gamdpy"). Cross-check, same tolerances: the independent long
    run (torch, 16 x N = 1000, 800 tau of Langevin sampling), U/N = -4.6574 +- 0.001, P = 19.281 +- 0.007.
    Measured here from 14 tau: U/N = -4.6595 (+0.12% vs RUMD3, +0.05% vs independent), P = 19.289 (-0.15%,
    +0.05%) (expected standard errors ~0.17% and ~0.26%)."""
    ref = _reference()
    rumd, ind = ref["rumd3_gamdpy"]["T2.0"], ref["independent"]["T2.0"]
    (u, u_err), (p, p_err), t_kin = _thermo(state_n, 2.0)
    print(f"\nT*=2.0: U/N = {u:.4f} +- {u_err:.4f} (RUMD3 {rumd['U_per_N'][0]:.5f}, "
          f"{100 * (u / rumd['U_per_N'][0] - 1):+.2f}%; independent {ind['U_per_N'][0]:.4f}, "
          f"{100 * (u / ind['U_per_N'][0] - 1):+.2f}%), P = {p:.4f} +- {p_err:.4f} (RUMD3 {rumd['P'][0]:.4f}, "
          f"{100 * (p / rumd['P'][0] - 1):+.2f}%; independent {ind['P'][0]:.4f}, "
          f"{100 * (p / ind['P'][0] - 1):+.2f}%), T_kin = {t_kin:.4f}")
    assert abs(u / rumd["U_per_N"][0] - 1) < 0.005, (u, rumd["U_per_N"])
    assert abs(p / rumd["P"][0] - 1) < 0.01, (p, rumd["P"])
    assert abs(u / ind["U_per_N"][0] - 1) < 0.005
    assert abs(p / ind["P"][0] - 1) < 0.01


def test_independent_reference_reproduces_literature():
    """The independent long runs (reference JSON) against the published/released points: U/N within 0.5% and
    P within 1% of RUMD3 at T* = 0.8 (gamdpy examples/kablj.py), of Pedersen et al. (2018) at T* = 1.028 and of
    the RUMD3 output in the gamdpy 0.8.2 sdist at T* = 2.0 (measured: +0.04% / -0.17%, -0.04% / +0.09% and
    +0.07% / -0.19%; U/N as a ratio); D_A, D_B within 15% of RUMD3 at T* = 2.0 (N = 4000 there, 1000 in the
    independent runs; measured -4.2% / -1.4%) and T* = 0.8 (-5.9% / +0.0%), tau_A at T* = 2.0 within 10%
    (+3.5%). This pins the cutoff convention (P = rho (T + W/N) in all sources) and ties the cross-check values
    to the references."""
    ref = _reference()
    for key in ("T0.8", "T1.028"):
        lit, ind = ref["literature"][key], ref["independent"][key]
        assert lit["P"] == pytest.approx(1.2 * (lit["T"] + lit["W_per_N"]), abs=1e-3)
        du = ind["U_per_N"][0] / lit["U_per_N"] - 1
        dp = ind["P"][0] / lit["P"] - 1
        print(f"\n{key}: independent U/N {ind['U_per_N'][0]:.4f} ({100 * du:+.2f}%), P {ind['P'][0]:.4f} "
              f"({100 * dp:+.2f}%)")
        assert abs(du) < 0.005 and abs(dp) < 0.01
    rumd, ind = ref["rumd3_gamdpy"], ref["independent"]
    r2 = rumd["T2.0"]
    assert r2["P"][0] == pytest.approx(r2["density"] * (r2["T_kinetic"][0] + r2["W_per_N"][0]), rel=1e-4)
    du = ind["T2.0"]["U_per_N"][0] / r2["U_per_N"][0] - 1
    dp = ind["T2.0"]["P"][0] / r2["P"][0] - 1
    print(f"T2.0 (RUMD3): independent U/N ({100 * du:+.2f}%), P ({100 * dp:+.2f}%)")
    assert abs(du) < 0.005 and abs(dp) < 0.01
    for key in ("T2.0", "T0.8"):
        for s in ("A", "B"):
            dd = ind[key]["nve"]["D_" + s][0] / rumd[key]["D_" + s][0] - 1
            print(f"{key} (RUMD3): independent D_{s} ({100 * dd:+.1f}%)")
            assert abs(dd) < 0.15
    dt = ind["T2.0"]["nve"]["tau_A"][0] / r2["tau_A"][0] - 1
    print(f"T2.0 (RUMD3): independent tau_A ({100 * dt:+.1f}%)")
    assert abs(dt) < 0.10


def test_energy_conservation_and_temperature(state_n):
    """dt = 0.005 tau. NVE (velocity Verlet) at T* = 2.0 and Nose-Hoover (chain of 3, 1/tau) at T* = 0.8: the
    conserved energy per particle drifts by less than 1e-4 eps_AA per tau (fitted slope; measured ~1e-5 and
    ~5e-6). Its spread is below 1e-3 eps_AA for NVE (U + K; measured 5e-4, the single-precision CPU forces)
    and below 5e-3 eps_AA for Nose-Hoover (U + K + bath; measured 2.5e-3: OpenMM evaluates the chain's energy
    and K at different sub-steps, so the sum oscillates by ~10% of the kinetic-energy fluctuation around a
    constant). The mean kinetic temperature is within 1.5% of the target: the NVE run starts at the sampled
    canonical mean energy (a single configuration's energy would scatter it by ~1%; velocity Verlet's
    O(dt^2) kinetic-energy bias, -0.3% in the independent runs, remains), the Nose-Hoover run is
    thermostatted."""
    for temp, max_spread in ((2.0, 1e-3), (0.8, 5e-3)):
        tr = state_n[temp]["dynamics"]
        drift = tr.energy_drift()
        spread = float(tr.conserved_energy_per_particle.std())
        t_mean = float(tr.temperature.mean())
        print(f"\n{tr.ensemble} T*={temp}: drift {drift:.2e} eps/tau per particle, std {spread:.2e} eps, "
              f"<T> = {t_mean:.4f}")
        assert abs(drift) < 1e-4, drift
        assert spread < max_spread, spread
        assert abs(t_mean / temp - 1) < 0.015, t_mean


def test_positions_are_unwrapped(state_n):
    """Frames are continuous trajectories: over the 10 tau NVE run at T* = 2.0 some particles move more than a
    quarter of the 9.41 nm box while none moves more than 0.45 box edges between frames (0.02 tau), and the
    minimum-image unwrapping of enpcg.dynamics reproduces the raw positions to 1e-5 nm (the float32 rounding
    of the mdtraj copy; measured 5e-7 nm)."""
    nve, system = state_n[2.0]["dynamics"], state_n["system"]
    steps = np.abs(np.diff(nve.positions, axis=0))
    assert steps.max() < 0.45 * nve.box_length
    disp = nve.positions[-1] - nve.positions[0]
    assert np.abs(disp).max() > 0.25 * nve.box_length
    assert np.any((nve.positions < 0) | (nve.positions > nve.box_length))   # not folded back into the box
    md = nve.to_mdtraj(system.topology)
    # float32 rounding of coordinates up to ~15 nm is ~1e-6 nm; the min-image steps add no error of their own
    np.testing.assert_allclose(dyn.unwrap(md), nve.positions, atol=1e-5)


def test_diffusion_coefficients(state_n):
    """D_A and D_B (MSD slope / 6 over 1-4 tau at T* = 2.0, NVE, and 8-20 tau at T* = 0.8, Nose-Hoover; N = 1000)
    within 15% of RUMD3 (JSON key "rumd3_gamdpy", gamdpy 0.8.2 sdist on PyPI): T* = 2.0 from
    docs/source/examples/Data/NVT_N4000_T2.0_rho1.2_KABLJ_rumd3/msd_000{0,1}_000{0,1}.dat (N = 4000, NVT; slope
    over 10-2790 tau): D_A = 0.04743 +- 0.00003, D_B = 0.0716 +- 0.0019; T* = 0.8 from
    docs/source/examples/Data/KABLJ_msd_R1.200_T0.800_rumd3.dat (N not stated; slope over 60-4200 tau):
    D_A = 0.00539 +- 0.00005, D_B = 0.00893 +- 0.00009, sigma_AA^2/tau. N = 1000 here: the 1/L hydrodynamic
    finite-size term makes D a few % lower than at N = 4000 (the independent N = 1000 runs: -4.2% / -1.4% at
    T* = 2.0). Cross-check, same tolerance: the independent long runs (NVE, N = 1000), D_A = 0.0454,
    D_B = 0.0706 (T* = 2.0), 0.00507, 0.00893 (T* = 0.8), with 3-6% scatter per replica.
    Measured here: 0.0431, 0.0668, 0.00541, 0.00850, i.e. vs RUMD3 -9.2%, -6.7%, +0.3%, -4.8% and vs the
    independent runs -5.3%, -5.4%, +6.7%, -4.8% (T* = 2.0: ~4% of the -9.2% is the finite-size term, the rest
    is within the ~5% scatter of a 10 tau NVE run of N = 1000)."""
    ref = _reference()
    for temp, key in ((2.0, "T2.0"), (0.8, "T0.8")):
        got = state_n[temp]["dyn"]
        for s in ("A", "B"):
            rumd = ref["rumd3_gamdpy"][key]["D_" + s][0]
            ind = ref["independent"][key]["nve"]["D_" + s][0]
            d = got["D_" + s]
            print(f"\nT*={temp}: D_{s} = {d:.5f} (RUMD3 {rumd:.5f}, {100 * (d / rumd - 1):+.1f}%; "
                  f"independent {ind:.5f}, {100 * (d / ind - 1):+.1f}%)")
            assert abs(d / rumd - 1) < 0.15
            assert abs(d / ind - 1) < 0.15


def test_alpha_relaxation_time(state_n):
    """tau_alpha, F_s(q = 7.25 / sigma_AA, tau_alpha) = 1/e: the A particles at T* = 2.0 within 10% of RUMD3
    (the issue's requirement): tau_A = 0.350 +- 0.011 from docs/source/examples/Data/
    NVT_N4000_T2.0_rho1.2_KABLJ_rumd3/Fs_000{0,1}_000{0,1}.dat of the gamdpy 0.8.2 sdist (N = 4000, NVT, column A
    at q = 7.26; ln F_s linear in ln t between t = 0.341 and 0.681, which reads ~1.5% low on that coarse grid;
    q = 7.25 would lengthen it by 0.25%, measured on the shipped trajectory). Cross-check, same tolerance: the
    independent long runs, tau_A = 0.362. At T* = 0.8 no released or published value was found; the 60 tau
    run holds only ~20 tau_alpha and the independent runs scatter by 3% per 80 tau replica, so there tau_A is
    only checked to 20% of the independent value (a sanity bound) and reported. Measured here: tau_A = 0.362
    at T* = 2.0 (+3.2% vs RUMD3, -0.2% vs independent) and 2.60 at T* = 0.8 (-2.4% vs independent), in tau."""
    ref = _reference()
    rumd = ref["rumd3_gamdpy"]["T2.0"]["tau_A"][0]
    for temp, key, tol in ((2.0, "T2.0", 0.10), (0.8, "T0.8", 0.20)):
        got = state_n[temp]["dyn"]
        for s in ("A", "B"):
            want = ref["independent"][key]["nve"]["tau_" + s][0]
            print(f"\nT*={temp}: tau_{s} = {got['tau_' + s]:.4f} (independent {want:.4f}, "
                  f"{100 * (got['tau_' + s] / want - 1):+.1f}%)")
        assert abs(got["tau_A"] / ref["independent"][key]["nve"]["tau_A"][0] - 1) < tol
    tau = state_n[2.0]["dyn"]["tau_A"]
    print(f"T*=2.0: tau_A = {tau:.4f} (RUMD3 {rumd:.4f}, {100 * (tau / rumd - 1):+.1f}%)")
    assert abs(tau / rumd - 1) < 0.10


# ----------------------------------------------------------------------------- independent reference (GPU)
# Not a test. It produced the "independent" block of systems/data/kob_andersen_reference.json on one H100 with
#   python3 -c "import ast; m = ast.parse(open('tests/test_kob_andersen.py').read()); ns = {};
#       exec(compile(ast.Module([f for f in m.body if getattr(f, 'name', '') == '_independent_reference'], []),
#       'ref', 'exec'), ns); ns['_independent_reference']('ref.json', 16, 'cuda')"
# (it needs only torch; the extraction avoids importing OpenMM, which that machine does not have).
def _independent_reference(out_path, replicas=16, device="cuda", scale=1.0, seed=0):
    """Long Kob-Andersen runs in torch, written independently of OpenMM (all pairs, float64).

    R replicas of N = 1000 at density 1.2 run in lock-step. Thermodynamics: Langevin (BAOAB, friction 5/tau)
    sampling; dynamics: velocity-Verlet NVE started at the replica-mean canonical energy. Writes JSON with
    mean and standard error over replicas. ``scale`` shortens every stage (for a quick local check).
    """
    import json
    import math
    import time

    import torch

    torch.set_default_dtype(torch.float64)
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    n, rho, dt, q = 1000, 1.2, 0.005, 7.25
    box = (n / rho) ** (1.0 / 3.0)
    types = torch.zeros(n, dtype=torch.long, device=dev)
    types[800:] = 1
    sig = torch.tensor([[1.0, 0.8], [0.8, 0.88]], device=dev)[types[:, None], types[None, :]]
    eps = torch.tensor([[1.0, 1.5], [1.5, 0.5]], device=dev)[types[:, None], types[None, :]]
    a12, b6, rc2 = 4 * eps * sig ** 12, 4 * eps * sig ** 6, (2.5 * sig) ** 2
    shift = 4 * eps * (2.5 ** -12 - 2.5 ** -6)
    off = ~torch.eye(n, dtype=torch.bool, device=dev)
    is_a = types == 0

    def forces(x):
        d = x[:, :, None, :] - x[:, None, :, :]
        d = d - box * torch.round(d / box)
        r2 = (d * d).sum(-1)
        m = (r2 < rc2) & off
        ir2 = torch.where(m, 1.0 / torch.where(m, r2, torch.ones_like(r2)), torch.zeros_like(r2))
        ir6 = ir2 ** 3
        vir = ir6 * (12 * a12 * ir6 - 6 * b6)           # r.f per pair (zero outside the cutoff)
        u = 0.5 * torch.where(m, ir6 * (a12 * ir6 - b6) - shift, torch.zeros_like(r2)).sum((1, 2))
        f = ((vir * ir2)[..., None] * d).sum(2)
        return f, u, 0.5 * vir.sum((1, 2))

    def kinetic(v):
        return 0.5 * (v * v).sum((1, 2))

    def randn(shape):
        return torch.randn(shape, generator=gen, device=dev)

    def langevin(x, v, f, temp, steps, gamma, every, record):
        c1 = math.exp(-gamma * dt)
        c2 = math.sqrt((1 - c1 * c1) * temp)
        rows = []
        for k in range(steps):
            v = v + 0.5 * dt * f
            x = x + 0.5 * dt * v
            v = c1 * v + c2 * randn(v.shape)
            x = x + 0.5 * dt * v
            f, u, w = forces(x)
            v = v + 0.5 * dt * f
            if record and (k + 1) % every == 0:
                rows.append(torch.stack([u, w, kinetic(v)], 1))
        return x, v, f, (torch.stack(rows, 1) if rows else None)

    def nve(x, v, f, steps, every):
        frames, rows = [], []
        for k in range(steps):
            v = v + 0.5 * dt * f
            x = x + dt * v                                 # unwrapped: never folded back into the box
            f, u, w = forces(x)
            v = v + 0.5 * dt * f
            if (k + 1) % every == 0:
                frames.append(x.float())
                rows.append(torch.stack([u, w, kinetic(v)], 1))
        return x, v, f, torch.stack(frames, 1), torch.stack(rows, 1)

    def thermo(rows, temp):
        u, w, k = rows[..., 0] / n, rows[..., 1], rows[..., 2]
        p = (2 * k + w) / (3 * box ** 3)
        per = torch.stack([u.mean(1), p.mean(1), (2 * k / (3 * n)).mean(1)], 1)
        mean, err = per.mean(0), per.std(0) / math.sqrt(per.shape[0])
        return {"U_per_N": [mean[0].item(), err[0].item()], "P": [mean[1].item(), err[1].item()],
                "T_kinetic": [mean[2].item(), err[2].item()], "T_set": temp}

    def dynamics(frames, frame_dt, fit_window):
        nf = frames.shape[1]
        lags = sorted({int(round(v)) for v in torch.logspace(0, math.log10(0.8 * nf), 60).tolist()})
        msd, fs = [], []
        for lag in lags:
            disp = frames[:, lag:] - frames[:, :-lag]
            r2 = (disp.double() ** 2).sum(-1)
            qr = q * torch.sqrt(r2)
            sinc = torch.where(qr > 1e-9, torch.sin(qr) / torch.where(qr > 1e-9, qr, torch.ones_like(qr)),
                               torch.ones_like(qr))
            msd.append(torch.stack([r2[..., is_a].mean((1, 2)), r2[..., ~is_a].mean((1, 2))], 1))
            fs.append(torch.stack([sinc[..., is_a].mean((1, 2)), sinc[..., ~is_a].mean((1, 2))], 1))
        t = torch.tensor(lags, device=dev) * frame_dt
        msd, fs = torch.stack(msd, 1), torch.stack(fs, 1)          # (R, lags, 2)
        sel = (t >= fit_window[0]) & (t <= fit_window[1])
        tt = t[sel]
        out = {"t": t.tolist(), "msd": msd.mean(0).tolist(), "fs": fs.mean(0).tolist(), "fit_window": fit_window}
        for s, name in ((0, "A"), (1, "B")):
            y = msd[:, sel, s]
            tm = tt.mean()
            slope = ((tt - tm) * (y - y.mean(1, keepdim=True))).sum(1) / ((tt - tm) ** 2).sum()
            d = slope / 6
            taus = []
            for r in range(fs.shape[0]):
                f = fs[r, :, s]
                below = torch.nonzero(f < math.exp(-1))
                if len(below) == 0 or int(below[0]) == 0:
                    taus.append(float("nan"))
                    continue
                k = int(below[0])
                a = (math.exp(-1) - f[k - 1].item()) / (f[k].item() - f[k - 1].item())
                taus.append(math.exp(math.log(t[k - 1].item())
                                     + a * (math.log(t[k].item()) - math.log(t[k - 1].item()))))
            taus = torch.tensor(taus)
            out["D_" + name] = [d.mean().item(), (d.std() / math.sqrt(len(d))).item()]
            out["tau_" + name] = [taus.mean().item(), (taus.std() / math.sqrt(len(taus))).item()]
        return out

    def scaled(steps, every=1):
        return max(every, int(round(steps * scale / every)) * every)

    t0 = time.time()
    m = math.ceil(n ** (1 / 3))
    grid = torch.stack(torch.meshgrid(*[torch.arange(m, device=dev)] * 3, indexing="ij"), -1).reshape(-1, 3)
    x = torch.stack([(grid[torch.randperm(len(grid), generator=gen, device=dev)[:n]] + 0.5) * (box / m)
                     for _ in range(replicas)])
    v = randn(x.shape) * math.sqrt(2.0)
    f, _, _ = forces(x)
    results = {"replicas": replicas, "n": n, "density": rho, "dt": dt, "q": q}

    def state(temp, x, v, f, equil, sample, nve_steps, frame_every, fit_window, gamma_sample=5.0):
        x, v, f, _ = langevin(x, v, f, temp, scaled(equil), 1.0, 1, False)
        x, v, f, rows = langevin(x, v, f, temp, scaled(sample, 10), gamma_sample, 10, True)
        res = thermo(rows, temp)
        if nve_steps:
            u_mean = rows[..., 0].mean()
            v = v - v.mean(1, keepdim=True)
            _, u0, _ = forces(x)
            k_target = u_mean + 0.5 * (3 * n - 3) * temp - u0                 # per replica
            v = v * torch.sqrt(k_target / kinetic(v))[:, None, None]
            x, v, f, frames, rows2 = nve(x, v, f, scaled(nve_steps, frame_every), frame_every)
            e = (rows2[..., 0] + rows2[..., 2]) / n
            tt = torch.arange(e.shape[1], device=dev) * frame_every * dt
            drift = (((tt - tt.mean()) * (e - e.mean(1, keepdim=True))).sum(1) / ((tt - tt.mean()) ** 2).sum())
            res["nve"] = thermo(rows2, temp)
            res["nve"]["drift_per_N_per_tau"] = [drift.mean().item(), drift.abs().max().item()]
            window = tuple(w * min(scale, 1.0) for w in fit_window)
            res["nve"].update(dynamics(frames, frame_every * dt, window))
        res["seconds"] = time.time() - t0
        return res, x, v, f

    plan = (("T2.0", 2.0, 2000, 10000, 4000, 5, (1.0, 4.0)), ("T1.028", 1.028, 4000, 8000, 0, 0, None),
            ("T0.8", 0.8, 8000, 12000, 16000, 20, (8.0, 20.0)))
    for key, temp, equil, sample, nve_steps, every, window in plan:
        results[key], x, v, f = state(temp, x, v, f, equil, sample, nve_steps, every, window)
        print(key, round(results[key]["seconds"], 1), "s", flush=True)
        with open(out_path, "w") as fh:          # rewritten after each state: a timeout keeps what is done
            json.dump(results, fh, indent=1)
    return results

