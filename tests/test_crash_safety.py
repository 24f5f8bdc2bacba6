"""`enpcg sample`, `enpcg fit` and `enpcg simulate` survive kill -9 and resume to the uninterrupted result.

Each stage runs as a subprocess (`python -m enpcg ...`) with the test hook ENPCG_KILL_AT=<stage>:<n>[:mid]
(enpcg/crash_test.py), which SIGKILLs it right after checkpoint n is on disk, or ("mid") after the frames of
checkpoint n were appended and flushed but before the new checkpoint was renamed into place. No Python
cleanup runs. The same command then resumes it (sample and fit: in a new process armed to die at a point
that only a run starting over would reach, so a silent restart fails the test; simulate: in this process,
the CLI's `main`, which reports the step it resumed from), and the result is compared with an uninterrupted
run of the same command.

Data: a tiny united-atom polyethylene melt (12 chains x 24 sites, 0.76 g/cm^3, 0.55 nm cutoff, 2.1 nm box)
sampled on the Reference platform (float64, deterministic: the checkpoint holds the integrator's random
state, so resumed frames are bitwise those of the uninterrupted run); mapped 4:1 (72 beads) for the fits;
the CG simulation runs the Boltzmann-inverted priors (native OpenMM forces, or a TorchForce) on the
Reference platform. Torch runs one thread
here and in the subprocesses (OMP_NUM_THREADS=1), so the neural fit is bitwise reproducible on the CPU.
Units: nm, ps, kJ/mol, kJ/mol/nm.
"""
import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import torch

from enpcg.cli import main
from enpcg.crash_test import ENV
from enpcg.h5md import n_frames, read_h5md

ROOT = Path(__file__).resolve().parents[1]
PE24 = ROOT / "tests" / "data" / "pe24_4to1.yaml"
INTERVAL, FRAMES = 20, 24  # sampling: MD steps between frames, frames; checkpoints every 10 frames


def cli(*argv):
    return main([str(a) for a in argv])


def killed(argv, spec, cwd):
    """Run `python -m enpcg argv` with ENPCG_KILL_AT=spec; return the CompletedProcess."""
    env = {**os.environ, ENV: spec, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "enpcg", *[str(a) for a in argv]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The melt, an uninterrupted sampling run of it, its 4:1 mapping and a priors model."""
    from enpcg.pipeline import run_map
    from systems.polyethylene import build_melt, save_melt

    d = tmp_path_factory.mktemp("crash")
    melt = build_melt(12, 24, density=0.76, cutoff=0.55, nvt_steps=200, platform="Reference", seed=2)
    save_melt(melt, d / "melt" / "melt")
    sample = ["sample", "--reference", d / "melt", "--n-frames", FRAMES, "--interval-steps", INTERVAL,
              "--equilibration-steps", 100, "--platform", "Reference", "--seed", 1]
    assert cli(*sample, "--out", d / "ref.h5") == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_map(mapping=PE24, input=d / "ref.h5", atom_pdb="", out=d / "cg")
    assert cli("fit", "--model", "priors", "--data", d / "cg" / "cg.h5", "--out", d / "priors") == 0
    return {"dir": d, "sample": sample}


@pytest.mark.parametrize("spec,on_disk", [("sample:10", 10), ("sample:20:mid", 20)])
def test_sample_resumes_bitwise_after_kill_9(world, spec, on_disk):
    """kill -9 after the checkpoint at frame 10 ("sample:10"), or after frames 11-20 were flushed and counted
    but before their checkpoint was renamed into place ("sample:20:mid"): the process dies by SIGKILL
    (returncode -9); the file's frame counter shows exactly the flushed frames (10, or 20), every counted frame
    reads back; the resolved config (written on success) is absent. Rerunning the command resumes from the
    checkpoint (frame 10 both times: the mid case drops frames 11-20 and redoes them, and removes the checkpoint
left under its temporary name) and the file equals the
    uninterrupted run bitwise (positions, forces, box, energies, times) with steps 20, 40, ..., 480: no gap, no
    duplicate."""
    d = world["dir"]
    out = d / f"sample_{spec.replace(':', '_')}.h5"
    proc = killed([*world["sample"], "--out", out], spec, ROOT)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert n_frames(out) == on_disk
    seen = read_h5md(out)
    assert np.array_equal(seen.step, INTERVAL * np.arange(1, on_disk + 1))
    assert not out.with_name(out.stem + ".sample.yaml").exists()
    assert len(list(d.glob(f".{out.name}.chk.*.tmp.chk"))) == (1 if spec.endswith(":mid") else 0)

    # Resume in a new process, armed to die at checkpoint 0, which only a run that starts over writes.
    proc = killed([*world["sample"], "--out", out], "sample:0", ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.name for p in d.glob(f".{out.name}.chk.*")] == []  # a checkpoint left unrenamed is removed
    ref, got = read_h5md(d / "ref.h5"), read_h5md(out)
    assert np.array_equal(got.step, INTERVAL * np.arange(1, FRAMES + 1))
    for name in ("positions", "forces", "box", "potential_energy", "time"):
        assert np.array_equal(getattr(got, name), getattr(ref, name)), name


def test_neural_fit_resumes_bitwise_after_kill_9(world):
    """`enpcg fit --model neural` (4 epochs on the CPU, on the fitted priors) killed -9 right after the
    checkpoint of epoch 2: returncode -9, training/checkpoint.pt holds epoch 2 and no model.json exists yet.
    Rerun (resume is the default), it continues at epoch 3 (it never passes epoch 1 again) and saves a model
    whose every weight equals the uninterrupted fit's bitwise (torch.equal, tolerance 0); the history lists
    epochs 1-4 once each, with identical validation RMSEs. (MS-CG spline and priors fits are one-shot: no
    checkpoints, nothing written until the model, atomically, so a killed one is simply rerun.)"""
    d = world["dir"]
    fit = ["fit", "--model", "neural", "--data", d / "cg" / "cg.h5", "--epochs", 4, "--batch-size", 4,
           "--cutoff", 0.7, "--device", "cpu", "--seed", 0, "--prior", d / "priors"]
    assert cli(*fit, "--out", d / "fit_ref") == 0
    out = d / "fit_killed"
    proc = killed([*fit, "--out", out], "fit:2", ROOT)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert torch.load(out / "training" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert not (out / "model.json").exists()

    # Resume in a new process, armed to die after epoch 1, which only a fit that starts over reaches.
    proc = killed([*fit, "--out", out], "fit:1", ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = torch.load(d / "fit_ref" / "model.pt", weights_only=True)
    got = torch.load(out / "model.pt", weights_only=True)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    h_ref = json.loads((d / "fit_ref" / "training" / "history.json").read_text())
    h_got = json.loads((out / "training" / "history.json").read_text())
    assert h_got["epoch"] == [1, 2, 3, 4] and h_got["val_rmse"] == h_ref["val_rmse"]


def _dcd_frames(path):
    """(frame count in the header, xyz (F, n, 3) float32 angstrom) of an OpenMM DCD with a unit cell."""
    raw = Path(path).read_bytes()
    count = struct.unpack("<i", raw[8:12])[0]
    comments = struct.unpack("<i", raw[92:96])[0]
    n = struct.unpack("<i", raw[104 + comments:108 + comments])[0]
    header, frame = 112 + comments, 56 + 3 * (8 + 4 * n)
    assert len(raw) == header + count * frame, "the DCD holds a partial frame or more frames than its header says"
    xyz = np.empty((count, n, 3), dtype=np.float32)
    for f in range(count):
        at = header + f * frame + 56
        for k in range(3):
            xyz[f, :, k] = np.frombuffer(raw, dtype="<f4", count=n, offset=at + 4 + k * (8 + 4 * n))
    return count, xyz


def _log_rows(path):
    """Rows of log.csv without the wall-clock speed column (the last one), as the exact strings written."""
    lines = Path(path).read_text().splitlines()
    assert lines[0].startswith("#") and lines[0].endswith('"Speed (ns/day)"')
    return [line.rsplit(",", 1)[0] for line in lines[1:]]


@pytest.mark.parametrize("backend,spec,frames_on_disk,checkpoint_step", [
    ("native", "simulate:12", 12, 60), ("native", "simulate:20:mid", 20, 80), ("torch", "simulate:12", 12, 60)])
def test_simulate_resumes_bitwise_after_kill_9(world, backend, spec, frames_on_disk, checkpoint_step):
    """`enpcg simulate` (priors as native OpenMM forces, or as a TorchForce; Reference platform; 200 steps of
    5 fs, a frame every 5 steps, a checkpoint every 20) killed -9 after the checkpoint at frame 12 (step 60), or
    after frames 17-20 were written but before the checkpoint of frame 20 was renamed (its last good
    checkpoint: step 80). The resumed process must recognise the run as its own (run.json: settings, System
    hash, model files' sha256, starting structure), for a TorchForce too. Only the
    growing trajectory.partial.dcd / log.partial.csv, checkpoint.chk and run.json exist; no trajectory.dcd,
    log.csv or final_state.xml. Rerun, it cuts the partial files back to the checkpoint, continues, and ends
    with a DCD equal to the uninterrupted run's bitwise (float32 coordinates and unit cell; header count 40 and
    no trailing bytes), the same log rows character for character (step, time, energies, temperature; the
    wall-clock speed column aside) with steps 5, 10, ..., 200: no gap, no duplicate. A third call returns at
    once ("nothing to do") and leaves the files alone."""
    import openmm as mm
    from openmm import app

    d = world["dir"]
    sim = ["simulate", "--model", d / "priors", "--backend", backend, "--pdb", d / "cg" / "cg.pdb",
           "--time-ps", 1.0, "--timestep", 0.005, "--report-ps", 0.025, "--checkpoint-ps", 0.1,
           "--platform", "Reference", "--seed", 3]
    ref = d / f"sim_ref_{backend}"
    if not (ref / "run.json").exists():
        assert cli(*sim, "--out", ref) == 0
    out = d / f"sim_{backend}_{spec.replace(':', '_')}"
    proc = killed([*sim, "--out", out], spec, ROOT)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "checkpoint.chk", "log.partial.csv", "run.json", "trajectory.partial.dcd"]
    # "mid": the new checkpoint was complete under its temporary name, never renamed (no cleanup ran)
    assert len(list(out.glob(".checkpoint.chk.*.tmp.chk"))) == (1 if spec.endswith(":mid") else 0)
    assert _dcd_frames(out / "trajectory.partial.dcd")[0] == frames_on_disk
    assert len(_log_rows(out / "log.partial.csv")) == frames_on_disk
    # the checkpoint the kill left behind is readable on its own: an OpenMM Simulation loads it
    from openmm_plugin.system import CGPotential

    pot = CGPotential(d / "priors")
    pdb = app.PDBFile(str(d / "cg" / "cg.pdb"))
    system = pot.create_system(pot.topology, box=np.array(pdb.topology.getPeriodicBoxVectors()._value),
                               backend=backend)
    probe = app.Simulation(pdb.topology, system, mm.LangevinMiddleIntegrator(450, 1, 0.005),
                           mm.Platform.getPlatformByName("Reference"))
    probe.loadCheckpoint(str(out / "checkpoint.chk"))
    assert probe.currentStep == checkpoint_step

    assert cli(*sim, "--out", out) == 0
    assert json.loads((out / "run.json").read_text())["result"]["resumed_from_step"] == checkpoint_step
    n_ref, xyz_ref = _dcd_frames(ref / "trajectory.dcd")
    n_got, xyz_got = _dcd_frames(out / "trajectory.dcd")
    assert n_ref == n_got == 40 and np.array_equal(xyz_got, xyz_ref)
    raw_ref, raw_got = (ref / "trajectory.dcd").read_bytes(), (out / "trajectory.dcd").read_bytes()
    header = 112 + struct.unpack("<i", raw_ref[92:96])[0]
    assert raw_got[header:] == raw_ref[header:]  # frames and unit cells, byte for byte
    rows_ref, rows_got = _log_rows(ref / "log.csv"), _log_rows(out / "log.csv")
    assert rows_got == rows_ref
    steps = np.array([int(r.split(",")[0]) for r in rows_got])
    assert np.array_equal(steps, 5 * np.arange(1, 41))
    assert not (out / "trajectory.partial.dcd").exists() and (out / "final_state.xml").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # the stale temporary is gone

    mtime = (out / "trajectory.dcd").stat().st_mtime_ns
    assert cli(*sim, "--out", out) == 0
    assert (out / "trajectory.dcd").stat().st_mtime_ns == mtime
