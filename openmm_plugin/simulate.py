"""Run a CG (or any) OpenMM System with Langevin dynamics: DCD trajectory, CSV log, progress, final state.

Units: nm, ps, K, kJ/mol. Outputs in ``out_dir``:

* ``trajectory.dcd``: positions every ``report_interval`` steps (with the unit cell when there is a box);
* ``log.csv``: OpenMM's StateDataReporter columns step, time (ps), potential energy (kJ/mol), kinetic energy
  (kJ/mol), temperature (K), speed (ns/day), comma-separated, header line starting with ``#``;
* ``final_state.xml``: the final OpenMM State (positions, velocities, box).

Health checks (:class:`openmm_plugin.reporters.HealthReporter`) run at every report, before the frame is
written: a NaN energy, a force above a limit, a bead that moved more than a box width since the last report,
or (with a limit) a non-bonded bead pair closer than the model's fitted range stops the run with an
EnpcgError naming the step and the beads. The starting state is checked for NaN and overlapping beads.

Without checkpoints (``checkpoint_interval=None``) each output is written under a temporary name beside its
target and renamed only when the run has finished, so an interrupted run leaves no file that looks complete.

With checkpoints (``enpcg simulate`` always uses them) the run survives a ``kill -9``:

* ``trajectory.partial.dcd`` and ``log.partial.csv`` grow by one frame and one row per report (each flushed);
* ``checkpoint.chk`` (OpenMM ``Simulation.saveCheckpoint``: positions, velocities, step, time and the
  integrator's random state) is replaced atomically every ``checkpoint_interval`` steps, after the frames and
  rows it covers are flushed and fsync'ed, so it never describes frames that are not on disk;
* ``run.json`` holds the settings and starting structure (sha256) the checkpoint belongs to, and marks the
  run complete at the end.

A call with ``resume=True`` that finds an unfinished run of the same settings loads the checkpoint, cuts the
partial DCD and log back to the frames the checkpoint covers (frames written after it, or half-written by the
killed process, are redone), and continues: on the Reference and CPU platforms the result is bitwise the
uninterrupted run (the checkpoint holds the random state). At the end ``final_state.xml`` is written, the
partial files are renamed to ``trajectory.dcd`` and ``log.csv``, and ``run.json`` is marked complete; a later
call with the same settings returns at once. After a failed health check the last good checkpoint is kept
(``Simulation.loadCheckpoint`` reads it back). Test hook: ``ENPCG_KILL_AT=simulate:<frames>[:mid]``
(:mod:`enpcg.crash_test`).

Cell-list overflow (``cell_lists=``, a :class:`openmm_plugin.system.CellLists`; ``enpcg simulate`` passes it
for every model whose TorchForce finds pairs with the fixed-capacity cell list). An overflowing cell list sets
a flag on the device that turns the energy into NaN (no host synchronisation inside a step, so CUDA graphs
keep working), and the next report's health check stops the run. The runner then decides whether the cause was
an overflow: the eager model with the same capacities is evaluated on the failed structure; if that fits, the
same structure in a new Context (flag clear) tells whether the NaN was the sticky flag of an earlier overflow,
which replaying the steps since the last checkpoint locates. After an overflow the capacity that was exceeded
(beads per cell, partners per bead) is doubled until that structure fits (every capacity is doubled when the
structure is not at hand, e.g. one the minimiser passed through), the System is rebuilt with them, and the run
goes on from the last checkpoint (outputs cut back to it, as on resume) or, before the first one, from the
start; the message names the step and the capacities before and after. ``run.json`` records the capacities
(``cell_lists``) and each restart (``cell_list_restarts``), and a resumed run starts with them. A starting
structure that overflows them is fitted before minimisation. Any other failure stops the run as above.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch  # noqa: F401  (before openmm: OpenMM's plugin loader needs libtorch for openmm-torch kernels)
import openmm
from openmm import app, unit

from enpcg.crash_test import maybe_kill
from enpcg.errors import EnpcgError
from enpcg.fileio import atomic_path, write_json

from .sampling import best_platform, openmm_seed, platform_properties
from .integrators import attach, langevin_integrator
from .reporters import HEALTH_FIX, HealthLimits, HealthReporter, SimulationHealthError


class _ProgressReporter:
    """OpenMM reporter that advances a tqdm bar every ``interval`` steps (asks OpenMM for no state data)."""

    def __init__(self, total_steps: int, interval: int, enabled: bool):
        from tqdm.auto import tqdm

        self._interval = max(1, int(interval))
        self._bar = tqdm(total=int(total_steps), unit="step", desc="CG MD", disable=not enabled,
                         dynamic_ncols=True)
        self._last = 0

    def describeNextReport(self, simulation):  # OpenMM reporter protocol (camelCase)
        steps = self._interval - simulation.currentStep % self._interval
        return {"steps": steps, "periodic": None, "include": []}

    def report(self, simulation, state):
        self._bar.update(simulation.currentStep - self._last)
        self._last = simulation.currentStep

    def start(self, step: int):
        """Count from ``step`` (the simulation's current step when dynamics starts)."""
        self._last = step

    def close(self):
        self._bar.close()


def _positions_nm(positions, n: int) -> np.ndarray:
    pos = positions.value_in_unit(unit.nanometer) if unit.is_quantity(positions) else positions
    pos = np.asarray(pos, dtype=np.float64)
    if pos.shape != (n, 3):
        raise EnpcgError(f"positions must be shape ({n}, 3) in nm for this System; you supplied {pos.shape}")
    if not np.all(np.isfinite(pos)):
        raise EnpcgError("positions contain NaN or infinite values")
    return pos


def _box_nm(box) -> Optional[np.ndarray]:
    if box is None:
        return None
    b = box.value_in_unit(unit.nanometer) if unit.is_quantity(box) else box
    b = np.asarray(b, dtype=np.float64)  # Vec3 is a tuple: a list of three reads as (3, 3)
    if b.shape != (3, 3):
        raise EnpcgError(f"box must be shape (3, 3) (box vectors as rows, nm); you supplied {b.shape}")
    return b


def _platform(platform, precision):
    """The OpenMM Platform and its properties; ``precision`` ("single"/"mixed"/"double") where supported."""
    if isinstance(platform, openmm.Platform):
        plat = platform
    else:
        plat = best_platform(platform)
    props = dict(platform_properties(plat))
    if precision is not None:
        allowed = ("single", "mixed", "double")
        if precision not in allowed:
            raise EnpcgError(f"precision must be one of {allowed} or None; you supplied {precision!r}")
        if "Precision" in plat.getPropertyNames():
            props["Precision"] = precision
        else:
            # Reference computes in double; CPU in single precision with double-precision accumulation.
            fixed = ("double",) if plat.getName() == "Reference" else ("mixed", "single")
            if precision not in fixed:
                warnings.warn(f"platform {plat.getName()} has no precision setting (it computes in {fixed[0]} "
                              f"precision); precision={precision!r} is ignored", stacklevel=3)
    return plat, props


def _add_mapped_time(path, time_scale):
    """Append the column "Mapped time (ps)" = time_scale x "Time (ps)" to an OpenMM CSV log."""
    lines = Path(path).read_text().splitlines()
    header = lines[0].split(",")
    col = next(i for i, h in enumerate(header) if h.strip('#"') == "Time (ps)")
    out = [lines[0] + ',"Mapped time (ps)"']
    out += [f"{line},{time_scale * float(line.split(',')[col]):.6g}" for line in lines[1:] if line]
    Path(path).write_text("\n".join(out) + "\n")


CHECKPOINT = "checkpoint.chk"
RUN_JSON = "run.json"
PARTIAL = {"trajectory": "trajectory.partial.dcd", "log": "log.partial.csv"}


class _Outputs:
    """One OpenMM reporter for every output, so that their order within a report is fixed: the health check
    first (a failing state is never written), then the DCD frame and the log line (each flushed by OpenMM's
    writers), then, every ``checkpoint_interval`` steps, the checkpoint (after the frame and line are on disk).
    """

    def __init__(self, interval, health, dcd, log, wrap, checkpoint=None, checkpoint_interval=None, frames=0):
        self._interval = int(interval)
        self.health, self.dcd, self.log, self._wrap = health, dcd, log, bool(wrap)
        self._checkpoint, self._checkpoint_interval = checkpoint, checkpoint_interval
        self.frames = int(frames)  # frames in the trajectory so far (resumed runs start at the checkpoint's)

    def describeNextReport(self, simulation):  # OpenMM reporter protocol (camelCase)
        steps = self._interval - simulation.currentStep % self._interval
        return {"steps": steps, "periodic": False, "include": ["positions", "forces", "energy"]}

    def report(self, simulation, state):
        self.health.check(simulation, state)
        # The DCD keeps what OpenMM's DCDReporter writes by default: molecules wrapped into the box.
        frame = simulation.context.getState(getPositions=True, enforcePeriodicBox=True) if self._wrap else state
        self.dcd.report(simulation, frame)
        self.log.report(simulation, state)
        self.frames += 1
        if self._checkpoint is not None and simulation.currentStep % self._checkpoint_interval == 0:
            self._checkpoint(simulation, self.frames)


def _sync(fh):
    fh.flush()
    os.fsync(fh.fileno())


def _save_checkpoint(simulation, path, index, files=()):
    """Flush and fsync the growing outputs, then write the OpenMM checkpoint atomically (temporary file,
    fsync, rename): the checkpoint never describes frames that are not on disk. ``index``: frames in the
    trajectory (the ``ENPCG_KILL_AT=simulate:<n>`` test hook, :mod:`enpcg.crash_test`)."""
    for fh in files:
        _sync(fh)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            simulation.saveCheckpoint(fh)
            _sync(fh)
        maybe_kill("simulate", index, "mid")  # frames appended, new checkpoint not yet renamed into place
    maybe_kill("simulate", index)  # frames and their checkpoint on disk


def _dcd_layout(path):
    """(header bytes, bytes per frame) of a DCD written by OpenMM's DCDFile (CHARMM layout, little-endian)."""
    with open(path, "rb") as fh:
        head = fh.read(96)
        if len(head) < 96 or head[4:8] != b"CORD" or struct.unpack("<i", head[:4])[0] != 84:
            raise EnpcgError(f"{path}: not a DCD file written by OpenMM (bad header); cannot resume. Fix: rerun "
                             "with resume off (--resume false) to start over")
        has_box = struct.unpack("<i", head[48:52])[0] != 0
        comments = struct.unpack("<i", head[92:96])[0]
        fh.seek(104 + comments)
        n_atoms = struct.unpack("<i", fh.read(4))[0]
    return 112 + comments, (56 if has_box else 0) + 3 * (8 + 4 * n_atoms)


def _truncate_dcd(path, n_frames, interval):
    """Cut a growing DCD back to its first ``n_frames`` frames (frames written after the last checkpoint, or
    half-written by a killed process) and set the header's frame count and last step to match."""
    header, frame = _dcd_layout(path)
    size = os.path.getsize(path)
    if size < header + n_frames * frame:
        raise EnpcgError(f"{path}: holds {(size - header) // frame} complete frames but the checkpoint is at frame "
                         f"{n_frames}; the file was damaged. Fix: rerun with resume off (--resume false)")
    with open(path, "r+b") as fh:
        fh.truncate(header + n_frames * frame)
        fh.seek(8)
        fh.write(struct.pack("<i", n_frames))
        fh.seek(20)  # DCDFile's first step is the report interval; this field is the last frame's step
        fh.write(struct.pack("<i", n_frames * interval if n_frames else 0))
        _sync(fh)


def _truncate_log(path, n_rows):
    """Keep the header line and the first ``n_rows`` complete rows of a growing CSV log."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    complete = lines[:-1]  # the last piece has no newline: empty, or a row cut short by a kill
    if not complete or not complete[0].startswith(b"#") or len(complete) - 1 < n_rows:
        raise EnpcgError(f"{path}: holds {max(len(complete) - 1, 0)} complete rows but the checkpoint is at row "
                         f"{n_rows}; the file was damaged. Fix: rerun with resume off (--resume false)")
    with open(path, "r+b") as fh:
        fh.truncate(sum(len(line) + 1 for line in complete[: n_rows + 1]))
        _sync(fh)


def _start_state(simulation, pos, box, minimize, temperature, seed):
    if box is not None:
        simulation.context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
    simulation.context.setPositions(pos)
    if minimize:
        simulation.minimizeEnergy(maxIterations=1000)
    simulation.context.setVelocitiesToTemperature(temperature * unit.kelvin, openmm_seed(seed))


def _check_now(simulation, health):
    """Health check of the current state (the start, or a resumed checkpoint); sets the displacement baseline."""
    state = simulation.context.getState(getPositions=True, getForces=True, getEnergy=True,
                                        enforcePeriodicBox=False)
    health.check(simulation, state, start=True)


def _failure(e, simulation, steps, timestep, checkpoint_note=""):
    """EnpcgError for a failed run: the step, the beads and the fix (``e``: SimulationHealthError, or the
    exception OpenMM raised on NaN coordinates)."""
    step = simulation.currentStep
    if isinstance(e, SimulationHealthError):
        what = "; ".join(e.problems)
        step = e.step
    else:  # OpenMM stopped inside a step: name the beads whose coordinates are no longer finite
        what = str(e)
        try:
            pos = simulation.context.getState(getPositions=True).getPositions(asNumpy=True)._value
            bad = np.flatnonzero(~np.isfinite(np.asarray(pos)).all(axis=1))
            if bad.size:
                atoms = list(simulation.topology.atoms())
                what += "; non-finite positions of " + ", ".join(
                    f"bead {i} ({atoms[i].name}, {atoms[i].residue.name} {atoms[i].residue.index})"
                    for i in bad[:5]) + (f" and {bad.size - 5} more" if bad.size > 5 else "")
        except Exception:  # the state itself may be unreadable after a blow-up; the step is still named
            pass
    return EnpcgError(f"CG simulation failed at step {step} of {steps} ({what}).{checkpoint_note} "
                      f"{HEALTH_FIX.replace('a smaller time step', f'a smaller time step than {timestep} ps')}")


# Forces whose serialization is not byte-stable between processes, hashed by name only: TorchForce (measured:
# the embedded TorchScript archive differs from one export to the next; System.getForces() returns it as a
# plain openmm.Force, which names any plugin force) and PythonForce (a pickle).
_UNSTABLE_XML = ("PythonForce", "TorchForce", "Force")


def _system_sha256(system):
    """sha256 of the System: masses, and each force's XML serialization (its parameters and tables). A
    TorchForce or PythonForce counts by name only (see ``_UNSTABLE_XML``); callers pass the model's identity
    for those (``identity``; ``enpcg simulate`` passes the model files' sha256)."""
    h = hashlib.sha256(np.array([system.getParticleMass(i).value_in_unit(unit.dalton)
                                 for i in range(system.getNumParticles())]).tobytes())
    for i in range(system.getNumForces()):
        force = system.getForce(i)
        h.update(type(force).__name__.encode())
        if type(force).__name__ not in _UNSTABLE_XML:
            h.update(openmm.XmlSerializer.serialize(force).encode())
    return h.hexdigest()


def _fingerprint(system, pos, box, settings):
    """What must match for a checkpoint to be resumed: run settings, the System (particles, forces and their
    parameters), the starting structure (sha256 of positions and box as float64 bytes)."""
    h = hashlib.sha256(np.ascontiguousarray(pos, dtype=np.float64).tobytes())
    if box is not None:
        h.update(np.ascontiguousarray(box, dtype=np.float64).tobytes())
    return {**settings, "n_particles": system.getNumParticles(), "system_sha256": _system_sha256(system),
            "start_sha256": h.hexdigest()}


def run_simulation(system: openmm.System, topology: app.Topology, positions, box, out_dir, *, steps: int,
                   timestep: float = 0.005, temperature: float = 450.0, friction=1.0,
                   report_interval: Optional[int] = None, platform=None, seed: int = 0, minimize: bool = True,
                   progress: bool = True, precision: Optional[str] = None, time_scale: float = 1.0,
                   checkpoint_interval: Optional[int] = None, resume: bool = True,
                   health: Optional[HealthLimits] = None, identity: Optional[dict] = None,
                   cell_lists=None) -> dict:
    """Langevin dynamics (LangevinMiddleIntegrator) of ``system``, writing DCD, CSV log and final state.

    Parameters
    ----------
    system : openmm.System
    topology : openmm.app.Topology, same particles as ``system`` (written to the DCD header). When it has no
        box and ``box`` is given, ``box`` is set on it (so the DCD records the unit cell).
    positions : np.ndarray, shape=(n, 3), nm
    box : np.ndarray, shape=(3, 3), nm (rows, OpenMM reduced form), or None for the System's default box
    out_dir : path, created if needed
    steps : int, number of MD steps
    timestep : float, ps
    temperature : float, K (thermostat and initial velocities)
    friction : float, 1/ps, or one value per particle (1/ps; a friction per bead type fitted by
        :func:`openmm_plugin.cg_dynamics.fit_friction`, expanded with ``DynamicsCalibration.particle_frictions``)
    report_interval : int, steps between DCD frames and log lines (default: steps // 100, at least 1)
    platform : str | openmm.Platform | None, None picks the fastest usable (CUDA > ... > CPU > Reference)
    seed : int, seeds the integrator and the initial velocities (reproducible; OpenMM's own 0 = random is
        avoided by mapping through ``sampling.openmm_seed``)
    minimize : bool, minimise the energy (L-BFGS, at most 1000 iterations) before dynamics
    progress : bool, show a tqdm progress bar
    precision : "single" | "mixed" | "double" | None, for platforms that have a Precision property
    time_scale : float, mapped atomistic time per CG time (``DynamicsCalibration.time_scale``); when not 1 the
        log gets a column "Mapped time (ps)" = time_scale x CG time
    checkpoint_interval : int, steps between checkpoints (a multiple of ``report_interval``), or None for no
        checkpoints. With checkpoints the run survives a kill (``kill -9`` included) and continues where its
        last checkpoint left it: see the module docstring for the files and the protocol.
    resume : bool, with checkpoints: continue an interrupted run found in ``out_dir`` (same settings, System
        and starting structure; another one is refused with an EnpcgError rather than overwritten), or return
        at once if it has finished (a finished run of other settings is replaced); False starts over.
    health : :class:`openmm_plugin.reporters.HealthLimits`, checked at the start and at every report (default:
        forces up to 1e6 kJ/mol/nm, no bead moving more than a box width between reports, finite energies;
        no pair-distance limit). A failed check stops the run with an EnpcgError naming the step and the beads.
    identity : dict, JSON-able values a resumed run must also match (``enpcg simulate``: the model files'
        sha256, which covers a PythonForce that the System hash cannot)
    cell_lists : :class:`openmm_plugin.system.CellLists` or None: the fixed-capacity cell lists of ``system``'s
        TorchForce (``CGPotential.cell_lists`` with the arguments that built ``system``). With it, a run stopped
        by a non-finite energy is restarted when the cause was a cell-list overflow: see "Cell-list overflow"
        in the module docstring. Without it (or for any other failure) the run stops with an EnpcgError.

    Returns
    -------
    dict with ``trajectory``, ``log``, ``final_state`` (Paths), ``ns_per_day`` (float, dynamics of this call
    only), ``wall_s``, ``platform`` (name), ``steps``, ``report_interval``, ``n_frames``; with checkpoints also
    ``checkpoint`` (Path) and ``resumed_from_step`` (int, 0 for a fresh run); with ``cell_lists`` also
    ``cell_lists`` (the capacities the run ended with) and ``cell_list_restarts`` (one dict per restart:
    ``step`` where the overflow stopped the run, ``restart_step`` it went on from, ``before``/``after``
    capacities).
    """
    n = system.getNumParticles()
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise EnpcgError(f"steps must be a positive integer; you supplied {steps!r}")
    steps = int(steps)
    if report_interval is None:
        report_interval = max(1, steps // 100)
    if not isinstance(report_interval, (int, np.integer)) or report_interval < 1:
        raise EnpcgError(f"report_interval must be a positive integer (steps); you supplied {report_interval!r}")
    report_interval = int(report_interval)
    if checkpoint_interval is not None:
        if (not isinstance(checkpoint_interval, (int, np.integer)) or checkpoint_interval < 1
                or checkpoint_interval % report_interval):
            raise EnpcgError(f"checkpoint_interval must be a positive multiple of report_interval "
                             f"({report_interval} steps) or None; you supplied {checkpoint_interval!r}. Fix: e.g. "
                             f"checkpoint_interval={10 * report_interval}")
        checkpoint_interval = int(checkpoint_interval)
    for name, value in (("timestep", timestep), ("temperature", temperature), ("time_scale", time_scale)):
        if not float(value) > 0:
            raise EnpcgError(f"{name} must be > 0; you supplied {value!r}")
    if topology.getNumAtoms() != n:
        raise EnpcgError(f"the topology has {topology.getNumAtoms()} atoms but the System has {n} particles; "
                         "pass the topology of the same beads")
    pos = _positions_nm(positions, n)
    box = _box_nm(box)
    if box is not None and topology.getPeriodicBoxVectors() is None:
        topology.setPeriodicBoxVectors([openmm.Vec3(*row) for row in box] * unit.nanometer)
    health = HealthLimits() if health is None else health

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"trajectory": out_dir / "trajectory.dcd", "log": out_dir / "log.csv",
             "final_state": out_dir / "final_state.xml"}

    plat, props = _platform(platform, precision)

    def make_simulation(system_):
        """A Simulation of ``system_`` with a fresh integrator (the checkpoint or the start sets its state)."""
        integrator = langevin_integrator(temperature, friction, timestep, n_particles=n)
        integrator.setRandomNumberSeed(openmm_seed(seed))
        sim = app.Simulation(topology, system_, integrator, plat, props)
        attach(integrator)
        return sim

    if cell_lists is not None and cell_lists.n_particles != n:
        raise EnpcgError(f"cell_lists belong to a System of {cell_lists.n_particles} particles, not this one of {n}; "
                         "pass CGPotential.cell_lists(...) with the arguments that built this System")
    start_box = box  # the box of the starting structure, for the cell lists' check of it
    if cell_lists is not None and box is None:
        start_box = np.array([row.value_in_unit(unit.nanometer) for row in system.getDefaultPeriodicBoxVectors()])
    checker = HealthReporter(report_interval, health)
    wrap = system.usesPeriodicBoundaryConditions()
    run = dict(make=make_simulation, system=system, cells=cell_lists, start_box=start_box, plat_name=plat.getName(),
               checker=checker, wrap=wrap, pos=pos, box=box, steps=steps, timestep=timestep, temperature=temperature,
               report_interval=report_interval, seed=seed, minimize=minimize, progress=progress,
               time_scale=time_scale, paths=paths)
    if checkpoint_interval is None:
        return _run_once(**run)
    friction_key = np.asarray(friction, dtype=np.float64).ravel()
    # one value per particle: its sha256 (run.json stays short)
    friction_key = (friction_key.tolist() if friction_key.size <= 8 else
                    "sha256:" + hashlib.sha256(np.ascontiguousarray(friction_key).tobytes()).hexdigest())
    settings = {"timestep_ps": float(timestep), "temperature_K": float(temperature), "friction_per_ps": friction_key,
                "report_interval": report_interval, "checkpoint_interval": checkpoint_interval, "seed": int(seed),
                "minimize": bool(minimize), "time_scale": float(time_scale), "platform": plat.getName(),
                **(identity or {})}
    return _run_checkpointed(**run, out_dir=out_dir, checkpoint_interval=checkpoint_interval, resume=resume,
                             fingerprint=_fingerprint(system, pos, box, settings))


# ------------------------------------------------------------------------------------------ cell-list overflow
_FAILURES = (SimulationHealthError, openmm.OpenMMException, ValueError)


def _energy_not_finite(simulation) -> bool:
    """Whether the Context's potential energy is NaN or infinite (or cannot be computed): what an overflowed
    cell list gives (its poisoned energy, :meth:`enpcg.neighbors.PairList.poison`), among other blow-ups."""
    try:
        energy = simulation.context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(
            unit.kilojoule_per_mole)
    except Exception:
        return True
    return not np.isfinite(energy)


def _positions_and_box(simulation):
    """(positions (n, 3), box (3, 3)) in nm of the Context, unwrapped: what its TorchForce is handed."""
    state = simulation.context.getState(getPositions=True)
    return (np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64),
            np.asarray(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64))


def _first_non_finite(simulation, until_step):
    """Step ``simulation`` one step at a time (from its current state) up to ``until_step``; (positions, box)
    of the first state whose energy is not finite, or None."""
    while True:
        if _energy_not_finite(simulation):
            return _positions_and_box(simulation)
        if simulation.currentStep >= until_step:
            return None
        try:
            simulation.step(1)
        except _FAILURES:  # coordinates turned NaN without a non-finite energy first: not an overflow
            return None


_UNLOCATED = "unlocated"  # an overflow whose structure was not found (e.g. one the minimiser passed through)


def _overflow_state(simulation, cells, fresh_energy_finite, replay):
    """After a failed run: whether the cell lists ``cells`` overflowed, and where. Returns (positions, box) nm
    of a structure at which they overflow, :data:`_UNLOCATED` when they did overflow at a structure no longer
    at hand, or None when the failure is not an overflow.

    The TorchForce's overflow flag stays inside OpenMM (not readable here); an overflow shows as a NaN energy
    from then on. So, for a failure with a non-finite energy: (1) the eager model with the same capacities
    (``cells``) is evaluated on the failed structure. (2) Else, if the same structure gives a finite energy in
    a new Context (``fresh_energy_finite(positions, box)``: its flag is clear), the NaN was the sticky flag of
    an earlier overflow (a crowding since the last report that has passed, or one inside the minimiser): the
    steps since the last checkpoint are replayed (``replay()``: a new Simulation there and the step to replay
    to, or None without a checkpoint) to find it. (3) A failed structure with non-finite coordinates is located
    by the replay too. Anything else (a NaN the structure itself gives) is not an overflow.
    """
    if cells is None or not _energy_not_finite(simulation):
        return None  # an overflow always makes the energy NaN (until a restart)
    pos, box = _positions_and_box(simulation)
    finite = bool(np.isfinite(pos).all() and np.isfinite(box).all())
    if finite:
        if cells.overflowed(pos, box):
            return pos, box
        if not fresh_energy_finite(pos, box):
            return None  # the structure itself gives the NaN: not the flag
    start = replay()
    found = _first_non_finite(*start) if start is not None else None
    if found is not None and np.isfinite(found[0]).all() and cells.overflowed(*found):
        return found
    return _UNLOCATED if finite else None


def _fresh_energy_finite(make, system):
    """A function (positions, box) nm -> whether a new Context of ``system`` gives them a finite energy."""

    def check(pos, box):
        sim = make(system)
        sim.context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
        sim.context.setPositions(pos)
        return not _energy_not_finite(sim)

    return check


def _capacities_text(before, after):
    return "; ".join(f"cell list {k}: cell_capacity {b['cell_capacity']} -> {a['cell_capacity']}, max_neighbors "
                     f"{b['max_neighbors']} -> {a['max_neighbors']}" for k, (b, a) in enumerate(zip(before, after))
                     if a != b) or "capacities unchanged"


def _grow(cells, found, step, restart_step, where):
    """Grow ``cells`` after an overflow: to fit the structure ``found`` (positions, box), or, when it is
    :data:`_UNLOCATED`, by doubling every capacity. Prints what changed; returns the record for run.json."""
    before = cells.capacities
    unlocated = isinstance(found, str)
    after = cells.double() if unlocated else cells.grow(*found)
    how = ("at a structure no longer at hand (the minimiser's?), so every capacity is doubled" if unlocated else
           "the capacity it exceeded is doubled until that structure fits")
    print(f"{where}: the fixed-capacity cell list overflowed by step {step} (its energy turned NaN); {how}: "
          f"{_capacities_text(before, after)}; restarting from step {restart_step}")
    return {"step": int(step), "restart_step": int(restart_step), "before": before, "after": after}


def _failed_step(e, simulation):
    return e.step if isinstance(e, SimulationHealthError) else simulation.currentStep


def _result(paths, wall, steps_run, timestep, plat_name, steps, report_interval, **extra):
    ns_per_day = steps_run * timestep * 1e-3 / (wall / 86400.0) if wall > 0 else float("inf")
    return {**paths, "ns_per_day": float(ns_per_day), "wall_s": float(wall), "platform": plat_name,
            "steps": steps, "report_interval": report_interval, "n_frames": steps // report_interval, **extra}


def _run_once(make, system, cells, start_box, plat_name, checker, wrap, pos, box, steps, timestep, temperature,
              report_interval, seed, minimize, progress, time_scale, paths):
    """No checkpoints: every output is written under a temporary name and renamed when the run has finished.
    A cell-list overflow (``cells``) restarts the whole run with larger capacities (the outputs of the
    failed attempt are discarded with their temporary files)."""
    restarts = []
    if cells is not None and cells.overflowed(pos, start_box):  # the start itself: grow before minimising
        restarts.append(_grow(cells, (pos, start_box), 0, 0, str(paths["trajectory"].parent)))
        system = cells.system(system)
    while True:
        simulation = make(system)
        _start_state(simulation, pos, box, minimize, temperature, seed)
        try:
            wall = _dynamics_once(simulation, checker, wrap, steps, report_interval, progress, time_scale, paths)
            break
        except _FAILURES as e:
            failed = _failed_step(e, simulation)

            def replay():
                sim = make(system)
                _start_state(sim, pos, box, minimize, temperature, seed)
                return sim, min(steps, failed + report_interval)

            found = _overflow_state(simulation, cells, _fresh_energy_finite(make, system), replay)
            if found is None:
                # OpenMM: NaN coordinates; ValueError: a writer refusing NaN. Outputs of this run are discarded.
                raise _failure(e, simulation, steps, timestep) from None
            restarts.append(_grow(cells, found, failed, 0, str(paths["trajectory"].parent)))
            system = cells.system(system)
    extra = {} if cells is None else {"cell_lists": cells.capacities, "cell_list_restarts": restarts}
    return _result(paths, wall, steps, timestep, plat_name, steps, report_interval, **extra)


def _dynamics_once(simulation, checker, wrap, steps, report_interval, progress, time_scale, paths):
    """Dynamics of a run without checkpoints into temporary outputs, renamed at the end; returns the wall time
    (s). A failure (SimulationHealthError, OpenMMException, ValueError) propagates; its outputs are removed."""
    with contextlib.ExitStack() as stack:
        tmp = {k: stack.enter_context(atomic_path(p)) for k, p in paths.items()}
        log_fh = stack.enter_context(open(tmp["log"], "w"))
        dcd = app.DCDReporter(str(tmp["trajectory"]), report_interval)
        # DCDReporter opens its file itself and exposes no close(); close it before the rename (or removal).
        stack.callback(dcd._out.close)
        log = app.StateDataReporter(log_fh, report_interval, step=True, time=True, potentialEnergy=True,
                                    kineticEnergy=True, temperature=True, speed=True, separator=",")
        bar = _ProgressReporter(steps, report_interval, progress)
        stack.callback(bar.close)
        bar.start(simulation.currentStep)
        simulation.reporters.extend([_Outputs(report_interval, checker, dcd, log, wrap), bar])
        t0 = time.perf_counter()
        try:
            _check_now(simulation, checker)
            simulation.step(steps)
        finally:
            simulation.reporters.clear()
        wall = time.perf_counter() - t0
        simulation.saveState(str(tmp["final_state"]))
        if time_scale != 1.0:
            log_fh.flush()
            _add_mapped_time(tmp["log"], time_scale)
        # ExitStack closes the bar, the DCD and the log, then renames each temporary file onto its target.
    return wall


def _read_run_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _run_checkpointed(make, system, cells, start_box, plat_name, checker, wrap, pos, box, steps, timestep,
                      temperature, report_interval, seed, minimize, progress, time_scale, paths, out_dir,
                      checkpoint_interval, resume, fingerprint):
    """Checkpointed run: growing ``*.partial.*`` outputs, ``checkpoint.chk`` and ``run.json``; resumable.
    A cell-list overflow (``cells``) restarts from the last checkpoint with larger capacities."""
    chk, run_json = out_dir / CHECKPOINT, out_dir / RUN_JSON
    partial = {k: out_dir / name for k, name in PARTIAL.items()}
    stored = _read_run_json(run_json) if resume else None
    start_step = 0
    if stored is not None and chk.exists():
        old = stored.get("fingerprint", {})
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        complete = bool(stored.get("complete"))
        if complete and not diff and stored.get("steps") == steps and all(p.exists() for p in paths.values()):
            print(f"{out_dir}: the run of {steps} steps is complete; nothing to do (resume=False starts over)")
            return {**paths, **stored["result"], "checkpoint": chk}
        if complete:  # a finished run of other settings: replaced, as a rerun of a stage always did
            print(f"{out_dir}: replacing the finished run there (changed: {', '.join(diff) or 'steps'})")
            stored = None
        elif diff:  # an unfinished run is refused, not overwritten: it may hold hours of simulation
            was = ", ".join(f"{k}: {old.get(k)!r}" for k in diff)
            now = ", ".join(f"{k}: {fingerprint.get(k)!r}" for k in diff)
            raise EnpcgError(f"{out_dir}: holds an unfinished run with other settings ({was}; this run: "
                             f"{now}), so it cannot be resumed. Fix: rerun with the same settings to resume it, "
                             "start over with --resume false (resume=False), or choose another output folder")
    resumed = stored is not None and chk.exists()
    restarts = list(stored.get("cell_list_restarts", [])) if resumed else []
    if resumed and cells is not None and stored.get("cell_lists"):
        # An earlier attempt grew the cell lists: resume with its capacities (never smaller than these).
        grown = [{k: max(int(a[k]), int(b[k])) for k in ("cell_capacity", "max_neighbors")}
                 for a, b in zip(stored["cell_lists"], cells.capacities)]
        if len(stored["cell_lists"]) == len(cells.capacities) and grown != cells.capacities:
            print(f"{out_dir}: resuming with the cell-list capacities recorded in {RUN_JSON} "
                  f"({_capacities_text(cells.capacities, grown)})")
            cells.set_capacities(grown)
            system = cells.system(system)
    if not resumed and cells is not None and cells.overflowed(pos, start_box):
        # The starting structure itself overflows the cell lists: grow them before minimising.
        restarts.append(_grow(cells, (pos, start_box), 0, 0, str(out_dir)))
        system = cells.system(system)
    simulation = make(system)
    if resumed:
        try:
            simulation.loadCheckpoint(str(chk))
        except Exception as e:
            raise EnpcgError(f"{chk}: cannot load this checkpoint ({e}). A checkpoint loads only into the same System "
                             f"on the same platform ({plat_name}) and OpenMM version. Fix: rerun on the platform that "
                             "wrote it, or start over with --resume false (resume=False)") from None
        start_step = simulation.currentStep
        if start_step > steps:
            raise EnpcgError(f"{chk}: checkpoint is at step {start_step} but this run asks for {steps} steps. Fix: ask "
                             "for at least as many steps, or start over with --resume false (resume=False)")
    for stale in out_dir.glob(f".{CHECKPOINT}.*.tmp*"):  # a checkpoint a killed run had not renamed yet
        stale.unlink(missing_ok=True)

    def record(complete=False, **extra):
        """run.json: the fingerprint, and with cell lists their capacities (a resumed run starts with them)."""
        data = {"fingerprint": fingerprint, "steps": steps, "complete": complete}
        if cells is not None:
            data.update(cell_lists=cells.capacities, cell_list_restarts=restarts)
        write_json(run_json, {**data, **extra})

    def cut_back(frames, step):
        """Cut the partial outputs back to the ``frames`` frames that the checkpoint (at ``step``) covers."""
        if not all(p.exists() for p in partial.values()):
            raise EnpcgError(f"{out_dir}: the checkpoint is at step {step} but "
                             f"{' and '.join(p.name for p in partial.values() if not p.exists())} is missing, so "
                             "the run cannot continue without a gap. Fix: start over with --resume false "
                             "(resume=False)")
        _truncate_dcd(partial["trajectory"], frames, report_interval)
        _truncate_log(partial["log"], frames)

    frames = start_step // report_interval
    if not resumed:
        for p in (chk, run_json, *partial.values()):
            p.unlink(missing_ok=True)  # a stale checkpoint must never pair with new outputs
        record()
        _start_state(simulation, pos, box, minimize, temperature, seed)
    else:
        record()
        if start_step < steps and frames > 0:  # frames after the checkpoint are redone
            cut_back(frames, start_step)
    note = (f" The last good checkpoint is {chk} (step {{step}}); the trajectory so far is in "
            f"{partial['trajectory'].name} and {partial['log'].name}.")
    last = {"step": start_step if resumed else None}  # step of the last checkpoint on disk

    def dynamics(simulation, fresh, frames):
        """From the current state to ``steps``, appending to the partial outputs after their first ``frames``
        frames; ``fresh``: also checkpoint the starting state. A failure propagates."""
        append = frames > 0
        with contextlib.ExitStack() as stack:
            log_fh = stack.enter_context(open(partial["log"], "a" if append else "w"))
            dcd = app.DCDReporter(str(partial["trajectory"]), report_interval, append=append)
            stack.callback(dcd._out.close)
            log = app.StateDataReporter(log_fh, report_interval, step=True, time=True, potentialEnergy=True,
                                        kineticEnergy=True, temperature=True, speed=True, separator=",",
                                        append=append)

            def checkpoint(sim, index):
                _save_checkpoint(sim, chk, index, files=(dcd._out, log_fh))
                last["step"] = sim.currentStep

            outputs = _Outputs(report_interval, checker, dcd, log, wrap, checkpoint, checkpoint_interval, frames)
            bar = _ProgressReporter(steps, report_interval, progress)
            stack.callback(bar.close)
            try:
                _check_now(simulation, checker)
                if fresh:
                    checkpoint(simulation, 0)  # the starting state: a failure at the first report resumes here
                bar.start(simulation.currentStep)
                simulation.reporters.extend([outputs, bar])
                simulation.step(steps - simulation.currentStep)
            finally:
                simulation.reporters.clear()
            if simulation.currentStep != last["step"]:
                checkpoint(simulation, outputs.frames)  # the last step, when it is not a checkpoint step

    t0 = time.perf_counter()
    fresh = not resumed
    while start_step < steps:
        try:
            dynamics(simulation, fresh, frames)
            break
        except _FAILURES as e:
            failed = _failed_step(e, simulation)

            def replay():
                if last["step"] is None:
                    return None
                sim = make(system)  # the same capacities, a new Context (whose overflow flag is clear)
                sim.loadCheckpoint(str(chk))
                return sim, min(steps, failed + report_interval)

            found = _overflow_state(simulation, cells, _fresh_energy_finite(make, system), replay)
            if found is None:
                where = (note.format(step=last["step"]) if last["step"] is not None else
                         " The starting state failed, so no checkpoint was written.")
                raise _failure(e, simulation, steps, timestep, where) from None
            # Restart from the last checkpoint (or the start) with grown cell lists; frames after it are redone.
            restarts.append(_grow(cells, found, failed, last["step"] or 0, str(out_dir)))
            system = cells.system(system)
            simulation = make(system)
            if last["step"] is None:
                _start_state(simulation, pos, box, minimize, temperature, seed)
                frames = 0
            else:
                simulation.loadCheckpoint(str(chk))
                frames = last["step"] // report_interval
                fresh = False
                if frames > 0:
                    cut_back(frames, last["step"])
            record()
    wall = time.perf_counter() - t0

    # Finish: each step below is idempotent, so a kill in between is finished by the next call.
    with atomic_path(paths["final_state"]) as tmp:
        simulation.saveState(str(tmp))
    if partial["log"].exists():
        with atomic_path(paths["log"]) as tmp:
            shutil.copyfile(partial["log"], tmp)
            if time_scale != 1.0:
                _add_mapped_time(tmp, time_scale)
        partial["log"].unlink()
    if partial["trajectory"].exists():
        os.replace(partial["trajectory"], paths["trajectory"])
    extra = {} if cells is None else {"cell_lists": cells.capacities, "cell_list_restarts": restarts}
    result = _result({}, wall, steps - start_step, timestep, plat_name, steps, report_interval,
                     checkpoint=str(chk), resumed_from_step=start_step, **extra)
    record(complete=True, result=result)
    return {**paths, **result, "checkpoint": chk}
