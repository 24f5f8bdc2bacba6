"""Run a CG (or any) OpenMM System with Langevin dynamics: DCD trajectory, CSV log, progress, final state.

Units: nm, ps, K, kJ/mol. Outputs in ``out_dir``:

* ``trajectory.dcd``: positions every ``report_interval`` steps (with the unit cell when there is a box);
* ``log.csv``: OpenMM's StateDataReporter columns step, time (ps), potential energy (kJ/mol), kinetic energy
  (kJ/mol), temperature (K), speed (ns/day), comma-separated, header line starting with ``#``;
* ``final_state.xml``: the final OpenMM State (positions, velocities, box).

Each is written under a temporary name beside its target and renamed only when the run has finished, so an
interrupted run leaves no file that looks complete.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch  # noqa: F401  (before openmm: OpenMM's plugin loader needs libtorch for openmm-torch kernels)
import openmm
from openmm import app, unit

from enpcg.errors import EnpcgError
from enpcg.fileio import atomic_path

from .sampling import best_platform, openmm_seed, platform_properties
from .integrators import attach, langevin_integrator


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


def run_simulation(system: openmm.System, topology: app.Topology, positions, box, out_dir, *, steps: int,
                   timestep: float = 0.005, temperature: float = 450.0, friction=1.0,
                   report_interval: Optional[int] = None, platform=None, seed: int = 0, minimize: bool = True,
                   progress: bool = True, precision: Optional[str] = None, time_scale: float = 1.0) -> dict:
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

    Returns
    -------
    dict with ``trajectory``, ``log``, ``final_state`` (Paths), ``ns_per_day`` (float, dynamics only),
    ``wall_s``, ``platform`` (name), ``steps``, ``report_interval``, ``n_frames``.
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

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"trajectory": out_dir / "trajectory.dcd", "log": out_dir / "log.csv",
             "final_state": out_dir / "final_state.xml"}

    plat, props = _platform(platform, precision)
    integrator = langevin_integrator(temperature, friction, timestep, n_particles=n)
    integrator.setRandomNumberSeed(openmm_seed(seed))
    simulation = app.Simulation(topology, system, integrator, plat, props)
    attach(integrator)
    if box is not None:
        simulation.context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
    simulation.context.setPositions(pos)
    if minimize:
        simulation.minimizeEnergy(maxIterations=1000)
    simulation.context.setVelocitiesToTemperature(temperature * unit.kelvin, openmm_seed(seed))

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
        simulation.reporters.extend([dcd, log, bar])
        t0 = time.perf_counter()
        try:
            simulation.step(steps)
        except (openmm.OpenMMException, ValueError) as e:  # OpenMM: NaN coordinates; StateDataReporter: NaN energy
            # Outputs of this run are discarded (temporary files are removed on the way out).
            raise EnpcgError(f"CG simulation failed at step {simulation.currentStep} of {steps} ({e}). Fix: use a "
                             f"smaller time step than {timestep} ps, start from a minimised or mapped structure, "
                             "or check the model (a model fitted on too few frames can be unstable)") from None
        wall = time.perf_counter() - t0
        simulation.reporters.clear()
        simulation.saveState(str(tmp["final_state"]))
        if time_scale != 1.0:
            log_fh.flush()
            _add_mapped_time(tmp["log"], time_scale)
        # ExitStack closes the bar, the DCD and the log, then renames each temporary file onto its target.

    ns_per_day = steps * timestep * 1e-3 / (wall / 86400.0) if wall > 0 else float("inf")
    return {**paths, "ns_per_day": float(ns_per_day), "wall_s": float(wall), "platform": plat.getName(),
            "steps": steps, "report_interval": report_interval, "n_frames": steps // report_interval}
