"""Health checks of CG simulations: overlapping beads, a time step too large, and the last good checkpoint.

Systems are plain OpenMM Systems of a few bead chains (no model file, Reference platform, float64), so each
run takes well under a second: 4 chains of 4 beads (14 amu) in a 2.4 nm cubic box, harmonic bonds (r0 0.4 nm)
and a Gaussian-core repulsion eps exp(-r^2 / (2 s^2)) between non-bonded beads (finite at r = 0, as a spline
table or a network is: nothing forbids an overlap, so only the health check can catch one). Units: nm, ps,
kJ/mol, amu, K. The pipeline part checks the fitted range that `enpcg simulate --min-distance auto` derives.
"""
import re

import numpy as np
import openmm as mm
import pytest
from openmm import app, unit

import torch  # noqa: F401  (before openmm plugins: openmm-torch kernels need libtorch loaded)

from enpcg.errors import EnpcgError
from enpcg.h5md import H5MDWriter, read_h5md
from enpcg.topology import CGTopology
from openmm_plugin.reporters import HealthLimits
from openmm_plugin.simulate import CHECKPOINT, run_simulation

L = 2.4
BOX = np.eye(3) * L
N_CHAINS, PER = 4, 4


def chains(bond_k=1000.0, eps=3.0, s=0.3):
    """(CGTopology, System, positions (n, 3) nm): straight chains along x at well separated y, z."""
    names = [f"B{i + 1}" for i in range(PER)] * N_CHAINS
    mol = np.repeat(np.arange(N_CHAINS), PER)
    bonds = [[c * PER + i, c * PER + i + 1] for c in range(N_CHAINS) for i in range(PER - 1)]
    top = CGTopology(bead_names=names, bead_types=["C"] * len(names), masses=[14.0] * len(names),
                     molecule_index=mol, bonds=bonds, residue_names=["PE"] * N_CHAINS)
    pos = np.array([[0.2 + 0.4 * i, 0.3 + 0.6 * (c % 2), 0.3 + 0.6 * (c // 2)]
                    for c in range(N_CHAINS) for i in range(PER)])
    system = mm.System()
    system.setDefaultPeriodicBoxVectors(*[mm.Vec3(*row) for row in BOX])
    for _ in range(len(names)):
        system.addParticle(14.0)
    bond = mm.HarmonicBondForce()
    bond.setUsesPeriodicBoundaryConditions(True)
    for i, j in bonds:
        bond.addBond(i, j, 0.4, bond_k)
    system.addForce(bond)
    rep = mm.CustomNonbondedForce(f"{eps}*exp(-r^2/(2*{s}^2))")
    rep.setNonbondedMethod(mm.CustomNonbondedForce.CutoffPeriodic)
    rep.setCutoffDistance(1.1)
    for _ in range(len(names)):
        rep.addParticle([])
    for i, j in top.excluded_pairs():
        rep.addExclusion(int(i), int(j))
    system.addForce(rep)
    return top, system, pos


def run(top, system, pos, out, **kw):
    kw = {"steps": 200, "timestep": 0.005, "report_interval": 10, "platform": "Reference", "seed": 1,
          "progress": False, **kw}
    return run_simulation(system, top.to_openmm_topology(BOX), pos, BOX, out, **kw)


def test_overlapping_start_stops_naming_step_and_beads(tmp_path):
    """Chain 2 turned to cross chain 0 so that its bead 1 (index 9) sits 0.01 nm from bead 1 of chain 0
    (index 1): the Gaussian core pushes them apart with only 0.3 kJ/mol/nm, below the minimiser's tolerance
    (10 kJ/mol/nm), so the overlap survives minimisation and the start check (step 0) stops the run. The
    message names step 0 of 200, both beads (index, name, molecule), their distance (0.01 nm, to within the
    minimiser's few 1e-4 nm) and the limit; without checkpoints no file is left."""
    top, system, pos = chains()
    pos[8:12] = pos[1] + [0.01, 0.0, 0.0] + np.outer(np.arange(-1, 3), [0.0, 0.0, 0.4])
    limits = HealthLimits(min_distance=0.2, excluded_pairs=top.excluded_pairs(), min_distance_source="test")
    with pytest.raises(EnpcgError) as err:
        run(top, system, pos, tmp_path / "md", health=limits)
    msg = str(err.value)
    assert "failed at step 0 of 200" in msg
    assert re.search(r"1 non-bonded bead pair\(s\) closer than min_distance = 0.2 nm \(test\): bead 1 \(B2, PE 0\) "
                     r"and bead 9 \(B2, PE 2\) at 0\.01\d* nm", msg), msg
    assert "Fix:" in msg
    assert list((tmp_path / "md").iterdir()) == []
    # The same start without the pair limit runs: the limit, not the dynamics, stopped it.
    run(top, system, pos, tmp_path / "ok", steps=20)


def test_huge_time_step_stops_naming_step_and_beads_and_checkpoint_reads_back(tmp_path):
    """Stiff bonds (k = 5e4 kJ/mol/nm^2, 14 amu beads: omega = 85/ps, stable below dt = 2/omega = 0.024 ps)
    at dt = 0.05 ps: the bond vibrations grow by an order of magnitude per step. Checked every step, the run
    stops at a step > 0 before any coordinate turns NaN (measured: step 3), with a message naming that step,
    the beads and how far each moved (more than the 2.4 nm box width since the last report) or their force
    (above the default max_force, 1e6 kJ/mol/nm), and the last good checkpoint.

    The checkpoint (written every step, each after a passing check) reads back: Simulation.loadCheckpoint puts
    a fresh Simulation at the last good step (exactly the step the message names, one before the failing
    one), with finite positions and every force below 1e5 kJ/mol/nm; continued with dt = 0.002 ps for 100 steps
    under a HealthReporter with max_force 1e5 kJ/mol/nm, the run stays healthy (it would raise otherwise)."""
    top, system, pos = chains(bond_k=5e4)
    out = tmp_path / "md"
    with pytest.raises(EnpcgError) as err:
        run(top, system, pos, out, steps=500, timestep=0.05, report_interval=1, checkpoint_interval=1)
    msg = str(err.value)
    m = re.search(r"failed at step (\d+) of 500 \((.*)\)\. The last good checkpoint is (\S+) \(step (\d+)\)", msg)
    assert m, msg
    step, problems, chk, good = int(m.group(1)), m.group(2), m.group(3), int(m.group(4))
    assert step > 0 and good == step - 1, msg
    assert re.search(r"bead \d+ \(B\d, PE \d\) (\|F\| = [\d.e+]+ kJ/mol/nm|by [\d.e+]+ nm)", problems), msg
    assert "smaller time step than 0.05 ps" in msg
    assert chk == str(out / CHECKPOINT) and (out / CHECKPOINT).exists()
    # the trajectory so far is kept beside it: one frame per good report
    assert (out / "trajectory.partial.dcd").exists() and not (out / "trajectory.dcd").exists()

    integrator = mm.LangevinMiddleIntegrator(450 * unit.kelvin, 1 / unit.picosecond, 0.002 * unit.picosecond)
    sim = app.Simulation(top.to_openmm_topology(BOX), system, integrator, mm.Platform.getPlatformByName("Reference"))
    sim.loadCheckpoint(chk)
    assert sim.currentStep == good
    state = sim.context.getState(getPositions=True, getForces=True)
    f = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    assert np.all(np.isfinite(state.getPositions(asNumpy=True)._value))
    assert np.linalg.norm(f, axis=1).max() <= 1e5
    # Continue from the checkpoint with a stable time step, under the same health checks.
    from openmm_plugin.reporters import HealthReporter

    sim.reporters.append(HealthReporter(10, HealthLimits(max_force=1e5)))
    sim.reporters[0].check(sim, sim.context.getState(getPositions=True, getForces=True, getEnergy=True))
    sim.step(100)
    assert sim.currentStep == good + 100


def test_nan_energy_names_the_bead(tmp_path):
    """An extra force whose energy is NaN for bead 5 only (sqrt of a negative number): the run stops at step
    0 naming bead 5 and the NaN energy."""
    top, system, pos = chains()
    nan_force = mm.CustomExternalForce("sqrt(x - 100)")
    nan_force.addParticle(5, [])
    system.addForce(nan_force)
    with pytest.raises(EnpcgError, match=r"failed at step 0 of 200 \(potential energy is NaN kJ/mol; non-finite "
                                         r"forces on bead 5 \(B2, PE 1\)\)"):
        run(top, system, pos, tmp_path / "md", minimize=False)


def test_fitted_pair_range_is_the_training_minimum(tmp_path):
    """`enpcg simulate --min-distance auto` limit: fitted_pair_range of a priors model fitted on mapped data is
    the smallest non-excluded minimum-image pair distance over every training frame (brute force over all
    pairs in numpy: equal within 1e-12 nm); with the data file gone it falls back to the priors' smallest
    repulsion sigma (as stored in model.json, exactly); the limit is MIN_DISTANCE_FACTOR (0.8) x the range."""
    import json
    import warnings
    from pathlib import Path

    from enpcg.pipeline import MIN_DISTANCE_FACTOR, _health_limits, fitted_pair_range, run_fit, run_map

    rng = np.random.default_rng(0)
    n_frames, n_chains, per, box = 8, 4, 24, 2.5
    steps = rng.normal(size=(n_frames, n_chains, per, 3))
    steps *= 0.153 / np.linalg.norm(steps, axis=-1, keepdims=True)
    x = (rng.uniform(0, box, size=(n_frames, n_chains, 1, 3)) + np.cumsum(steps, axis=2)) % box
    x = x.reshape(n_frames, -1, 3)
    masses = np.array(([15.035] + [14.027] * (per - 2) + [15.035]) * n_chains)
    with H5MDWriter(tmp_path / "aa.h5", x.shape[1], masses=masses) as w:
        w.append_many(x, rng.normal(scale=50.0, size=x.shape), np.eye(3) * box, np.arange(n_frames) * 0.5,
                      np.arange(n_frames) * 250)
    pe24 = Path(__file__).parent / "data" / "pe24_4to1.yaml"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_map(mapping=pe24, input=tmp_path / "aa.h5", atom_pdb="", out=tmp_path / "cg")
        run_fit(data=tmp_path / "cg" / "cg.h5", model="priors", out=tmp_path / "priors", temperature=450.0,
                cutoff=1.0, prior="", epochs=1, batch_size=4, lr=1e-3, patience=2, device="cpu", seed=0,
                resume=False)
    top = CGTopology.load_json(tmp_path / "cg" / "cg_topology.json")
    fr = read_h5md(tmp_path / "cg" / "cg.h5")
    excluded = {tuple(p) for p in top.excluded_pairs().tolist()}
    i, j = np.triu_indices(top.n_beads, 1)
    keep = np.array([(a, b) not in excluded for a, b in zip(i, j)])
    d = fr.positions[:, j[keep]] - fr.positions[:, i[keep]]
    d -= box * np.round(d / box)
    brute = np.linalg.norm(d, axis=-1).min()

    r, source = fitted_pair_range(tmp_path / "priors", top)
    assert abs(r - brute) <= 1e-12 and "training data" in source
    limits = _health_limits(tmp_path / "priors", top, "auto", 1e5)
    assert limits.min_distance == pytest.approx(MIN_DISTANCE_FACTOR * brute, rel=1e-15)
    assert len(limits.excluded_pairs) == len(excluded)

    (tmp_path / "cg" / "cg.h5").unlink()
    sigma = min(v["sigma"] for v in json.loads((tmp_path / "priors" / "model.json").read_text())["config"]
                ["repulsion"].values())
    r, source = fitted_pair_range(tmp_path / "priors", top)
    assert r == sigma and "repulsion sigma" in source and "not there" in source
    assert _health_limits(tmp_path / "priors", top, "off", 0).min_distance is None
    with pytest.raises(EnpcgError, match="simulate.min_distance must be 'auto', 'off' or a distance"):
        _health_limits(tmp_path / "priors", top, "close", 1e5)


def test_checkpointed_runs_resume_only_their_own_settings(tmp_path, capsys):
    """run.json pairs a checkpoint with its settings. An unfinished run (here: stopped by a health check, its
    checkpoint kept) is not resumed with another time step: EnpcgError naming the setting, both values and the
    fix; resume=False starts over and finishes. A finished run is not redone: the same call returns at once
    (trajectory untouched); a call with another seed replaces it, and a finished run's files are the usual
    three (trajectory.dcd, log.csv with 20 rows, final_state.xml) beside checkpoint.chk and run.json."""
    top, system, pos = chains(bond_k=5e4)
    out = tmp_path / "md"
    kw = dict(steps=200, report_interval=10, checkpoint_interval=50)
    with pytest.raises(EnpcgError, match="failed at step"):
        run(top, system, pos, out, timestep=0.05, **kw)
    with pytest.raises(EnpcgError, match=r"unfinished run with other settings \(timestep_ps: 0\.05; this run: "
                                         r"timestep_ps: 0\.002\).*Fix: rerun with the same settings"):
        run(top, system, pos, out, timestep=0.002, **kw)
    res = run(top, system, pos, out, timestep=0.002, resume=False, **kw)
    assert res["resumed_from_step"] == 0 and res["n_frames"] == 20
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.chk", "final_state.xml", "log.csv", "run.json",
                                                     "trajectory.dcd"]
    assert len((out / "log.csv").read_text().splitlines()) == 21
    mtime = (out / "trajectory.dcd").stat().st_mtime_ns
    capsys.readouterr()
    run(top, system, pos, out, timestep=0.002, **kw)
    assert "nothing to do" in capsys.readouterr().out and (out / "trajectory.dcd").stat().st_mtime_ns == mtime
    run(top, system, pos, out, timestep=0.002, seed=2, **kw)
    assert "replacing the finished run there (changed: seed)" in capsys.readouterr().out
    assert (out / "trajectory.dcd").stat().st_mtime_ns != mtime
