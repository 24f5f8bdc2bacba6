"""CG dynamics in atomistic time: Langevin frictions fitted on the mapped atomistic diffusion coefficient.

Units: nm, ps, K, 1/ps (frictions), nm^2/ps (diffusion coefficients).

A CG model's free-energy surface is smoother than the atomistic one and the removed degrees of freedom no
longer dissipate momentum, so CG beads diffuse faster than the mapped atoms: the *raw speed-up*
D_CG / D_mapped, at a plain Langevin friction, is typically 2-100. Two ways to recover atomistic time, the user
chooses (``mode``):

* ``"friction"``: one Langevin friction per bead type, fitted so that each type's CG diffusion coefficient
  equals the mapped atomistic one at the calibration temperature. Assumes each bead's friction adds to the
  effective friction of its environment, so that 1/D is close to linear in gamma (exact for a free
  particle, D = k_B T/(m gamma)); each new friction comes from a least-squares line 1/D = a + b gamma through
  every run so far (the first step assumes D proportional to 1/gamma), per type, until every type is within
  ``rel_tol`` (or ``max_iter`` runs: then the line's friction). CG times are then atomistic times.
* ``"time_scale"``: keep the friction and rescale time: t_mapped = s t_CG with s = D_CG / D_mapped (one factor
  for all beads, bead-number weighted over types).

The atomistic reference must be *dynamics*: frames saved often enough to unwrap, from a run whose thermostat
does not dominate the friction (NVE, Nose-Hoover, or Langevin with a friction well below the collision rate);
the diffusion coefficient is measured with :func:`enpcg.dynamics.diffusion_coefficient` from the mean-squared
displacement with the centre-of-mass drift removed.

``fit_friction`` and ``calibrate_time_scale`` return a :class:`DynamicsCalibration` that saves to JSON
(``dynamics.json``) and that :func:`openmm_plugin.simulate.run_simulation` applies (``friction=`` per particle,
``time_scale=``) — ``enpcg simulate --dynamics out/dynamics/dynamics.json`` does so from the command line.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Dict

import numpy as np
import openmm
from openmm import unit

from enpcg.errors import EnpcgError
from enpcg.fileio import atomic_write

from .integrators import attach, langevin_integrator
from .sampling import openmm_seed

MIN_FRICTION = 1e-3  # 1/ps: below this a Langevin run is effectively NVE and cannot go faster


@dataclass
class DynamicsCalibration:
    """A fitted map from CG time to mapped atomistic time (units: K, 1/ps, nm^2/ps).

    mode : "friction" or "time_scale"
    temperature : calibration temperature, K
    target_diffusion : mapped atomistic D per bead type, nm^2/ps
    frictions : Langevin friction per bead type, 1/ps (the fitted ones in "friction" mode, the fixed one in
        "time_scale" mode)
    time_scale : s in t_mapped = s t_CG (1 in "friction" mode)
    raw_speed_up : D_CG / D_mapped per bead type at the initial friction
    initial_friction : 1/ps, the friction at which the raw speed-up was measured
    history : list of {"frictions": {...}, "diffusion": {...}, "stderr": {...}} per CG run
    """

    mode: str
    temperature: float
    target_diffusion: Dict[str, float]
    frictions: Dict[str, float]
    time_scale: float
    raw_speed_up: Dict[str, float]
    initial_friction: Dict[str, float]
    history: list = field(default_factory=list)

    def particle_frictions(self, particle_types) -> np.ndarray:
        """(n_particles,) frictions, 1/ps, for particles labelled by bead type (massless ones: any label)."""
        missing = sorted(set(map(str, particle_types)) - set(self.frictions))
        if missing:
            raise EnpcgError(f"the dynamics calibration has frictions for bead types {sorted(self.frictions)} "
                             f"but the system also has {missing}. Fix: calibrate on a system with the same bead "
                             "types")
        return np.array([self.frictions[str(t)] for t in particle_types], dtype=float)

    def save(self, path):
        with atomic_write(path) as fh:
            json.dump(asdict(self), fh, indent=1)

    @classmethod
    def load(cls, path):
        try:
            with open(path) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise EnpcgError(f"{path}: dynamics calibration not found. Fix: run `enpcg calibrate` first, or "
                             "leave --dynamics empty") from None
        except json.JSONDecodeError as e:
            raise EnpcgError(f"{path}: not a JSON dynamics calibration ({e})") from None
        missing = [k for k in ("mode", "temperature", "frictions", "time_scale") if k not in data]
        if missing:
            raise EnpcgError(f"{path}: fields {missing} are missing. Fix: rewrite it with `enpcg calibrate`")
        data.setdefault("history", [])
        return cls(**data)


# ------------------------------------------------------------------------------------ measuring D in OpenMM
def _indices(groups, n):
    out = {}
    for name, idx in groups.items():
        idx = np.asarray(idx, dtype=np.int64).ravel()
        if idx.size == 0 or idx.min() < 0 or idx.max() >= n:
            raise EnpcgError(f"group {name!r}: particle indices must be non-empty and in [0, {n}); got "
                             f"{idx.size} indices in [{idx.min() if idx.size else None}, "
                             f"{idx.max() if idx.size else None}]")
        out[str(name)] = idx
    return out


def diffusion_from_positions(positions, times, groups) -> dict:
    """Diffusion coefficient per group from unwrapped positions.

    Parameters
    ----------
    positions : (n_frames, n, 3), nm, continuous in time (not wrapped into the box)
    times : (n_frames,), ps, evenly spaced
    groups : {name: particle indices}

    Returns
    -------
    {name: (D nm^2/ps, standard error nm^2/ps)}; the centre-of-mass drift of all listed particles is removed.
    """
    import mdtraj as md

    from enpcg.dynamics import diffusion_coefficient_or_bound, mean_squared_displacement

    pos = np.asarray(positions, dtype=np.float64)
    top = md.Topology()
    chain = top.add_chain()
    for _ in range(pos.shape[1]):
        top.add_atom("X", md.element.argon, top.add_residue("X", chain))
    traj = md.Trajectory(pos, top, time=np.asarray(times, dtype=float))
    masses = np.ones(pos.shape[1])
    result = {}
    for name, idx in groups.items():
        t, msd = mean_squared_displacement(traj, idx, masses=masses, progress=False)
        fit = diffusion_coefficient_or_bound(t, msd, label=f"group {name!r}")
        result[name] = (float(fit["D"]), float(fit["stderr"]))
    return result


def run_diffusion(system, positions, box, groups, *, temperature, friction, timestep, steps, record_interval,
                  equilibration_steps=0, platform=None, seed=0, progress=False) -> dict:
    """Langevin run of ``system`` that measures the diffusion coefficient of each group of particles.

    Parameters
    ----------
    system : openmm.System
    positions : (n, 3), nm
    box : (3, 3), nm, or None
    groups : {name: particle indices} whose mean-squared displacement is measured (for oriented beads: the
        virtual-site centres)
    temperature : K
    friction : float or (n,) array, 1/ps
    timestep : ps
    steps, record_interval, equilibration_steps : int, MD steps
    platform : str or None (CPU, CUDA, ...; None: the fastest usable)

    Returns
    -------
    {name: (D nm^2/ps, standard error nm^2/ps)}
    """
    from tqdm import tqdm

    from .sampling import best_platform

    n = system.getNumParticles()
    groups = _indices(groups, n)
    integrator = langevin_integrator(temperature, friction, timestep, n_particles=n)
    integrator.setRandomNumberSeed(openmm_seed(seed))
    plat = best_platform(platform)
    context = openmm.Context(system, integrator, plat)
    attach(integrator)
    if box is not None:
        context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in np.asarray(box, dtype=float)])
    context.setPositions(np.asarray(positions, dtype=float))
    context.applyConstraints(1e-8)
    context.computeVirtualSites()
    context.setVelocitiesToTemperature(temperature * unit.kelvin, openmm_seed(seed))
    if equilibration_steps:
        integrator.step(int(equilibration_steps))
    tracked = np.unique(np.concatenate(list(groups.values())))
    where = {name: np.searchsorted(tracked, idx) for name, idx in groups.items()}
    n_records = int(steps) // int(record_interval) + 1
    frames = np.empty((n_records, tracked.size, 3))
    for k in tqdm(range(n_records), desc="CG diffusion", disable=not progress, leave=False):
        if k:
            integrator.step(int(record_interval))
        # Positions straight from the Context are continuous (never wrapped unless asked), so no unwrapping.
        frames[k] = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(
            unit.nanometer)[tracked]
    del context
    times = np.arange(n_records) * record_interval * timestep
    return diffusion_from_positions(frames, times, where)


# ------------------------------------------------------------------------------------------ calibration
def _per_particle(frictions, friction_groups, n):
    gam = np.full(n, np.nan)
    for name, idx in friction_groups.items():
        gam[idx] = frictions[name]
    gam[np.isnan(gam)] = float(np.nanmean(gam))  # particles outside every group (e.g. massless): any value
    return gam


def _next_friction(history, k, inv_target):
    """Friction (1/ps) of bead type ``k`` at which 1/D reaches ``inv_target`` (ps/nm^2).

    1/D is close to linear in gamma (additive frictions; exact for a free particle), so a least-squares line
    1/D = a + b gamma through every run so far averages the noise of the individual D; with one run, or a
    line whose slope is not positive (noise), D is taken proportional to 1/gamma.
    """
    g = np.array([run["frictions"][k] for run in history])
    inv = np.array([1.0 / run["diffusion"][k] for run in history])
    if len(g) >= 2 and np.ptp(g) > 0:
        b, a = np.polyfit(g, inv, 1)
        if b > 0:
            return float((inv_target - a) / b)
    return float(g[-1] * inv_target / inv[-1])


def fit_friction(system, positions, box, groups, target_diffusion, *, temperature, timestep, steps,
                 record_interval, friction_groups=None, initial_friction=1.0, rel_tol=0.05, max_iter=6,
                 equilibration_steps=0, platform=None, seed=0, progress=True) -> DynamicsCalibration:
    """Fit one Langevin friction per bead type so the CG diffusion coefficients match ``target_diffusion``.

    Parameters
    ----------
    system, positions (nm), box (nm) : the CG model as an OpenMM System at the calibration state
    groups : {bead type: particle indices whose diffusion is measured}
    target_diffusion : {bead type: mapped atomistic D, nm^2/ps}
    temperature : K; timestep : ps; steps, record_interval, equilibration_steps : MD steps per CG run
    friction_groups : {bead type: particle indices that carry that type's friction} (default ``groups``; for
        oriented beads the massive sites of the beads, while ``groups`` holds their centres)
    initial_friction : float or {type: float}, 1/ps: the first run; the raw speed-up is measured there
    rel_tol : stop when every |D_CG/D_target - 1| < rel_tol
    max_iter : the most CG runs

    Returns
    -------
    DynamicsCalibration with mode "friction". Raises EnpcgError when a type's CG beads are slower than the
    mapped atoms even at ``MIN_FRICTION`` (no friction can fix that: use ``calibrate_time_scale``).
    """
    n = system.getNumParticles()
    groups = _indices(groups, n)
    friction_groups = groups if friction_groups is None else _indices(friction_groups, n)
    if set(target_diffusion) != set(groups) or set(friction_groups) != set(groups):
        raise EnpcgError(f"target_diffusion types {sorted(target_diffusion)}, groups {sorted(groups)} and "
                         f"friction_groups {sorted(friction_groups)} must name the same bead types")
    for name, d in target_diffusion.items():
        if not (math.isfinite(d) and d > 0):
            raise EnpcgError(f"target_diffusion[{name!r}] must be a positive D in nm^2/ps; got {d!r}")
    if not isinstance(initial_friction, dict):
        initial_friction = {name: float(initial_friction) for name in groups}
    gam = {name: float(initial_friction[name]) for name in groups}
    history = []
    raw = None
    for it in range(int(max_iter)):
        d = run_diffusion(system, positions, box, groups, temperature=temperature,
                          friction=_per_particle(gam, friction_groups, n), timestep=timestep, steps=steps,
                          record_interval=record_interval, equilibration_steps=equilibration_steps,
                          platform=platform, seed=seed + it, progress=progress)
        history.append({"frictions": dict(gam), "diffusion": {k: v[0] for k, v in d.items()},
                        "stderr": {k: v[1] for k, v in d.items()}})
        if raw is None:
            raw = {k: d[k][0] / target_diffusion[k] for k in groups}
        ratios = {k: d[k][0] / target_diffusion[k] for k in groups}
        if progress:
            print(f"friction fit run {it + 1}: " + ", ".join(
                f"{k}: gamma {gam[k]:.4g}/ps D/D_target {ratios[k]:.3f}" for k in sorted(groups)))
        if all(abs(r - 1.0) < rel_tol for r in ratios.values()):
            break
        new = {}
        for k in groups:
            g_new = _next_friction(history, k, 1.0 / target_diffusion[k])
            if g_new < MIN_FRICTION:
                g1 = gam[k]
                if g1 <= MIN_FRICTION * 1.0001:
                    raise EnpcgError(
                        f"bead type {k!r}: the CG beads diffuse {1 / ratios[k]:.2f}x slower than the mapped "
                        f"atoms even at a friction of {g1:.3g}/ps, so no Langevin friction can match them. Fix: "
                        "use mode 'time_scale', or check the CG model and the reference's D")
                g_new = MIN_FRICTION
            new[k] = float(g_new)
        gam = new
    if len(history) >= 2 and not all(abs(history[-1]["diffusion"][k] / target_diffusion[k] - 1) < rel_tol
                                     for k in groups):
        # Not converged within max_iter: the regression over every run is a better estimate than the last
        # run's friction (each D carries a few per cent of noise).
        gam = {k: max(MIN_FRICTION, _next_friction(history, k, 1.0 / target_diffusion[k])) for k in groups}
    else:
        last = history[-1]["diffusion"]
        worst = max(groups, key=lambda k: abs(last[k] / target_diffusion[k] - 1))
        import warnings

        warnings.warn(f"friction fit did not reach rel_tol={rel_tol} in {max_iter} runs (bead type {worst!r}: "
                      f"last D/D_target = {last[worst] / target_diffusion[worst]:.3f}); using the frictions of the "
                      "line 1/D = a + b gamma fitted to every run. Fix: longer CG runs (steps) for less noisy D, "
                      "or a larger max_iter", stacklevel=2)
    return DynamicsCalibration(mode="friction", temperature=float(temperature),
                               target_diffusion={k: float(v) for k, v in target_diffusion.items()},
                               frictions={k: float(v) for k, v in gam.items()}, time_scale=1.0,
                               raw_speed_up=raw, initial_friction={k: float(initial_friction[k]) for k in groups},
                               history=history)


def calibrate_time_scale(system, positions, box, groups, target_diffusion, *, temperature, timestep, steps,
                         record_interval, friction=1.0, equilibration_steps=0, platform=None, seed=0,
                         progress=True) -> DynamicsCalibration:
    """One CG run at ``friction`` (1/ps); s = D_CG / D_mapped, bead-number weighted over types.

    Returns a DynamicsCalibration with mode "time_scale": mapped atomistic time = s x CG time.
    """
    n = system.getNumParticles()
    groups = _indices(groups, n)
    d = run_diffusion(system, positions, box, groups, temperature=temperature, friction=friction,
                      timestep=timestep, steps=steps, record_interval=record_interval,
                      equilibration_steps=equilibration_steps, platform=platform, seed=seed, progress=progress)
    counts = {k: len(v) for k, v in groups.items()}
    s = sum(counts[k] * d[k][0] for k in groups) / sum(counts[k] * target_diffusion[k] for k in groups)
    return DynamicsCalibration(mode="time_scale", temperature=float(temperature),
                               target_diffusion={k: float(v) for k, v in target_diffusion.items()},
                               frictions={k: float(friction) for k in groups}, time_scale=float(s),
                               raw_speed_up={k: d[k][0] / target_diffusion[k] for k in groups},
                               initial_friction={k: float(friction) for k in groups},
                               history=[{"frictions": {k: float(friction) for k in groups},
                                         "diffusion": {k: v[0] for k, v in d.items()},
                                         "stderr": {k: v[1] for k, v in d.items()}}])
