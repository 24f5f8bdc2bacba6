"""A CG run whose fixed-capacity cell list overflows restarts by itself with larger capacities.

`run_simulation(..., cell_lists=CGPotential.cell_lists(...))` (and `enpcg simulate`): when a run stops with a
NaN energy, the eager model with the same capacities tells whether the cell list overflowed; if it did, the
System is rebuilt with larger capacities and the run goes on from its last checkpoint (outputs cut back to
it), the capacities recorded in run.json; any other failure stops the run as before.

System: 12 chains of 5 beads (50 amu; `random_chains`, 60 beads) in a 2.7 nm cubic box, a priors model
(harmonic bonds and angles, r^-12 repulsion with sigma 0.35 nm cut at 0.85 nm: 3 x 3 x 3 cells) exported as a
TorchForce whose pairs come from the fixed-capacity cell list (a "cells" pair list in its config). Langevin
dynamics at 450 K, dt 5 fs, Reference platform: float64 and deterministic (a checkpoint holds the random
state), so runs are compared bitwise. The start holds at most 7 beads per cell and needs 5 pair slots per bead
(max_neighbors 8 derived); with cell_capacity 7 a crowded cell overflows after ~190 steps (measured: steps
188-245 hold 8 or more beads in one cell), with 14 never within 300 steps. Before an overflow both capacities
give the same pairs in the same order, so the same trajectory bit for bit. Units: nm, ps, K, kJ/mol.
"""
import contextlib
import functools
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import openmm
import pytest
from openmm import unit

import torch  # noqa: F401  (before openmm plugins: openmm-torch kernels need libtorch loaded)

from enpcg.errors import EnpcgError
from enpcg.models import create_model
from openmm_plugin.simulate import CHECKPOINT, RUN_JSON, _dcd_layout, run_simulation
from openmm_plugin.system import CGPotential

sys.path.insert(0, str(Path(__file__).parent))
from known_answer import random_chains  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BOX = np.eye(3) * 2.7
RC = 0.85
STEPS = 300
RUN = dict(steps=STEPS, timestep=0.005, temperature=450.0, report_interval=10, checkpoint_interval=50,
           platform="Reference", seed=1, progress=False, minimize=False)


@functools.lru_cache(maxsize=None)
def melt():
    return random_chains(n_chains=12, box=BOX, seed=3)


def priors(**capacities):
    top, _ = melt()
    return create_model("priors", top, periodic=True, cutoff=RC,
                        pair_list={"method": "cells", "box": BOX.tolist(), **capacities},
                        bonds={"A-B": {"k": 2000.0, "r0": 0.4}},
                        angles={"A-B-A": {"k": 20.0, "theta0": 2.0}, "B-A-B": {"k": 20.0, "theta0": 2.0}},
                        dihedrals={"A-B-A-B": {"k": [0.0, 0.0, 0.0], "delta": [0.0, 0.0, 0.0]}},
                        repulsion={k: {"epsilon": 1.0, "sigma": 0.35} for k in top.pair_type_names()}).double()


def simulate(out, capacities, extra_force=None, cells=True, **kw):
    """run_simulation of the melt with the cell list's ``capacities``; returns (result, printed text)."""
    top, pos = melt()
    pot = CGPotential(priors(**capacities))
    system = pot.create_system(top, box=BOX)
    if extra_force is not None:
        system.addForce(extra_force)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = run_simulation(system, top.to_openmm_topology(BOX), pos, BOX, out,
                             cell_lists=pot.cell_lists(top, box=BOX) if cells else None, **{**RUN, **kw})
    return res, buf.getvalue()


def frames(path):
    """The DCD's frames as raw bytes (the header holds a creation date)."""
    header, size = _dcd_layout(path)
    data = Path(path).read_bytes()[header:]
    assert len(data) % size == 0
    return [data[k:k + size] for k in range(0, len(data), size)]


def log_rows(path):
    """Log rows without the speed column (wall-clock)."""
    return [line.split(",")[:5] for line in Path(path).read_text().splitlines()[1:]]


def final_state(path):
    state = openmm.XmlSerializer.deserialize(Path(path).read_text())
    return (state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
            state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond))


def assert_same_run(res, ref):
    """Bitwise the same trajectory (every DCD frame), log (step, time, energies) and final state."""
    got, want = frames(res["trajectory"]), frames(ref["trajectory"])
    assert len(got) == len(want) == STEPS // RUN["report_interval"]
    assert got == want
    assert log_rows(res["log"]) == log_rows(ref["log"])
    for a, b in zip(final_state(res["final_state"]), final_state(ref["final_state"])):
        assert np.array_equal(a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """cell_capacity 14 from the start: never overflows in these 300 steps."""
    res, out = simulate(tmp_path_factory.mktemp("ref"), {"cell_capacity": 14})
    assert res["cell_list_restarts"] == [] and "overflowed" not in out
    assert res["cell_lists"] == [{"cell_capacity": 14, "max_neighbors": 8}]
    return res


def test_overflow_restarts_from_the_last_checkpoint_with_doubled_capacity(tmp_path, reference):
    """cell_capacity 7: the overflow stops the run at a report (measured: step 190, the eager model overflows on
    that very state); the runner doubles cell_capacity to 14 (max_neighbors stays 8), cuts the outputs back to
    the last checkpoint (step 150: frames 16-18 redone) and restarts from it. The finished run equals the run
    with cell_capacity 14 from the start bit for bit (30 DCD frames, log, final positions and velocities), so
    it equals a run with the sufficient capacity from that checkpoint too; run.json records the capacities."""
    res, out = simulate(tmp_path / "md", {"cell_capacity": 7})
    (r,) = res["cell_list_restarts"]
    assert r["before"] == [{"cell_capacity": 7, "max_neighbors": 8}]
    assert r["after"] == res["cell_lists"] == [{"cell_capacity": 14, "max_neighbors": 8}]
    assert r["step"] % 10 == 0 and r["restart_step"] == (r["step"] - 1) // 50 * 50 > 0, r
    assert (f"overflowed by step {r['step']}" in out and "cell_capacity 7 -> 14" in out
            and f"restarting from step {r['restart_step']}" in out), out
    assert_same_run(res, reference)
    stored = json.loads((tmp_path / "md" / RUN_JSON).read_text())
    assert stored["complete"] and stored["cell_lists"] == r["after"] and stored["cell_list_restarts"] == [r]


def test_transient_overflow_is_found_by_replaying_from_the_checkpoint(tmp_path, reference):
    """Reports that straddle the crowding (the first report after it is past): the failing state no longer
    overflows, but the NaN energy is the cell list's sticky flag (the same state gives a finite energy in a new
    Context), so the steps since the last checkpoint are replayed and the first NaN state is the one that
    overflows. The report interval is chosen from the overflow window measured here (step by step, eager
    check with cell_capacity 7 along the cell_capacity-14 trajectory; measured: window 188-245, interval 62,
    failure at step 248, restart from 186). The result again equals the reference bit for bit."""
    top, pos = melt()
    small = CGPotential(priors(cell_capacity=7)).cell_lists(top, box=BOX)
    from openmm_plugin.integrators import langevin_integrator
    from openmm_plugin.sampling import openmm_seed

    system = CGPotential(priors(cell_capacity=14)).create_system(top, box=BOX)
    integrator = langevin_integrator(RUN["temperature"], 1.0, RUN["timestep"], n_particles=len(pos))
    integrator.setRandomNumberSeed(openmm_seed(RUN["seed"]))
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    ctx.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in BOX])
    ctx.setPositions(pos)
    ctx.setVelocitiesToTemperature(RUN["temperature"] * unit.kelvin, openmm_seed(RUN["seed"]))
    flags = []
    for _ in range(STEPS):
        flags.append(small.overflowed(ctx.getState(getPositions=True).getPositions(asNumpy=True)._value, BOX))
        integrator.step(1)
    a = flags.index(True)
    b = a + flags[a:].index(False)
    interval = next((r for r in range(2, STEPS) if (a + r - 1) // r * r >= b and (a + r - 1) // r * r < STEPS
                     and not flags[(a + r - 1) // r * r] and (a + r - 1) // r >= 2), None)
    assert interval is not None, f"no report interval straddles the overflow window {a}-{b}"
    fail = (a + interval - 1) // interval * interval

    res, out = simulate(tmp_path / "md", {"cell_capacity": 7}, report_interval=interval, checkpoint_interval=interval)
    (r,) = res["cell_list_restarts"]
    assert r["step"] == fail and r["restart_step"] == fail - interval, (r, a, b, interval)
    assert r["after"] == [{"cell_capacity": 14, "max_neighbors": 8}]
    for x, y in zip(final_state(res["final_state"]), final_state(reference["final_state"])):
        assert np.array_equal(x, y)
    print(f"overflow window {a}-{b}, report interval {interval}, failure at {fail}, restart from {fail - interval}")


def test_run_without_checkpoints_starts_over(tmp_path, reference):
    """Without checkpoints the restart is from the start (the failed attempt's temporary outputs are dropped);
    the outputs equal the reference bit for bit."""
    res, out = simulate(tmp_path / "md", {"cell_capacity": 7}, checkpoint_interval=None)
    (r,) = res["cell_list_restarts"]
    assert r["restart_step"] == 0 and r["after"] == [{"cell_capacity": 14, "max_neighbors": 8}]
    assert "restarting from step 0" in out
    assert_same_run(res, reference)
    assert sorted(p.name for p in (tmp_path / "md").iterdir()) == ["final_state.xml", "log.csv", "trajectory.dcd"]


def test_enpcg_simulate_restarts_and_resumes_with_recorded_capacities(tmp_path):
    """`enpcg simulate` of a model saved with max_neighbors 4 (pair slots per bead; the start needs 5, so the
    energy is NaN at step 0): the eager model finds the overflow on that state, max_neighbors is doubled
    (4 -> 8; cell_capacity stays 15) and the run starts over. Killed (SIGKILL, ENPCG_KILL_AT=simulate:20) after the
    checkpoint at step 200 and rerun, it resumes there with the capacities recorded in run.json (no second
    restart) and ends bitwise equal to the uninterrupted command."""
    from enpcg.cli import main
    from enpcg.crash_test import ENV
    from enpcg.models import save_model

    top, pos = melt()
    save_model(priors(max_neighbors=4), tmp_path / "model")
    top.write_pdb(tmp_path / "cg.pdb", pos, BOX)
    argv = ["simulate", "--model", tmp_path / "model", "--pdb", tmp_path / "cg.pdb", "--time-ps", 1.5,
            "--timestep", 0.005, "--report-ps", 0.05, "--checkpoint-ps", 0.25, "--platform", "Reference",
            "--seed", 1, "--min-distance", "off"]
    argv = [str(a) for a in argv]
    env = {**os.environ, ENV: "simulate:20", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run([sys.executable, "-m", "enpcg", *argv, "--out", str(tmp_path / "sim")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "max_neighbors 4 -> 8" in killed.stdout and "restarting from step 0" in killed.stdout, killed.stdout
    stored = json.loads((tmp_path / "sim" / RUN_JSON).read_text())
    assert not stored["complete"] and stored["cell_lists"] == [{"cell_capacity": 15, "max_neighbors": 8}]

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv + ["--out", str(tmp_path / "sim")]) == 0
        assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    out = buf.getvalue()
    assert "resuming with the cell-list capacities recorded in run.json (cell list 0: cell_capacity 15 -> 15, " \
           "max_neighbors 4 -> 8)" in out, out
    assert "resumed_from_step: 200" in out
    stored = json.loads((tmp_path / "sim" / RUN_JSON).read_text())
    assert stored["complete"] and len(stored["cell_list_restarts"]) == 1
    assert stored["cell_list_restarts"] == json.loads((tmp_path / "whole" / RUN_JSON).read_text())[
        "cell_list_restarts"]
    assert frames(tmp_path / "sim" / "trajectory.dcd") == frames(tmp_path / "whole" / "trajectory.dcd")
    for a, b in zip(final_state(tmp_path / "sim" / "final_state.xml"),
                    final_state(tmp_path / "whole" / "final_state.xml")):
        assert np.array_equal(a, b)


def test_nan_that_is_not_an_overflow_fails_as_before(tmp_path):
    """A NaN energy the structure itself gives (an extra force sqrt(x - 100) on bead 5 at the start; or
    1e-6 sqrt(0.05^2 - (x - x0)^2), NaN once bead 5 has moved 0.05 nm along x, mid-run) is not a cell-list
    overflow: the run stops with exactly the message of a run without cell_lists (step, beads, last good
    checkpoint), no restart, run.json's capacities unchanged."""
    start_nan = openmm.CustomExternalForce("sqrt(x - 100)")
    start_nan.addParticle(5, [])
    with pytest.raises(EnpcgError, match=r"failed at step 0 of 300 \(potential energy is NaN kJ/mol; non-finite "
                                         r"forces on bead 5 \(A1, CG 1\)\)\. The starting state failed"):
        simulate(tmp_path / "start", {"cell_capacity": 14}, extra_force=start_nan)

    _, pos = melt()
    messages = []
    for cells in (True, False):
        mid_nan = openmm.CustomExternalForce("1e-6*sqrt(0.0025 - (x - x0)^2)")
        mid_nan.addPerParticleParameter("x0")
        mid_nan.addParticle(5, [float(pos[5, 0])])
        buf = io.StringIO()
        with pytest.raises(EnpcgError) as err, contextlib.redirect_stdout(buf):
            simulate(tmp_path / "mid", {"cell_capacity": 14}, extra_force=mid_nan, cells=cells, resume=False)
        messages.append(str(err.value))
        assert "overflow" not in buf.getvalue()
        if cells:
            stored = json.loads((tmp_path / "mid" / RUN_JSON).read_text())
            assert stored["cell_list_restarts"] == [] and stored["cell_lists"] == [
                {"cell_capacity": 14, "max_neighbors": 8}]
    assert messages[0] == messages[1]
    assert "potential energy is NaN" in messages[0] or "non-finite" in messages[0], messages[0]
    assert f"The last good checkpoint is {tmp_path / 'mid' / CHECKPOINT}" in messages[0], messages[0]
    print(messages[0][:200])
