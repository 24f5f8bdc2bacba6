"""Oriented beads simulated in OpenMM: the torque reporter and rotational equipartition.

The beads are rigid massive sites with a virtual-site centre (openmm_plugin.oriented); the CG energy is a
TorchForce. Tolerances: reporter torques 1e-6 (float64 model) / 1e-4 (float32 model) relative to torques
recomputed from the saved centres and axes; T_rot within 2 % or 3 block standard errors of the set
temperature, whichever is larger, over >= 15,000 bead samples.
"""
import numpy as np
import pytest
import torch

from enpcg.models import create_model
from enpcg.oriented import forces_and_torques, random_rotations
from enpcg.topology import CGTopology

KB = 0.008314462618  # kJ/mol/K
MOMENTS = {"director": [[1.2, 0.0, 0.0], [0.0, 0.15, 0.0], [0.0, 0.0, 0.15]],
           "frame": [[0.9, 0.1, 0.05], [0.1, 0.5, 0.0], [0.05, 0.0, 0.3]]}


def _lattice(n_side, spacing, seed):
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3) * spacing
    return g + spacing / 2, random_rotations(len(g), rng)


def _system(kind, n_side=5, spacing=0.75, dtype="float64"):
    from openmm_plugin.oriented import create_oriented_system

    n = n_side ** 3
    topo = CGTopology([f"M{i}" for i in range(n)], ["A"] * n, [150.0] * n, list(range(n)),
                      orientations=[kind] * n, body_moments={"A": MOMENTS[kind]})
    if kind == "frame":  # an asymmetric rigid molecule of three LJ sites
        model = create_model("rigid_sites", topo, sites=[[0.12, 0, 0], [-0.1, 0.05, 0], [0, -0.1, 0.08]],
                             sigma=0.25, epsilon=1.5, cutoff=0.7, switch_distance=0.6).double()
    else:  # a linear molecule: its sites lie on e_x, so the energy depends on the director only
        model = create_model("rigid_sites", topo, sites=[[0.12, 0, 0], [-0.12, 0, 0]],
                             sigma=0.25, epsilon=1.5, cutoff=0.7, switch_distance=0.6).double()
    pos, axes = _lattice(n_side, spacing, seed=1)
    box = np.eye(3) * n_side * spacing
    return model, create_oriented_system(model, pos, axes, box, dtype=dtype), box


def _simulation(osys, temperature, dt, friction, seed, platform="CPU"):
    import openmm
    from openmm import app

    integ = openmm.LangevinMiddleIntegrator(temperature, friction, dt)
    integ.setRandomNumberSeed(seed)
    plat = openmm.Platform.getPlatformByName(platform)
    props = {"Threads": "1"} if platform == "CPU" else {}
    sim = app.Simulation(osys.topology, osys.system, integ, plat, props)
    sim.context.setPositions(osys.positions)
    sim.context.computeVirtualSites()
    sim.context.setVelocitiesToTemperature(temperature, seed)
    return sim


@pytest.mark.parametrize("kind,dtype,tol", [("frame", "float64", 1e-6), ("director", "float64", 1e-6),
                                            ("frame", "float32", 1e-4)])
def test_reporter_torques_match_model(tmp_path, kind, dtype, tol):
    """Torques written by OrientedForceReporter equal tau recomputed from the saved centres and axes by the
    model (float64): ||dtau||/||tau|| <= 1e-6 for a float64 export, 1e-4 for float32; forces likewise."""
    from enpcg.oriented.data import read_oriented
    from openmm_plugin.oriented import OrientedForceReporter

    model, osys, box = _system(kind, n_side=3, spacing=0.55, dtype=dtype)
    sim = _simulation(osys, 300.0, 0.002, 5.0, seed=3)
    rep = OrientedForceReporter(tmp_path / "run.h5", 5, osys)
    sim.reporters.append(rep)
    sim.step(20)
    rep.close()
    data = read_oriented(tmp_path / "run.h5")
    assert data.n_frames == 4
    _, f, t = forces_and_torques(model, data.positions, data.axes, data.box)
    tref = data.torques
    if kind == "director":  # the model has no axial torque; the sites' axial torque is zero too
        u = data.axes[..., 0]
        t = t - np.sum(t * u, -1, keepdims=True) * u
        assert np.abs(np.sum(tref * u, -1)).max() <= tol * np.abs(tref).max()
    assert np.linalg.norm(tref - t) / np.linalg.norm(t) <= tol
    assert np.linalg.norm(data.forces - f) / np.linalg.norm(f) <= tol


@pytest.mark.parametrize("kind,dt", [("frame", 0.0025), ("director", 0.004)])
def test_rotational_temperature_equipartition(kind, dt):
    """Langevin (LangevinMiddleIntegrator, time step 2.5 fs for frame beads and 4 fs for director beads,
    friction 2/ps) at 300 K: T_rot = 2<K_rot>/(n_rot N k_B)
    with n_rot = 3 (frame beads: 4 rigid sites) or 2 (director beads: 2 sites) equals 300 K within 2 % or 3
    block standard errors, over at least 15,000 independent bead samples: 64 beads x 300 frames spaced 0.5 ps,
    counted as n_eff = n (1 - rho) / (1 + rho) with rho the measured lag-one autocorrelation of a bead's K_rot.

    Why the steps and friction are this small: constrained Langevin integration heats the librations of rigid
    frame beads (measured for these beads at friction 20/ps: +6 % with 4 fs, +3.6 % with 2 fs; at 2/ps:
    +1.8 +- 0.7 % with 4 fs, +0.8 +- 0.7 % with 2 fs), while the translations are unaffected; director beads
    (two sites, one constraint) showed +0.5 +- 0.7 % at 4 fs."""
    temperature, friction = 300.0, 2.0
    model, osys, box = _system(kind, n_side=4)
    sim = _simulation(osys, temperature, dt, friction, seed=11)
    every = int(round(0.5 / dt))  # 0.5 ps between samples
    sim.step(4 * every)  # 2 ps: velocities from setVelocitiesToTemperature relax
    n_frames = 300
    n = osys.site_index.shape[0]
    k_rot = np.empty((n_frames, n))
    for k in range(n_frames):
        sim.step(every)
        v = sim.context.getState(getVelocities=True).getVelocities(asNumpy=True)._value
        k_rot[k] = osys.rotational_kinetic_energy(v)
    x = k_rot - k_rot.mean(axis=0)
    lag1 = float((x[1:] * x[:-1]).mean() / (x * x).mean())
    n_eff = n * n_frames * (1 - lag1) / (1 + lag1)
    t_rot = 2 * k_rot.sum(axis=1) / (osys.rotational_dof * n * KB)
    blocks = t_rot.reshape(10, -1).mean(axis=1)
    sem = blocks.std(ddof=1) / np.sqrt(len(blocks))
    print(f"{kind}: T_rot = {t_rot.mean():.1f} K +- {sem:.1f} (block SE), lag-1 autocorrelation {lag1:.3f}, "
          f"n_eff {n_eff:.0f}")
    assert n_eff >= 15000, (n_eff, lag1)
    assert abs(t_rot.mean() - temperature) <= max(0.02 * temperature, 3 * sem), (t_rot.mean(), sem)
