"""CG dynamics in atomistic time: per-particle Langevin frictions and their fit on diffusion coefficients.

Units: nm, ps, K, amu, 1/ps, nm^2/ps.
"""
import math

import numpy as np
import openmm
import pytest
from openmm import app, unit

from enpcg.errors import EnpcgError
from openmm_plugin.cg_dynamics import (DynamicsCalibration, calibrate_time_scale, fit_friction,
                                       run_diffusion)
from openmm_plugin.integrators import PerParticleLangevinIntegrator, langevin_integrator
from openmm_plugin.simulate import run_simulation

KB = 0.008314462618  # kJ/mol/K
CPU = {"platform": "CPU"}


def _one_thread():
    openmm.Platform.getPlatformByName("CPU").setPropertyDefaultValue("Threads", "1")


def free_particles(n, mass):
    system = openmm.System()
    for _ in range(n):
        system.addParticle(mass)
    return system


def lj_mixture(n_a=200, n_b=100, box=2.46, seed=0):
    """A dense supercritical two-type Lennard-Jones fluid at 200 K (argon-like A 40 amu, heavier B 80 amu,
    epsilon 1 kJ/mol, so T* = 1.66 and rho sigma_A^3 = 0.79), cutoff 0.9 nm."""
    system = openmm.System()
    nb = openmm.NonbondedForce()
    nb.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    nb.setCutoffDistance(0.9)
    for i in range(n_a + n_b):
        a = i < n_a
        system.addParticle(40.0 if a else 80.0)
        nb.addParticle(0.0, 0.34 if a else 0.37, 1.0)
    system.addForce(nb)
    system.setDefaultPeriodicBoxVectors(openmm.Vec3(box, 0, 0), openmm.Vec3(0, box, 0), openmm.Vec3(0, 0, box))
    m = int(math.ceil((n_a + n_b) ** (1 / 3)))
    grid = np.array([(i, j, k) for i in range(m) for j in range(m) for k in range(m)], float)[: n_a + n_b]
    rng = np.random.default_rng(seed)
    pos = (grid + 0.5) * box / m + rng.normal(0, 0.01, grid.shape)
    return system, pos, np.diag([box] * 3), {"A": np.arange(n_a), "B": np.arange(n_a, n_a + n_b)}


def test_free_particles_diffuse_with_kT_over_m_gamma():
    """Free particles, two frictions in one run: D = k_B T / (m gamma) per particle (the Ornstein-Uhlenbeck
    known answer), within 6% (about 3 standard errors of 150 particles x 200 ps)."""
    _one_thread()
    n, mass, temperature = 300, 10.0, 300.0
    gam = np.where(np.arange(n) < n // 2, 2.0, 8.0)
    d = run_diffusion(free_particles(n, mass), np.zeros((n, 3)), None,
                      {"slow": np.arange(n // 2, n), "fast": np.arange(n // 2)}, temperature=temperature,
                      friction=gam, timestep=0.01, steps=20000, record_interval=50, platform="CPU", seed=3)
    for name, g in (("fast", 2.0), ("slow", 8.0)):
        expected = KB * temperature / (mass * g)
        assert abs(d[name][0] / expected - 1) < 0.06, (name, d[name], expected)


def test_per_particle_integrator_keeps_constraints_and_temperature():
    """Rigid dimers with a massless virtual-site centre under per-particle frictions: the constraints hold to
    1e-6 nm and the kinetic temperature (5 DOF per dimer) is the set 300 K within 3%."""
    _one_thread()
    n_dimers, temperature = 200, 300.0
    system = openmm.System()
    pos = []
    rng = np.random.default_rng(1)
    for k in range(n_dimers):
        a = system.addParticle(12.0)
        b = system.addParticle(16.0)
        c = system.addParticle(0.0)
        system.addConstraint(a, b, 0.12)
        system.setVirtualSite(c, openmm.TwoParticleAverageSite(a, b, 16 / 28, 12 / 28))
        x = rng.uniform(0, 10, 3)
        pos += [x, x + [0.12, 0, 0], x]
    gam = np.tile([0.5, 5.0, 1.0], n_dimers)
    integrator = langevin_integrator(temperature, gam, 0.002, n_particles=system.getNumParticles())
    assert isinstance(integrator, PerParticleLangevinIntegrator)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"))
    integrator.apply_frictions()
    context.setPositions(np.array(pos))
    context.setVelocitiesToTemperature(temperature)
    integrator.step(2000)
    ke = []
    for _ in range(200):
        integrator.step(20)
        ke.append(context.getState(getEnergy=True).getKineticEnergy().value_in_unit(unit.kilojoule_per_mole))
    t_kin = 2 * np.mean(ke) / (5 * n_dimers * KB)
    x = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    bond = np.linalg.norm(x[1::3] - x[0::3], axis=1)
    assert np.max(np.abs(bond - 0.12)) < 1e-6
    assert abs(t_kin / temperature - 1) < 0.03, t_kin


def test_fit_friction_recovers_the_reference_frictions():
    """Known answer: the 'atomistic' reference is the same LJ mixture run with frictions A 6/ps, B 3/ps; fitted
    from a start of 1/ps, each type's friction comes back within 25 % and the last CG run's D within 10 % of
    the reference D. Noise sets the tolerances: D from one 100 ps run of 100-200 particles scatters by about
    5 % between seeds, and D(gamma) is flatter than 1/gamma in a liquid, so gamma is less sharply determined
    than D."""
    _one_thread()
    system, pos, box, groups = lj_mixture()
    truth = {"A": 6.0, "B": 3.0}
    gam = np.empty(system.getNumParticles())
    for k, idx in groups.items():
        gam[idx] = truth[k]
    run = dict(temperature=200.0, timestep=0.005, steps=20000, record_interval=50, equilibration_steps=2000,
               platform="CPU")
    ref = run_diffusion(system, pos, box, groups, friction=gam, seed=11, **run)
    target = {k: v[0] for k, v in ref.items()}
    cal = fit_friction(system, pos, box, groups, target, initial_friction=1.0, rel_tol=0.05, max_iter=6,
                       progress=False, seed=20, **run)
    last = cal.history[-1]["diffusion"]
    for k in groups:
        assert abs(last[k] / target[k] - 1) < 0.10, (k, last[k], target[k])
        assert abs(cal.frictions[k] / truth[k] - 1) < 0.25, (k, cal.frictions, truth)
        assert cal.raw_speed_up[k] > 1.5, cal.raw_speed_up  # friction 1/ps is faster than 6 or 3 /ps


def test_time_scale_and_simulate_apply_the_calibration(tmp_path):
    """Time-scale mode gives s = D_CG/D_target (> 1 when the reference is slower); the calibration round-trips
    through JSON, its per-type frictions expand per particle, and run_simulation writes mapped time =
    s x CG time in its log (to 1e-5 relative)."""
    _one_thread()
    system, pos, box, groups = lj_mixture()
    target = {"A": 0.01, "B": 0.005}
    cal = calibrate_time_scale(system, pos, box, groups, target, temperature=200.0, timestep=0.005, steps=4000,
                               record_interval=40, friction=1.0, platform="CPU", progress=False)
    d = cal.history[0]["diffusion"]
    expected = (200 * d["A"] + 100 * d["B"]) / (200 * 0.01 + 100 * 0.005)
    assert cal.time_scale == pytest.approx(expected, rel=1e-12)
    cal.save(tmp_path / "dynamics.json")
    back = DynamicsCalibration.load(tmp_path / "dynamics.json")
    assert back.time_scale == cal.time_scale and back.frictions == cal.frictions
    types = ["A"] * 200 + ["B"] * 100
    frictions = {"A": 2.0, "B": 4.0}
    back.frictions = frictions
    per_particle = back.particle_frictions(types)
    assert per_particle[0] == 2.0 and per_particle[-1] == 4.0
    top = app.Topology()
    chain = top.addChain()
    for t in types:
        top.addAtom(t, app.element.argon, top.addResidue(t, chain))
    res = run_simulation(system, top, pos, box, tmp_path / "sim", steps=200, timestep=0.005, temperature=200.0,
                         friction=per_particle, report_interval=50, platform="CPU", progress=False,
                         time_scale=back.time_scale)
    rows = np.genfromtxt(res["log"], delimiter=",", names=True)
    assert np.allclose(rows["Mapped_time_ps"], back.time_scale * rows["Time_ps"], rtol=1e-5)
    with pytest.raises(EnpcgError, match="bead types"):
        back.particle_frictions(["A", "C"])
