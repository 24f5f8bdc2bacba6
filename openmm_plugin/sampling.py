"""Resumable Langevin sampling of an atomistic OpenMM System into an H5MD file with forces.

Units: nm, ps, kJ/mol, K. Frame i (0-based) is written at step ``(i + 1) * interval_steps`` counted from the
end of equilibration, so steps are unique and increasing across restarts.

Resume protocol: at every flush the frames go to disk first (data, then the frame counter) and the OpenMM
checkpoint is saved after (atomically). A later call with the same ``out_path`` loads the checkpoint, drops
any frame written after it (a crash between the two writes), and continues to ``n_frames``.

Crash test: ``ENPCG_KILL_AT=sample:<frames>[:mid]`` SIGKILLs the process at a checkpoint
(:mod:`enpcg.crash_test`); tests/test_crash_safety.py resumes it and compares with an uninterrupted run.
"""
from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path

import numpy as np
import openmm as mm
from openmm import app, unit

from enpcg.crash_test import maybe_kill
from enpcg.errors import EnpcgError
from enpcg.fileio import atomic_path

from .reporters import H5MDReporter

PLATFORM_ORDER = ("CUDA", "HIP", "OpenCL", "CPU", "Reference")  # fastest first


@functools.lru_cache(maxsize=None)
def _usable(name):
    """True if a Context can be made on platform ``name`` (a loaded CUDA plugin without a GPU fails here)."""
    try:
        platform = mm.Platform.getPlatformByName(name)
        system = mm.System()
        system.addParticle(1.0)
        mm.Context(system, mm.VerletIntegrator(0.001), platform)
        return True
    except Exception:
        return False


def best_platform(name=None) -> mm.Platform:
    """The named OpenMM platform, or the fastest usable one (CUDA, HIP, OpenCL, CPU, Reference)."""
    names = [mm.Platform.getPlatform(i).getName() for i in range(mm.Platform.getNumPlatforms())]
    if name is not None:
        if name not in names:
            raise EnpcgError(f"OpenMM platform {name!r} is not available; available: {names}")
        return mm.Platform.getPlatformByName(name)
    for candidate in PLATFORM_ORDER:
        if candidate in names and _usable(candidate):
            return mm.Platform.getPlatformByName(candidate)
    return mm.Platform.getPlatformByName("Reference")


def platform_properties(platform) -> dict:
    """Mixed precision on GPUs (single-precision forces, double-precision integration); defaults elsewhere."""
    if platform.getName() in ("CUDA", "HIP", "OpenCL"):
        return {"Precision": "mixed"}
    return {}


def openmm_seed(seed) -> int:
    """A reproducible non-zero OpenMM random seed from any int (OpenMM treats 0 as 'pick one at random')."""
    return int(seed) % 2_147_483_000 + 1


def _positions_nm(positions, n):
    pos = positions.value_in_unit(unit.nanometer) if unit.is_quantity(positions) else positions
    pos = np.asarray(pos, dtype=np.float64)
    if pos.shape != (n, 3):
        raise EnpcgError(f"positions must be shape ({n}, 3) in nm for this System; you supplied {pos.shape}")
    if not np.all(np.isfinite(pos)):
        raise EnpcgError("positions hold NaN or inf")
    return pos


def _box_nm(box, topology, system):
    if box is None:
        vecs = topology.getPeriodicBoxVectors() if topology is not None else None
        if vecs is None:
            vecs = system.getDefaultPeriodicBoxVectors()
        vecs = [v.value_in_unit(unit.nanometer) if unit.is_quantity(v) else v for v in
                (vecs.value_in_unit(unit.nanometer) if unit.is_quantity(vecs) else vecs)]
        box = [[v[0], v[1], v[2]] for v in vecs]
    box = np.asarray(box, dtype=np.float64)
    if box.shape != (3, 3):
        raise EnpcgError(f"box must be shape (3, 3) in nm; you supplied {box.shape}")
    return box


# Test hook: after this many checkpoints (counted in this process until it fires), raise KeyboardInterrupt (an interruption at a known
# point, as Ctrl-C would; signals from another thread can be lost inside C calls and weakref callbacks).
STOP_ENV = "ENPCG_SAMPLE_STOP_AFTER_CHECKPOINT"


def _save_checkpoint(simulation, path, index):
    """Write the OpenMM checkpoint atomically (temporary file, fsync, rename). ``index``: frames in the file
    at this checkpoint (the ``ENPCG_KILL_AT`` test hook's n, see :mod:`enpcg.crash_test`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            simulation.saveCheckpoint(fh)
            fh.flush()
            os.fsync(fh.fileno())
        maybe_kill("sample", index, "mid")  # frames flushed and counted, new checkpoint not yet in place
    maybe_kill("sample", index)  # frames and their checkpoint on disk
    stop_after = os.environ.get(STOP_ENV)
    if stop_after:
        _save_checkpoint.count = getattr(_save_checkpoint, "count", 0) + 1
        if _save_checkpoint.count >= int(stop_after):
            _save_checkpoint.count = 0
            raise KeyboardInterrupt(f"{STOP_ENV}={stop_after}: stopped after checkpoint {stop_after}")


def _stored_metadata(path):
    import h5py

    with h5py.File(path, "r") as f:
        if "parameters/enpcg/metadata" not in f:
            return {}
        raw = f["parameters/enpcg/metadata"][()]
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


def sample(system, topology, positions, out_path, *, n_frames, interval_steps, temperature=450.0,
           timestep=0.002, friction=1.0, platform=None, seed=0, equilibration_steps=0, checkpoint_path=None,
           progress=True, flush_every=10, box=None, allow_constraints=False):
    """Run Langevin MD (LangevinMiddleIntegrator) and write ``n_frames`` frames with forces to ``out_path``.

    system : openmm.System; topology : openmm.app.Topology; positions : (n, 3) nm (array or Quantity).
    n_frames : frames wanted in the file in total. interval_steps : MD steps between frames.
    temperature : K. timestep : ps. friction : 1/ps. platform : None (best), a name or an openmm.Platform.
    seed : int (velocities and thermostat). equilibration_steps : MD steps before the first frame (fresh
    start only). checkpoint_path : default ``out_path + ".chk"``. progress : tqdm bar. flush_every : frames per
    flush and checkpoint. box : (3, 3) nm, default the topology's (or the System's) box. allow_constraints :
    constraint forces are not in ``getForces``, so constrained systems are refused unless this is True.

    Resumable: if ``out_path`` holds k < n_frames frames and the checkpoint matches, it continues from frame
    k; if it holds n_frames or more it returns at once. Returns ``out_path`` as a Path.
    """
    from tqdm import tqdm

    from enpcg.h5md import n_frames as file_n_frames

    out_path = Path(out_path)
    chk = Path(checkpoint_path) if checkpoint_path is not None else out_path.with_name(out_path.name + ".chk")
    n_frames, interval_steps = int(n_frames), int(interval_steps)
    if n_frames < 1 or interval_steps < 1:
        raise EnpcgError(f"n_frames and interval_steps must be positive; you supplied {n_frames}, {interval_steps}")
    n = system.getNumParticles()
    if system.getNumConstraints() and not allow_constraints:
        raise EnpcgError(f"the System has {system.getNumConstraints()} constraints; OpenMM's getForces leaves "
                         "constraint forces out, which biases force matching. Fix: build it without constraints "
                         "(flexible bonds), or pass allow_constraints=True")
    pos0 = _positions_nm(positions, n)
    box0 = _box_nm(box, topology, system)
    metadata = {"sampler": "openmm_plugin.sampling.sample", "temperature_K": float(temperature),
                "timestep_ps": float(timestep), "friction_per_ps": float(friction),
                "interval_steps": interval_steps, "seed": int(seed),
                "equilibration_steps": int(equilibration_steps), "integrator": "LangevinMiddleIntegrator",
                "n_particles": n, "openmm_version": mm.__version__}

    k = 0
    if out_path.exists():
        k = file_n_frames(out_path)
        stored = _stored_metadata(out_path)
        for key in ("interval_steps", "timestep_ps", "temperature_K", "friction_per_ps", "n_particles"):
            if key in stored and stored[key] != metadata[key]:
                raise EnpcgError(f"{out_path}: holds frames sampled with {key}={stored[key]}, but this run asks "
                                 f"for {metadata[key]}; resuming would mix ensembles. Fix: use the same settings "
                                 "or another output path")
        if k >= n_frames:
            if progress:
                print(f"{out_path}: already holds {k} frames (>= {n_frames}); nothing to do")
            return out_path
        if k > 0 and not chk.exists():
            raise EnpcgError(f"{out_path}: holds {k} frames but the checkpoint {chk} is missing, so the run "
                             "cannot continue without a gap. Fix: pass checkpoint_path, or delete the file to "
                             "start over")
    resume = out_path.exists() and chk.exists()
    for stale in chk.parent.glob(f".{chk.name}.*.tmp*"):  # a checkpoint a killed run had not renamed yet
        stale.unlink(missing_ok=True)
    if chk.exists() and not out_path.exists():
        warnings.warn(f"{chk}: ignoring a checkpoint whose trajectory {out_path} does not exist; starting over")

    if platform is None or isinstance(platform, str):
        platform = best_platform(platform)
    metadata["platform"] = platform.getName()
    integrator = mm.LangevinMiddleIntegrator(temperature * unit.kelvin, friction / unit.picosecond,
                                             timestep * unit.picosecond)
    integrator.setRandomNumberSeed(openmm_seed(seed))
    simulation = app.Simulation(topology, system, integrator, platform, platform_properties(platform))
    reporter = H5MDReporter(out_path, interval_steps, resume=resume, flush_every=flush_every,
                            metadata=metadata,
                            on_flush=lambda sim: _save_checkpoint(sim, chk, reporter.writer.n_committed))

    if resume:
        try:
            simulation.loadCheckpoint(str(chk))
        except Exception as e:
            raise EnpcgError(f"{chk}: cannot load this checkpoint ({e}). A checkpoint only loads into the same "
                             f"System on the same platform ({platform.getName()}) and OpenMM version. Fix: rerun "
                             f"on the platform that wrote it, or delete {out_path} and {chk} to start over") from None
        writer = reporter.open(simulation)
        chk_step = simulation.currentStep
        steps = writer.committed_steps()
        keep = int(np.searchsorted(steps, chk_step, side="right"))  # frames at or before the checkpoint
        expected = (np.arange(keep) + 1) * interval_steps
        if chk_step != keep * interval_steps or not np.array_equal(steps[:keep], expected):
            reporter.close()
            raise EnpcgError(f"{chk}: checkpoint is at step {chk_step} but {out_path} holds frames at steps "
                             f"{steps[:5].tolist()}...{steps[-3:].tolist()} (interval {interval_steps}); they do "
                             f"not belong together. Fix: delete {out_path} and {chk} to start over")
        if keep < writer.n_frames:  # frames flushed after the last checkpoint: drop them, they are re-run
            writer.truncate(keep)
        k = keep
    else:
        chk.unlink(missing_ok=True)  # a stale checkpoint must never pair with the new file
        simulation.context.setPeriodicBoxVectors(*[mm.Vec3(*b) for b in box0])
        simulation.context.setPositions(pos0)
        simulation.context.setVelocitiesToTemperature(temperature * unit.kelvin, openmm_seed(seed + 1))
        reporter.open(simulation)  # creates (overwrites) the file before any checkpoint exists
        if equilibration_steps > 0:
            _step_with_bar(simulation, int(equilibration_steps), "equilibrate", progress)
        simulation.context.setTime(0.0)
        simulation.currentStep = 0
        _save_checkpoint(simulation, chk, 0)
        k = 0

    simulation.reporters.append(reporter)
    done = False
    try:
        with tqdm(total=n_frames, initial=k, desc=f"sample {out_path.name}", disable=not progress,
                  unit="frame") as bar:
            for _ in range(n_frames - k):
                simulation.step(interval_steps)
                bar.update(1)
        done = True
    finally:
        simulation.reporters.remove(reporter)
        if done:
            reporter.close(simulation)  # last flush, then the checkpoint at the last frame
        else:
            # interrupted: flushing keeps the frames, but the context may be between frames, so no checkpoint;
            # the next call drops frames newer than the last checkpoint and redoes them
            try:
                reporter.close()
            except Exception as e:  # do not hide the original error
                warnings.warn(f"{out_path}: could not flush after an interruption ({e})")
    return out_path


def _step_with_bar(simulation, n_steps, desc, progress, block=1000):
    from tqdm import tqdm

    done = 0
    with tqdm(total=n_steps, desc=desc, disable=not progress, unit="step") as bar:
        while done < n_steps:
            m = min(block, n_steps - done)
            simulation.step(m)
            done += m
            bar.update(m)
