"""Glass protocols for any periodic OpenMM System: equilibration with checks, NPT quenches, isothermal ageing.

Units are OpenMM's: nm, ps, K, kJ/mol, amu, bar; velocities nm/ps; box vectors are the rows of a (3, 3) array
in nm; cooling rates K/ps; densities g/cm^3 (mass density) and nm^-3 (number density).

Reduced Lennard-Jones units map onto OpenMM exactly with sigma = 1 nm, epsilon = 1 kJ/mol, m = 1 amu: the LJ
time tau = sigma sqrt(m / epsilon) = 1 ps, T[K] = T* epsilon / R = T* / 0.0083144626 (R = k_B N_A =
``openmm.unit.MOLAR_GAS_CONSTANT_R`` in kJ/mol/K) and P* = P sigma^3 / epsilon, 1 kJ/mol/nm^3 = 16.6054 bar
(so P* = 1 is 16.6054 bar). Use that mapping to run reduced-unit systems.

* :func:`equilibrate`: Langevin NVT (or NPT with a Monte Carlo barostat) at one temperature, then checks on
  the last half of the run: no significant drift of the potential energy (and density under NPT) and a kinetic
  temperature equal to the set temperature, both within ``n_se`` block standard errors.
* :func:`quench`: NPT cooling whose set temperature falls linearly in time at ``cooling_rate`` K/ps, recording
  time, set and kinetic temperature, density, potential energy and enthalpy H = U + K + P V. Resumable.
* :func:`age`: isothermal (NVT or NPT) run recording the same observables and saving configurations at
  log-spaced waiting times (for two-time analyses). Resumable.

Records (:class:`ProtocolRecords`) are instantaneous values every ``record_interval`` MD steps, including the
starting state (step 0) and the last step.

Resume protocol. With ``checkpoint=path``, at every record the records so far, the saved configurations (for
:func:`age`), the run's arguments and OpenMM's ``Context.createCheckpoint`` bytes are written together into one
.npz, atomically (temporary file + rename), so the checkpoint and the records can never disagree. A rerun with
the same arguments loads it and continues from the last record; a finished run returns at once. OpenMM's
checkpoint does not restore the Langevin integrator's or the barostat's random streams on every platform (on
the CPU platform it does not), so with a checkpoint both are re-seeded at every checkpoint from ``(seed, step)``
(``Context.reinitialize``, a few ms for a small system). Checkpoints are written at records at least
max(record_interval, 20 barostat periods, 1 % of the run) apart (a reinitialization restarts the barostat's
move counter), and a resumed run continues from the last checkpoint. A resumed run therefore continues bitwise like an
uninterrupted checkpointed run on the same platform and thread count. Without a checkpoint one random stream is
used for the whole run (the same ``seed`` gives a different, equally valid trajectory).
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch  # noqa: F401  (before openmm: OpenMM's plugin loader needs libtorch for openmm-torch kernels)
import openmm
from openmm import unit

from enpcg.errors import EnpcgError
from enpcg.fileio import atomic_path

from .sampling import best_platform, openmm_seed, platform_properties

__all__ = ["ProtocolRecords", "ProtocolResult", "EquilibrationCheck", "EquilibrationResult", "AgeingResult",
           "EquilibrationWarning", "equilibrate", "quench", "age", "log_spaced_steps", "reduced_temperature_to_kelvin",
           "reduced_pressure_to_bar", "R_KJ_PER_MOL_K"]

R_KJ_PER_MOL_K = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)  # 0.0083144626
# 1 amu/nm^3 in g/cm^3 (amu = g/mol; divide by Avogadro's number for grams).
_AMU_PER_NM3_IN_G_PER_CM3 = (unit.dalton / unit.AVOGADRO_CONSTANT_NA / unit.nanometer ** 3).value_in_unit(
    unit.gram / unit.centimeter ** 3)
# 1 bar nm^3 per particle-mole in kJ/mol (P V term of the enthalpy).
_BAR_NM3_IN_KJ_PER_MOL = (unit.bar * unit.nanometer ** 3 * unit.AVOGADRO_CONSTANT_NA).value_in_unit(
    unit.kilojoule_per_mole)
_CHECKPOINT_FORMAT = 1


def reduced_temperature_to_kelvin(t_star: float) -> float:
    """T in K for a reduced LJ temperature T* = k_B T / epsilon with epsilon = 1 kJ/mol."""
    return float(t_star) / R_KJ_PER_MOL_K


def reduced_pressure_to_bar(p_star: float) -> float:
    """P in bar for a reduced LJ pressure P* = P sigma^3 / epsilon with sigma = 1 nm, epsilon = 1 kJ/mol."""
    return float(p_star) / _BAR_NM3_IN_KJ_PER_MOL


class EquilibrationWarning(RuntimeWarning):
    """An equilibration check failed (raised as EnpcgError instead with ``strict=True``)."""


# --------------------------------------------------------------------------------------------------- records
_FIELDS = ("step", "time", "set_temperature", "kinetic_temperature", "potential_energy", "kinetic_energy",
           "volume", "density", "number_density", "enthalpy")


@dataclass
class ProtocolRecords:
    """Observables recorded every ``record_interval`` steps (instantaneous values at that step).

    Attributes
    ----------
    step : np.ndarray of int64
        MD step counted from the start of the protocol.
    time : np.ndarray
        step * timestep, ps.
    set_temperature : np.ndarray
        Thermostat set temperature at that time, K (for a quench the exact linear ramp value).
    kinetic_temperature : np.ndarray
        2 K / (N_dof R), K; N_dof = 3 x (particles with mass) - constraints - 3 if a CMMotionRemover is present.
    potential_energy, kinetic_energy : np.ndarray
        kJ/mol.
    volume : np.ndarray
        Box volume, nm^3.
    density : np.ndarray
        Total particle mass / volume, g/cm^3.
    number_density : np.ndarray
        Particles with mass / volume, nm^-3.
    enthalpy : np.ndarray
        U + K + P V with P the set pressure, kJ/mol; NaN for runs without a barostat.
    metadata : dict
        The protocol's arguments (pressure in bar, cooling_rate in K/ps, timestep in ps, ...).
    """

    step: np.ndarray
    time: np.ndarray
    set_temperature: np.ndarray
    kinetic_temperature: np.ndarray
    potential_energy: np.ndarray
    kinetic_energy: np.ndarray
    volume: np.ndarray
    density: np.ndarray
    number_density: np.ndarray
    enthalpy: np.ndarray
    metadata: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, metadata=None) -> "ProtocolRecords":
        """Records with no rows (int64 ``step``, float64 elsewhere) and ``metadata``."""
        arrays = {name: np.zeros(0, dtype=np.int64 if name == "step" else np.float64) for name in _FIELDS}
        return cls(**arrays, metadata=dict(metadata or {}))

    def __len__(self) -> int:
        return int(self.step.size)

    def _append(self, row: dict):
        for name in _FIELDS:
            setattr(self, name, np.append(getattr(self, name), row[name]).astype(getattr(self, name).dtype))

    def arrays(self) -> dict:
        """The record arrays as a dict name -> np.ndarray (no metadata)."""
        return {name: getattr(self, name) for name in _FIELDS}

    def save(self, path) -> Path:
        """Write the records and metadata (JSON) to an .npz file, atomically. Returns the path."""
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **self.arrays(), metadata_json=np.array(json.dumps(self.metadata)))
        return path

    @classmethod
    def load(cls, path) -> "ProtocolRecords":
        """Read records written by :meth:`save` (or a protocol checkpoint)."""
        path = Path(path)
        if not path.is_file():
            raise EnpcgError(f"{path}: no such records file. Fix: pass the path that save() or a protocol wrote")
        with np.load(path, allow_pickle=False) as z:
            missing = [name for name in _FIELDS if name not in z.files]
            if missing:
                raise EnpcgError(f"{path}: not a records file (missing {missing}). Fix: pass a file written by "
                                 "ProtocolRecords.save or a protocol checkpoint")
            meta = json.loads(str(z["metadata_json"])) if "metadata_json" in z.files else {}
            meta.pop("_run", None)  # a protocol checkpoint's resume identity: not part of the records
            return cls(**{name: np.array(z[name]) for name in _FIELDS}, metadata=meta)


@dataclass
class ProtocolResult:
    """Outcome of a protocol run.

    Attributes
    ----------
    records : ProtocolRecords
    positions : np.ndarray, shape (N, 3)
        Final positions, nm (not wrapped into the box: continuous trajectories).
    velocities : np.ndarray, shape (N, 3)
        Final velocities, nm/ps.
    box : np.ndarray, shape (3, 3)
        Final box vectors (rows), nm.
    completed : bool
        False when the run stopped early at ``max_steps`` (resume it with the same checkpoint).
    checkpoint : Path or None
    """

    records: ProtocolRecords
    positions: np.ndarray
    velocities: np.ndarray
    box: np.ndarray
    completed: bool
    checkpoint: Optional[Path] = None


@dataclass
class EquilibrationCheck:
    """One equilibration check on the last half of the run.

    Attributes
    ----------
    name : str
        "potential_energy_drift" (value: slope in kJ/mol/ps), "density_drift" (g/cm^3/ps) or
        "kinetic_temperature" (value: mean kinetic minus set temperature, K).
    value, standard_error : float
        In the unit above; the standard error from the block means (linear-fit slope error for drifts,
        std(ddof=1)/sqrt(n_blocks) for the temperature).
    limit : float
        n_se * standard_error; the check passes when |value| <= limit.
    passed : bool
    message : str
    """

    name: str
    value: float
    standard_error: float
    limit: float
    passed: bool
    message: str


@dataclass
class EquilibrationResult(ProtocolResult):
    """:class:`ProtocolResult` plus ``checks`` (list of EquilibrationCheck) and ``passed`` (all checks passed)."""

    checks: list = field(default_factory=list)
    passed: bool = True


@dataclass
class AgeingResult(ProtocolResult):
    """:class:`ProtocolResult` plus the configurations saved at log-spaced waiting times.

    Attributes
    ----------
    save_steps : np.ndarray of int64
        Steps of the saved configurations (0 = the starting configuration).
    save_times : np.ndarray
        Waiting times save_steps * timestep, ps.
    saved_positions : np.ndarray, shape (k, N, 3)
        Positions, nm, unwrapped (continuous across the box) for displacement-based two-time analyses.
    saved_boxes : np.ndarray, shape (k, 3, 3)
        Box vectors, nm.
    records_path, configurations_path : Path or None
        ``out_dir/records.npz`` and ``out_dir/configurations.npz`` when ``out_dir`` was given.
    """

    save_steps: np.ndarray = None
    save_times: np.ndarray = None
    saved_positions: np.ndarray = None
    saved_boxes: np.ndarray = None
    records_path: Optional[Path] = None
    configurations_path: Optional[Path] = None


# -------------------------------------------------------------------------------------------- input checks
def _array(x, shape, what, unit_, fix):
    v = x.value_in_unit(unit_) if unit.is_quantity(x) else x
    if isinstance(v, (list, tuple)) and v and unit.is_quantity(v[0]):
        v = [e.value_in_unit(unit_) for e in v]
    v = np.asarray(v, dtype=np.float64)
    if v.shape != shape:
        raise EnpcgError(f"{what} must have shape {shape}; you supplied {v.shape}. Fix: {fix}")
    if not np.all(np.isfinite(v)):
        raise EnpcgError(f"{what} holds NaN or infinite values. Fix: {fix}")
    return v


def _positive(name, value, allow_zero=False):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise EnpcgError(f"{name} must be a number; you supplied {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise EnpcgError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite; you supplied {value!r}. "
                         f"Fix: pass a {'non-negative' if allow_zero else 'positive'} value")
    return v


def _positive_int(name, value):
    try:
        ok = not isinstance(value, bool) and int(value) == value and int(value) >= 1
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise EnpcgError(f"{name} must be a positive integer (MD steps); you supplied {value!r}")
    return int(value)


def _prepare_system(system, pressure, temperature, barostat_frequency):
    """A copy of ``system`` with a MonteCarloBarostat added when ``pressure`` (bar) is given."""
    if not isinstance(system, openmm.System):
        raise EnpcgError(f"system must be an openmm.System; you supplied {type(system).__name__}")
    if not system.usesPeriodicBoundaryConditions():
        raise EnpcgError("system does not use periodic boundary conditions; these protocols need a periodic box "
                         "(densities, barostat). Fix: use a periodic nonbonded method (e.g. CutoffPeriodic/PME)")
    system = copy.deepcopy(system)  # never modify the caller's System
    for i, force in enumerate(system.getForces()):
        if "Barostat" in type(force).__name__:
            raise EnpcgError(f"system already holds a {type(force).__name__} (force {i}); the protocols add their "
                             "own MonteCarloBarostat. Fix: remove it and pass pressure= (bar) instead")
    barostat_index = None
    if pressure is not None:
        barostat_index = system.addForce(openmm.MonteCarloBarostat(pressure * unit.bar, temperature * unit.kelvin,
                                                                   int(barostat_frequency)))
    return system, barostat_index


def _degrees_of_freedom(system):
    masses = [system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(system.getNumParticles())]
    massive = sum(1 for m in masses if m > 0)  # massless particles (virtual sites) carry no kinetic energy
    dof = 3 * massive - system.getNumConstraints()
    if any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces()):
        dof -= 3
    return dof, massive


def _segment_seed(seed, step):
    """Integrator/barostat seed for the stretch after ``step``: reproducible from (seed, step)."""
    return openmm_seed(int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)]).generate_state(1)[0]))


# ---------------------------------------------------------------------------------------------- the driver
@dataclass
class _Plan:
    """What a protocol run does; everything the driver needs besides the System and the start state."""

    name: str
    n_steps: int
    timestep: float
    friction: float
    pressure: Optional[float]
    record_interval: int
    set_temperature: Callable  # step (float allowed) -> K, the ramp
    block: int  # the integrator temperature is constant over blocks of this many steps
    save_steps: np.ndarray  # configurations to keep (age)
    metadata: dict


def _block_temperature(plan, step):
    """Integrator temperature for the block holding ``step``: the set temperature at the block's midpoint.

    Blocks are fixed multiples of ``plan.block`` counted from step 0, whatever stops the stepping in between
    (records, saves, max_steps), so an interrupted and resumed run sees exactly the same temperatures. For a
    linear ramp the midpoint value equals the block's time average of the ramp.
    """
    b0 = (step // plan.block) * plan.block
    b1 = min(b0 + plan.block, plan.n_steps)
    return plan.set_temperature(0.5 * (b0 + b1))


def _read_checkpoint(path, plan, n_particles, platform_name):
    try:
        return _read_checkpoint_file(path, plan, n_particles, platform_name)
    except (KeyError, ValueError, OSError, EOFError) as e:
        if isinstance(e, EnpcgError):
            raise
        raise EnpcgError(f"checkpoint {path} is not a readable protocol checkpoint ({type(e).__name__}: {e}). "
                         "Fix: pass a new checkpoint path, or delete the file to start over") from None


def _read_checkpoint_file(path, plan, n_particles, platform_name):
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["metadata_json"]))
        stored = meta.get("_run", {})
        expected = _run_identity(plan, n_particles, platform_name)
        diff = {k: (stored.get(k), v) for k, v in expected.items() if stored.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise EnpcgError(f"checkpoint {path} belongs to a different run ({detail}). Fix: rerun with the same "
                             "arguments to resume, or pass a new checkpoint path (or delete this file) to start over")
        records = ProtocolRecords(**{name: np.array(z[name]) for name in _FIELDS},
                                  metadata={k: v for k, v in meta.items() if k != "_run"})
        saves = {int(s): (np.array(p), np.array(b)) for s, p, b in
                 zip(z["saved_steps"], z["saved_positions"], z["saved_boxes"])}
        chk = z["openmm_checkpoint"].tobytes()
        step = int(z["checkpoint_step"])
    return records, saves, chk, step


def _run_identity(plan, n_particles, platform_name):
    """JSON-normalised arguments that must match for a checkpoint to be resumed."""
    ident = dict(plan.metadata, protocol=plan.name, n_particles=n_particles, platform=platform_name,
                 format=_CHECKPOINT_FORMAT)
    return json.loads(json.dumps(ident))


def _write_checkpoint(path, records, saves, context, step, plan, n_particles, platform_name):
    meta = dict(records.metadata, _run=_run_identity(plan, n_particles, platform_name))
    steps = sorted(saves)
    n = n_particles
    pos = np.stack([saves[s][0] for s in steps]) if steps else np.zeros((0, n, 3))
    boxes = np.stack([saves[s][1] for s in steps]) if steps else np.zeros((0, 3, 3))
    chk = np.frombuffer(context.createCheckpoint(), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **records.arrays(), metadata_json=np.array(json.dumps(meta)), openmm_checkpoint=chk,
                     checkpoint_step=np.int64(step), saved_steps=np.array(steps, dtype=np.int64),
                     saved_positions=pos, saved_boxes=boxes)


def _drive(system, positions, box, velocities, plan: _Plan, *, seed, platform, properties, barostat_frequency,
           checkpoint, max_steps, callback, progress):
    """Run ``plan`` on ``system``; returns (records, saves {step: (pos, box)}, final state arrays, completed)."""
    from tqdm.auto import tqdm

    n = system.getNumParticles()
    t0 = plan.set_temperature(0)
    system, baro_index = _prepare_system(system, plan.pressure, t0, barostat_frequency)
    dof, massive = _degrees_of_freedom(system)
    if dof <= 0:
        raise EnpcgError(f"system has {dof} degrees of freedom (particles with mass minus constraints); "
                         "nothing to thermostat. Fix: give particles mass")
    total_mass = sum(system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(n))
    platform = platform if isinstance(platform, openmm.Platform) else best_platform(platform)
    props = dict(platform_properties(platform), **{str(k): str(v) for k, v in (properties or {}).items()})
    pos0 = _array(positions, (n, 3), "positions", unit.nanometer, f"pass {n} rows of x, y, z in nm")
    if box is None:
        box = [v.value_in_unit(unit.nanometer) for v in system.getDefaultPeriodicBoxVectors()]
    box0 = _array(box, (3, 3), "box", unit.nanometer, "pass the three box vectors as rows, in nm")
    vel0 = None if velocities is None else _array(velocities, (n, 3), "velocities", unit.nanometer / unit.picosecond,
                                                  f"pass {n} rows in nm/ps, or None to draw them at the temperature")

    checkpoint = None if checkpoint is None else Path(checkpoint)
    resume = checkpoint is not None and checkpoint.is_file()
    records, saves, start = ProtocolRecords.empty(plan.metadata), {}, 0
    if resume:
        records, saves, chk_bytes, start = _read_checkpoint(checkpoint, plan, n, platform.getName())

    integrator = openmm.LangevinMiddleIntegrator(t0 * unit.kelvin, plan.friction / unit.picosecond,
                                                 plan.timestep * unit.picosecond)

    def reseed(step):
        s = _segment_seed(seed, step)
        integrator.setRandomNumberSeed(s)
        if baro_index is not None:
            system.getForce(baro_index).setRandomNumberSeed(s)

    reseed(start)
    try:
        context = openmm.Context(system, integrator, platform, props)
    except Exception as e:  # OpenMMException: e.g. a box smaller than twice the cutoff
        raise EnpcgError(f"OpenMM could not create a Context for this System on {platform.getName()}: {e}") from None
    if resume:
        try:
            context.loadCheckpoint(chk_bytes)
        except Exception as e:
            raise EnpcgError(f"checkpoint {checkpoint} could not be loaded ({e}); checkpoints are specific to the "
                             "platform and OpenMM version. Fix: resume on the same platform, or delete it to start "
                             "over") from None
    else:
        context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box0])
        context.setPositions(pos0 * unit.nanometer)
        if vel0 is None:
            context.setVelocitiesToTemperature(t0 * unit.kelvin, openmm_seed(seed))
        else:
            context.setVelocities(vel0 * unit.nanometer / unit.picosecond)
        context.setTime(0.0)
        context.setStepCount(0)

    pv = None if plan.pressure is None else plan.pressure * _BAR_NM3_IN_KJ_PER_MOL
    current_t = [None]

    def set_thermostat(temperature):
        if temperature != current_t[0]:
            integrator.setTemperature(temperature * unit.kelvin)
            if baro_index is not None:
                context.setParameter(openmm.MonteCarloBarostat.Temperature(), temperature)
            current_t[0] = temperature

    def record(step):
        state = context.getState(getEnergy=True)
        u = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        k = state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
        vol = state.getPeriodicBoxVolume().value_in_unit(unit.nanometer ** 3)
        records._append({
            "step": step, "time": step * plan.timestep, "set_temperature": plan.set_temperature(step),
            "kinetic_temperature": 2.0 * k / (dof * R_KJ_PER_MOL_K), "potential_energy": u, "kinetic_energy": k,
            "volume": vol, "density": total_mass / vol * _AMU_PER_NM3_IN_G_PER_CM3, "number_density": massive / vol,
            "enthalpy": (u + k + pv * vol) if pv is not None else np.nan})

    def save(step):
        state = context.getState(getPositions=True)
        saves[step] = (state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                       state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))

    def is_record(step):
        return step % plan.record_interval == 0 or step == plan.n_steps

    # Checkpoints (each re-seeds and reinitializes the Context) at most every `ckpt_steps`: reinitializing
    # restarts the barostat's move counter, so checkpoints closer than a few barostat periods would suppress
    # volume moves (every record at a 16-step interval with moves every 25 steps froze the box), and on GPUs a
    # reinitialization costs far more than a step. At most about 100 per run.
    ckpt_steps = max(plan.record_interval, 20 * int(barostat_frequency), plan.n_steps // 100)
    last_ckpt = [start]

    def after_record(step):
        if checkpoint is not None and (step == start or step - last_ckpt[0] >= ckpt_steps or step == plan.n_steps):
            if step != start:  # a fresh stream from (seed, step), as a resumed run starts with
                reseed(step)
                context.reinitialize(preserveState=True)
            _write_checkpoint(checkpoint, records, saves, context, step, plan, n, platform.getName())
            last_ckpt[0] = step
        if callback is not None:
            callback(records)

    stop = plan.n_steps if max_steps is None else min(plan.n_steps, int(max_steps))
    save_steps = [int(s) for s in plan.save_steps]
    if not resume:
        if 0 in save_steps:
            save(0)
        record(0)
        after_record(0)
    step = start
    bar = tqdm(total=plan.n_steps, initial=start, unit="step", desc=plan.name, disable=not progress,
               dynamic_ncols=True)
    try:
        while step < stop:
            nxt = min(stop, (step // plan.block + 1) * plan.block,
                      (step // plan.record_interval + 1) * plan.record_interval)
            later = [s for s in save_steps if s > step]
            if later:
                nxt = min(nxt, later[0])
            set_thermostat(_block_temperature(plan, step))
            integrator.step(nxt - step)
            bar.update(nxt - step)
            step = nxt
            if step in save_steps:
                save(step)
            if is_record(step):
                record(step)
                after_record(step)
    finally:
        bar.close()
    state = context.getState(getPositions=True, getVelocities=True)
    final = (state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
             state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond),
             state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))
    return records, saves, final, step >= plan.n_steps


def _common_checks(timestep, friction, pressure, record_interval=None):
    timestep = _positive("timestep (ps)", timestep)
    friction = _positive("friction (1/ps)", friction)
    pressure = None if pressure is None else _positive("pressure (bar)", pressure, allow_zero=True)
    ri = None if record_interval is None else _positive_int("record_interval", record_interval)
    return timestep, friction, pressure, ri


# ------------------------------------------------------------------------------------------- equilibrate
def _drift_check(name, unit_label, t, y, n_blocks, n_se):
    from scipy import stats

    tb = np.array([b.mean() for b in np.array_split(t, n_blocks)])
    yb = np.array([b.mean() for b in np.array_split(y, n_blocks)])
    fit = stats.linregress(tb, yb)
    slope, se = float(fit.slope), float(fit.stderr)
    passed = abs(slope) <= n_se * se if se > 0 else slope == 0
    msg = (f"{name}: slope of the {n_blocks} block means over the last half {slope:.4g} {unit_label}/ps, "
           f"standard error {se:.3g}: {'within' if passed else 'beyond'} {n_se:g} standard errors of zero")
    return EquilibrationCheck(name, slope, se, n_se * se, bool(passed), msg)


def _temperature_check(t_kin, t_set, n_blocks, n_se):
    blocks = np.array([b.mean() for b in np.array_split(t_kin, n_blocks)])
    diff = float(blocks.mean() - t_set)
    se = float(blocks.std(ddof=1) / math.sqrt(n_blocks))
    passed = abs(diff) <= n_se * se
    msg = (f"kinetic_temperature: mean {blocks.mean():.4g} K over the last half against the set {t_set:.4g} K, "
           f"difference {diff:.3g} K, block standard error {se:.3g} K: {'within' if passed else 'beyond'} "
           f"{n_se:g} standard errors")
    return EquilibrationCheck("kinetic_temperature", diff, se, n_se * se, bool(passed), msg)


def equilibrate(system, positions, box=None, *, temperature, pressure=None, timestep, friction, steps,
                velocities=None, sample_interval=None, n_blocks: int = 10, n_se: float = 3.0, strict: bool = False,
                seed: int = 0, barostat_frequency: int = 25, platform=None, properties=None,
                checkpoint=None, progress: bool = True) -> EquilibrationResult:
    """Langevin NVT (NPT when ``pressure`` is given) at one temperature, then equilibration checks.

    Parameters
    ----------
    system : openmm.System
        Any periodic System (not modified; a barostat is added to a copy).
    positions : array (N, 3) or Quantity
        Starting positions, nm.
    box : array (3, 3) or Quantity, optional
        Box vectors as rows, nm; default the System's default box.
    temperature : float
        Set temperature, K.
    pressure : float, optional
        Set pressure, bar (MonteCarloBarostat, isotropic); None for NVT.
    timestep : float
        ps.
    friction : float
        Langevin friction, 1/ps.
    steps : int
        MD steps.
    velocities : array (N, 3), optional
        nm/ps; default drawn from Maxwell-Boltzmann at ``temperature``.
    sample_interval : int, optional
        Steps between samples; default max(1, steps // 400).
    n_blocks : int
        Blocks over the last half (>= 3; each needs >= 2 samples).
    n_se : float
        Tolerance in standard errors.
    strict : bool
        Raise EnpcgError when a check fails (else warn with :class:`EquilibrationWarning`).
    seed : int
        Velocities, thermostat and barostat random streams.
    barostat_frequency : int
        Steps between Monte Carlo volume moves.
    platform : str or openmm.Platform, optional
        Default the fastest available.
    properties : dict, optional
        Platform properties, e.g. {"Threads": "1"}.
    checkpoint : path, optional
        Resumable run (see the module docstring).
    progress : bool
        tqdm progress bar.

    Returns
    -------
    EquilibrationResult
        Final positions (nm), velocities (nm/ps), box (nm), the samples (records), the checks and ``passed``.
        Checks, on the samples with step >= steps / 2 split into ``n_blocks`` contiguous blocks: the slope of a
        linear fit of block means against time, for the potential energy (kJ/mol/ps) and, under NPT, the
        density (g/cm^3/ps), must lie within ``n_se`` standard errors (of the fitted slope) of zero; the mean
        kinetic temperature must equal the set temperature within ``n_se`` block standard errors.
    """
    temperature = _positive("temperature (K)", temperature)
    timestep, friction, pressure, _ = _common_checks(timestep, friction, pressure)
    steps = _positive_int("steps", steps)
    n_blocks = int(n_blocks)
    if n_blocks < 3:
        raise EnpcgError(f"n_blocks must be >= 3 for a slope with an error; you supplied {n_blocks}")
    sample_interval = max(1, steps // 400) if sample_interval is None else _positive_int("sample_interval",
                                                                                          sample_interval)
    # Samples at multiples of sample_interval with step >= steps / 2 (the last step is recorded too).
    n_last = steps // sample_interval - (math.ceil(steps / 2) - 1) // sample_interval
    if n_last < 2 * n_blocks:
        raise EnpcgError(f"equilibrate: {n_last} samples in the last half (steps={steps}, sample_interval="
                         f"{sample_interval}) but n_blocks={n_blocks} needs >= {2 * n_blocks}. Fix: run longer, "
                         "sample more often (smaller sample_interval) or use fewer blocks")
    meta = {"protocol": "equilibrate", "temperature": temperature, "pressure": pressure, "timestep": timestep,
            "friction": friction, "steps": steps, "record_interval": sample_interval, "seed": int(seed),
            "barostat_frequency": int(barostat_frequency)}
    plan = _Plan("equilibrate", steps, timestep, friction, pressure, sample_interval, lambda s: temperature,
                 block=steps, save_steps=np.zeros(0, dtype=np.int64), metadata=meta)
    records, _, (pos, vel, box_f), done = _drive(
        system, positions, box, velocities, plan, seed=seed, platform=platform, properties=properties,
        barostat_frequency=barostat_frequency, checkpoint=checkpoint, max_steps=None, callback=None,
        progress=progress)

    last = records.step >= steps / 2
    t = records.time[last]
    checks = [_drift_check("potential_energy_drift", "kJ/mol", t, records.potential_energy[last], n_blocks, n_se)]
    if pressure is not None:
        checks.append(_drift_check("density_drift", "g/cm^3", t, records.density[last], n_blocks, n_se))
    checks.append(_temperature_check(records.kinetic_temperature[last], temperature, n_blocks, n_se))
    passed = all(c.passed for c in checks)
    if not passed:
        failed = "; ".join(c.message for c in checks if not c.passed)
        msg = (f"equilibrate: the run of {steps} steps ({steps * timestep:g} ps) is not equilibrated: {failed}. "
               "Fix: run longer (increase steps), starting from this result's positions, velocities and box")
        if strict:
            raise EnpcgError(msg)
        warnings.warn(msg, EquilibrationWarning, stacklevel=2)
    return EquilibrationResult(records=records, positions=pos, velocities=vel, box=box_f, completed=done,
                               checkpoint=None if checkpoint is None else Path(checkpoint), checks=checks,
                               passed=passed)


# ------------------------------------------------------------------------------------------------ quench
def quench(system, positions, box=None, *, t_start, t_end, cooling_rate, pressure, timestep, friction,
           record_interval, checkpoint=None, seed: int = 0, progress: bool = True, velocities=None,
           temperature_update_interval: int = 10, barostat_frequency: int = 25, platform=None, properties=None,
           max_steps=None, callback=None) -> ProtocolResult:
    """NPT quench: the set temperature falls linearly in time from ``t_start`` to ``t_end`` at ``cooling_rate``.

    Parameters
    ----------
    system : openmm.System
        Any periodic System (not modified; a MonteCarloBarostat is added to a copy). Works with NonbondedForce,
        CustomNonbondedForce, bonded and TorchForce potentials alike (the barostat only needs energies).
    positions : array (N, 3) or Quantity
        Starting positions, nm (ideally equilibrated at ``t_start``).
    box : array (3, 3), optional
        Box vectors as rows, nm; default the System's.
    t_start, t_end : float
        Start and end set temperatures, K (t_start > t_end > 0).
    cooling_rate : float
        K/ps (> 0). The run lasts ceil((t_start - t_end) / (cooling_rate * timestep)) steps; the set temperature
        at time t is max(t_end, t_start - cooling_rate * t).
    pressure : float
        bar (>= 0).
    timestep : float
        ps.
    friction : float
        Langevin friction, 1/ps (LangevinMiddleIntegrator).
    record_interval : int
        Steps between records.
    checkpoint : path, optional
        Resumable .npz checkpoint (see the module docstring); rerun with the same arguments to continue.
    seed : int
        Velocities, thermostat and barostat random streams.
    progress : bool
        tqdm progress bar.
    velocities : array (N, 3), optional
        nm/ps; default Maxwell-Boltzmann at ``t_start``.
    temperature_update_interval : int
        Steps per thermostat update: the integrator and barostat temperature is constant over each block of
        this many steps (counted from step 0) at the ramp's value at the block midpoint, so its time average
        follows the ramp exactly.
    barostat_frequency : int
        Steps between Monte Carlo volume moves.
    platform : str or openmm.Platform, optional
    properties : dict, optional
        Platform properties, e.g. {"Threads": "1"}.
    max_steps : int, optional
        Stop once this many steps (counted from the start of the quench) are done; ``completed`` is then False
        and a rerun with the same checkpoint continues from its last record.
    callback : callable, optional
        ``callback(records)`` after every record (after the checkpoint is written); an exception raised there
        stops the run (the checkpoint holds everything up to that record).

    Returns
    -------
    ProtocolResult
        Records (``set_temperature`` is exactly t_start - cooling_rate * time), final positions (nm),
        velocities (nm/ps), box (nm).
    """
    t_start = _positive("t_start (K)", t_start)
    t_end = _positive("t_end (K)", t_end)
    if not t_end < t_start:
        raise EnpcgError(f"quench cools: t_end must be below t_start; you supplied t_start={t_start} K, "
                         f"t_end={t_end} K. Fix: swap them (heating is not a quench)")
    cooling_rate = _positive("cooling_rate (K/ps)", cooling_rate)
    if pressure is None:
        raise EnpcgError("quench runs at constant pressure: pressure (bar) is required; you supplied None. "
                         "Fix: pass pressure= in bar (P* = 1 in LJ units is 16.6054 bar)")
    timestep, friction, pressure, record_interval = _common_checks(timestep, friction, pressure, record_interval)
    block = _positive_int("temperature_update_interval", temperature_update_interval)
    # A remainder below 1e-6 of a step is floating-point noise, not a step to run.
    n_steps = int(math.ceil((t_start - t_end) / (cooling_rate * timestep) - 1e-6))
    if n_steps < 1:
        raise EnpcgError(f"quench of {t_start - t_end} K at {cooling_rate} K/ps takes less than one step of "
                         f"{timestep} ps. Fix: lower cooling_rate")

    def ramp(step):
        return max(t_end, t_start - cooling_rate * step * timestep)

    meta = {"protocol": "quench", "t_start": t_start, "t_end": t_end, "cooling_rate": cooling_rate,
            "pressure": pressure, "timestep": timestep, "friction": friction, "record_interval": record_interval,
            "temperature_update_interval": block, "barostat_frequency": int(barostat_frequency), "seed": int(seed),
            "n_steps": n_steps}
    plan = _Plan("quench", n_steps, timestep, friction, pressure, record_interval, ramp, block,
                 np.zeros(0, dtype=np.int64), meta)
    records, _, (pos, vel, box_f), done = _drive(
        system, positions, box, velocities, plan, seed=seed, platform=platform, properties=properties,
        barostat_frequency=barostat_frequency, checkpoint=checkpoint, max_steps=max_steps, callback=callback,
        progress=progress)
    return ProtocolResult(records=records, positions=pos, velocities=vel, box=box_f, completed=done,
                          checkpoint=None if checkpoint is None else Path(checkpoint))


# --------------------------------------------------------------------------------------------------- age
def log_spaced_steps(n_steps: int, n_saves: int, first_step: int = 1) -> np.ndarray:
    """Step 0 plus up to ``n_saves - 1`` log-spaced steps from ``first_step`` to ``n_steps`` (rounded, unique)."""
    n_steps, first_step = int(n_steps), max(1, int(first_step))
    if n_saves < 2 or n_steps < first_step:
        return np.array([0], dtype=np.int64)
    s = np.unique(np.rint(np.geomspace(first_step, n_steps, int(n_saves) - 1)).astype(np.int64))
    return np.concatenate([[0], s]).astype(np.int64)


def age(system, positions, box=None, *, temperature, pressure=None, duration_ps, record_interval, timestep,
        friction, n_saves: int = 20, first_save_ps=None, save_times_ps=None, out_dir=None, checkpoint=None,
        seed: int = 0, velocities=None, barostat_frequency: int = 25, platform=None, properties=None,
        max_steps=None, callback=None, progress: bool = True) -> AgeingResult:
    """Isothermal ageing run (NVT, or NPT with ``pressure``) with configurations at log-spaced waiting times.

    Parameters
    ----------
    system, positions, box, velocities
        As in :func:`quench` (nm, nm/ps).
    temperature : float
        K.
    pressure : float, optional
        bar; None for NVT (``enthalpy`` is then NaN).
    duration_ps : float
        Run length, ps (rounded to whole steps).
    record_interval : int
        Steps between records.
    timestep : float
        ps.
    friction : float
        1/ps.
    n_saves : int
        Configurations kept: the start (waiting time 0) and ``n_saves - 1`` log-spaced waiting times from
        ``first_save_ps`` (default one step) to ``duration_ps``; steps are rounded and duplicates dropped.
    first_save_ps : float, optional
        First non-zero waiting time, ps.
    save_times_ps : array, optional
        Explicit waiting times, ps (rounded to steps; overrides n_saves and first_save_ps).
    out_dir : path, optional
        Writes ``records.npz`` (:meth:`ProtocolRecords.save`) and ``configurations.npz`` (arrays steps,
        times in ps, positions in nm, boxes in nm) there, atomically.
    checkpoint : path, optional
        Resumable run (see the module docstring).
    seed, barostat_frequency, platform, properties, max_steps, callback, progress
        As in :func:`quench`.

    Returns
    -------
    AgeingResult
        Records, saved configurations (unwrapped positions, nm; boxes, nm; waiting times, ps), final state and
        the written paths.
    """
    temperature = _positive("temperature (K)", temperature)
    timestep, friction, pressure, record_interval = _common_checks(timestep, friction, pressure, record_interval)
    duration_ps = _positive("duration_ps", duration_ps)
    n_steps = int(round(duration_ps / timestep))
    if n_steps < 1:
        raise EnpcgError(f"duration_ps={duration_ps} is shorter than one timestep ({timestep} ps). Fix: run longer")
    if save_times_ps is not None:
        times = np.asarray(save_times_ps, dtype=np.float64).ravel()
        if (times.size == 0 or np.any(~np.isfinite(times)) or np.any(times < 0)
                or np.any(times > duration_ps * (1 + 1e-9))):
            raise EnpcgError(f"save_times_ps must be finite waiting times in [0, duration_ps={duration_ps}] ps; you "
                             f"supplied {times.tolist()[:8]}")
        save_steps = np.unique(np.clip(np.rint(times / timestep).astype(np.int64), 0, n_steps))
    else:
        first = 1 if first_save_ps is None else max(1, int(round(_positive("first_save_ps", first_save_ps) / timestep)))
        save_steps = log_spaced_steps(n_steps, int(n_saves), first)
    meta = {"protocol": "age", "temperature": temperature, "pressure": pressure, "duration_ps": duration_ps,
            "timestep": timestep, "friction": friction, "record_interval": record_interval, "seed": int(seed),
            "barostat_frequency": int(barostat_frequency), "n_steps": n_steps,
            "save_steps": [int(s) for s in save_steps]}
    plan = _Plan("age", n_steps, timestep, friction, pressure, record_interval, lambda s: temperature,
                 block=n_steps, save_steps=save_steps, metadata=meta)
    records, saves, (pos, vel, box_f), done = _drive(
        system, positions, box, velocities, plan, seed=seed, platform=platform, properties=properties,
        barostat_frequency=barostat_frequency, checkpoint=checkpoint, max_steps=max_steps, callback=callback,
        progress=progress)
    steps = np.array(sorted(saves), dtype=np.int64)
    n = system.getNumParticles()
    saved_pos = np.stack([saves[s][0] for s in steps]) if steps.size else np.zeros((0, n, 3))
    saved_box = np.stack([saves[s][1] for s in steps]) if steps.size else np.zeros((0, 3, 3))
    rec_path = conf_path = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        rec_path = records.save(out_dir / "records.npz")
        conf_path = out_dir / "configurations.npz"
        with atomic_path(conf_path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, steps=steps, times=steps * timestep, positions=saved_pos, boxes=saved_box,
                         metadata_json=np.array(json.dumps(meta)))
    return AgeingResult(records=records, positions=pos, velocities=vel, box=box_f, completed=done,
                        checkpoint=None if checkpoint is None else Path(checkpoint), save_steps=steps,
                        save_times=steps * timestep, saved_positions=saved_pos, saved_boxes=saved_box,
                        records_path=rec_path, configurations_path=conf_path)
