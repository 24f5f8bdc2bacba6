"""OpenMM reporter that writes positions AND forces of the simulated Hamiltonian to an H5MD file.

Each frame's positions, forces, box, time, step and potential energy come from one ``State`` (the one
``Simulation`` hands to :meth:`H5MDReporter.report`, requested with forces and energy), so forces belong to
exactly the stored positions. Units: nm, kJ/mol/nm, ps, kJ/mol. Positions are not wrapped into the box, so
molecules stay whole (mapping to CG beads needs whole molecules).

:class:`HealthReporter` checks a running simulation at every report (bead pairs closer than the model's
fitted range, forces above a limit, NaN energies, beads that jumped more than a box width) and stops it with
:class:`SimulationHealthError`, naming the step and the beads. Units: nm, kJ/mol/nm.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
from openmm import unit

from enpcg.errors import EnpcgError
from enpcg.h5md import H5MDWriter

# Architecture docs call it H5MDForceReporter; both names refer to the same class.
__all__ = ["H5MDReporter", "H5MDForceReporter", "topology_to_json", "HealthLimits", "HealthReporter",
           "SimulationHealthError"]


def topology_to_json(topology, atom_subset=None) -> str:
    """Compact JSON description of an ``openmm.app.Topology`` (optionally of ``atom_subset`` only).

    {"format": "openmm-topology-1", "atom_fields": [...], "atoms": [[name, element, residue_name,
    residue_index, chain_index], ...], "bonds": [[i, j], ...]} with indices into the stored atoms.
    """
    atoms = list(topology.atoms())
    keep = list(range(len(atoms))) if atom_subset is None else [int(i) for i in atom_subset]
    new_index = {old: new for new, old in enumerate(keep)}
    rows = []
    for i in keep:
        a = atoms[i]
        rows.append([a.name, a.element.symbol if a.element is not None else "",
                     a.residue.name, a.residue.index, a.residue.chain.index])
    bonds = [[new_index[b[0].index], new_index[b[1].index]] for b in topology.bonds()
             if b[0].index in new_index and b[1].index in new_index]
    return json.dumps({"format": "openmm-topology-1",
                       "atom_fields": ["name", "element", "residue_name", "residue_index", "chain_index"],
                       "atoms": rows, "bonds": bonds})


class H5MDReporter:
    """Write frames with forces to an H5MD file every ``reportInterval`` steps.

    Parameters
    ----------
    path : str or Path, the .h5 output.
    reportInterval : int, steps between frames (frames land on steps that are multiples of it).
    resume : bool, append to an existing file after its last complete frame (see ``enpcg.h5md``).
    flush_every : int, frames buffered before a flush (data, then the frame counter).
    atomSubset : sequence of int, optional, atom indices to store (default: all).
    metadata : dict, optional, stored in ``/parameters/enpcg/metadata``.
    on_flush : callable(simulation), optional, called after each flush (the sampler saves its checkpoint).
    """

    def __init__(self, path, reportInterval, *, resume=False, flush_every=10, atomSubset=None, metadata=None,
                 on_flush=None):
        if int(reportInterval) < 1:
            raise EnpcgError(f"reportInterval must be a positive number of steps; you supplied {reportInterval}")
        if int(flush_every) < 1:
            raise EnpcgError(f"flush_every must be at least 1; you supplied {flush_every}")
        self.path = path
        self._interval = int(reportInterval)
        self._resume = bool(resume)
        self._flush_every = int(flush_every)
        self._subset = None if atomSubset is None else np.asarray(atomSubset, dtype=np.int64)
        self._metadata = dict(metadata or {})
        self._on_flush = on_flush
        self._since_flush = 0
        self.writer = None

    def open(self, simulation):
        """Create (or reopen, when resuming) the writer; called by the first report if not before."""
        if self.writer is not None:
            return self.writer
        system = simulation.system
        n_all = system.getNumParticles()
        idx = np.arange(n_all) if self._subset is None else self._subset
        if idx.size == 0 or idx.min() < 0 or idx.max() >= n_all:
            raise EnpcgError(f"atomSubset must hold indices in 0..{n_all - 1}; you supplied {idx.min()}.."
                             f"{idx.max()}")
        masses = np.array([system.getParticleMass(int(i)).value_in_unit(unit.dalton) for i in idx])
        atoms = list(simulation.topology.atoms())
        if len(atoms) != n_all:
            raise EnpcgError(f"topology has {len(atoms)} atoms but the System has {n_all} particles")
        species = [atoms[int(i)].name for i in idx]
        self.writer = H5MDWriter(self.path, len(idx), masses=masses, species=species,
                                 topology_json=topology_to_json(simulation.topology, self._subset),
                                 metadata=self._metadata, resume=self._resume)
        return self.writer

    def describeNextReport(self, simulation):
        steps = self._interval - simulation.currentStep % self._interval
        # periodic=False: unwrapped positions, molecules stay whole
        return {"steps": steps, "periodic": False, "include": ["positions", "forces", "energy"]}

    def report(self, simulation, state):
        writer = self.open(simulation)
        pos = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        frc = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        if self._subset is not None:
            pos, frc = pos[self._subset], frc[self._subset]
        box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)
        energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        if not np.isfinite(energy):
            raise EnpcgError(f"{self.path}: potential energy is {energy} at step {simulation.currentStep}; the "
                             "simulation blew up. Fix: minimise first or use a smaller time step")
        writer.append(np.asarray(pos), np.asarray(frc), np.asarray(box), state.getTime().value_in_unit(
            unit.picosecond), simulation.currentStep, potential_energy=energy)
        self._since_flush += 1
        if self._since_flush >= self._flush_every:
            self.flush(simulation)

    def flush(self, simulation=None):
        """Write buffered frames and the counter, then call ``on_flush(simulation)``."""
        if self.writer is None:
            return
        self.writer.flush()
        self._since_flush = 0
        if self._on_flush is not None and simulation is not None:
            self._on_flush(simulation)

    def close(self, simulation=None):
        """Flush (calling ``on_flush`` when a simulation is given) and close the file."""
        if self.writer is None:
            return
        try:
            self.flush(simulation)
        finally:
            self.writer.close()

    def __del__(self):
        try:
            if self.writer is not None:
                self.writer.close()
        except Exception:
            pass


H5MDForceReporter = H5MDReporter


# ------------------------------------------------------------------------------------------ health checks
HEALTH_FIX = ("Fix: use a smaller time step, start from a minimised or mapped structure without overlapping "
              "beads, or check the model (one fitted on too few frames, or driven outside its fitted range, "
              "is unstable); the limits are settings (min_distance nm, max_force kJ/mol/nm)")
_NAMED = 5  # beads or pairs named in a message; the count says how many more there are


class SimulationHealthError(EnpcgError):
    """A health check failed at a report. ``step`` (int), ``time_ps`` (float), ``beads`` (indices of every
    bead named in the problems, sorted), ``problems`` (list of str, one per failed check)."""

    def __init__(self, message, *, step, time_ps, beads, problems):
        super().__init__(message)
        self.step, self.time_ps, self.beads, self.problems = int(step), float(time_ps), list(beads), list(problems)


@dataclass
class HealthLimits:
    """What :class:`HealthReporter` checks at every report (units nm, kJ/mol/nm).

    min_distance : nm or None. Stop when two beads that are not an excluded (bonded) pair are closer: the
        model's fitted range ends at the smallest pair distance of its training data, and below it the model
        extrapolates (``enpcg simulate`` derives the limit from the model; see ``pipeline.fitted_pair_range``).
    max_force : kJ/mol/nm or None. Stop when the force on one bead exceeds it at a report (a blow-up, or a
        time step too large for the stiffest term). The default 1e6 moves a 56 amu bead 0.9-1.8 nm in one
        0.01 ps step from rest: no integrator survives it. A lower limit would stop runs that recover: fitted
        dihedral tables give forces ~1/sin(theta) at nearly straight angles (measured with MS-CG splines
        fitted on 30 frames of a 6-chain melt: 1e3 kJ/mol/nm typically, 1e4-1e5 with an angle table whose
        minimum is at pi; the demo's 200-frame spline and MS-CG models stay below 1e5 over 100 ps).
    check_displacement : stop when a bead moved more than the smallest box width since the last report
        (unwrapped positions): no physical motion does that between reports, a blow-up does.
    excluded_pairs : (m, 2) int, pairs exempt from ``min_distance`` (bonded neighbours sit closer than
        non-bonded ones); None exempts none.
    min_distance_source : words on where ``min_distance`` came from, quoted in the message.
    Energies that are NaN or infinite, and non-finite positions or forces, always stop the run. The starting
    state (``check(..., start=True)``) is checked for those and for ``min_distance`` only: a minimiser can end
    on a cusp of a fitted table with one large force, which dynamics then handles, or the reports catch.
    """

    min_distance: Optional[float] = None
    max_force: Optional[float] = 1e6
    check_displacement: bool = True
    excluded_pairs: Optional[np.ndarray] = None
    min_distance_source: str = ""

    def __post_init__(self):
        for name in ("min_distance", "max_force"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise EnpcgError(f"health limit {name} must be a positive number or None; you supplied {value!r}")


class HealthReporter:
    """OpenMM reporter that checks the state every ``reportInterval`` steps and raises
    :class:`SimulationHealthError` naming the step and the beads when a :class:`HealthLimits` check fails.

    Put it first in ``simulation.reporters`` (or call :meth:`check` yourself before writing a frame) so that
    no bad frame is written. Positions are requested unwrapped, so the displacement between reports is the
    real one. Call :meth:`check` once before dynamics to check the start and set the displacement baseline.
    """

    def __init__(self, reportInterval, limits: Optional[HealthLimits] = None):
        if int(reportInterval) < 1:
            raise EnpcgError(f"reportInterval must be a positive number of steps; you supplied {reportInterval}")
        self._interval = int(reportInterval)
        self.limits = limits if limits is not None else HealthLimits()
        self._previous = None  # (step, unwrapped positions (n, 3) nm) of the last good report
        self._labels = None
        self._pairs = None

    def describeNextReport(self, simulation):
        steps = self._interval - simulation.currentStep % self._interval
        return {"steps": steps, "periodic": False, "include": ["positions", "forces", "energy"]}

    def report(self, simulation, state):
        self.check(simulation, state)

    def _label(self, simulation, i):
        if self._labels is None:
            self._labels = [f"{a.name}, {a.residue.name} {a.residue.index}" for a in simulation.topology.atoms()]
        return f"bead {i} ({self._labels[i]})" if i < len(self._labels) else f"bead {i}"

    def _close_pairs(self, pos, box):
        """(i, j, r) of non-excluded pairs closer than min_distance, closest first (vesin cell list, O(n))."""
        import torch

        from enpcg.neighbors import PairList

        n = pos.shape[0]
        if self._pairs is None:
            excluded = np.zeros((0, 2), dtype=np.int64) if self.limits.excluded_pairs is None else \
                np.asarray(self.limits.excluded_pairs, dtype=np.int64).reshape(-1, 2)
            self._pairs = PairList(n, float(self.limits.min_distance), excluded, "vesin", compact=True)
        x = torch.as_tensor(pos, dtype=torch.float64).unsqueeze(0)
        b = None if box is None else torch.as_tensor(box, dtype=torch.float64).unsqueeze(0)
        with torch.no_grad():
            _, i, j, d = self._pairs(x, b)
        r = torch.linalg.norm(d, dim=-1).numpy()
        order = np.argsort(r, kind="stable")
        return i.numpy()[order], j.numpy()[order], r[order]

    def check(self, simulation, state, start=False):
        """Check one State (positions unwrapped, forces, energy); raise SimulationHealthError if it fails.
        ``start``: the state before dynamics (no force limit; sets the displacement baseline)."""
        step = int(simulation.currentStep)
        t = state.getTime().value_in_unit(unit.picosecond)
        pos = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
        frc = np.asarray(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer),
                         dtype=np.float64)
        energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        box = None
        periodic = simulation.system.usesPeriodicBoundaryConditions()
        if periodic or simulation.topology.getPeriodicBoxVectors() is not None:
            box = np.asarray(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))
        lim = self.limits
        problems, beads = [], set()

        def name_beads(idx, values=None, fmt=""):
            idx = [int(i) for i in idx]
            beads.update(idx)
            parts = [self._label(simulation, i) + ("" if values is None else f" {fmt.format(values[k])}")
                     for k, i in enumerate(idx[:_NAMED])]
            more = f" and {len(idx) - _NAMED} more" if len(idx) > _NAMED else ""
            return ", ".join(parts) + more

        bad_pos = np.flatnonzero(~np.isfinite(pos).all(axis=1))
        bad_frc = np.flatnonzero(~np.isfinite(frc).all(axis=1))
        fmag = np.linalg.norm(np.where(np.isfinite(frc), frc, 0.0), axis=1)
        if not np.isfinite(energy):
            culprits = bad_frc if bad_frc.size else bad_pos if bad_pos.size else np.argsort(-fmag)[:3]
            problems.append(f"potential energy is {'NaN' if np.isnan(energy) else energy} kJ/mol; "
                            f"{'non-finite forces on' if bad_frc.size else 'largest forces on'} "
                            f"{name_beads(culprits)}")
        elif bad_frc.size:
            problems.append(f"non-finite forces on {name_beads(bad_frc)}")
        if bad_pos.size:
            problems.append(f"non-finite positions of {name_beads(bad_pos)}")
        if lim.max_force is not None and not start:
            over = np.flatnonzero(fmag > lim.max_force)
            if over.size:
                over = over[np.argsort(-fmag[over], kind="stable")]
                problems.append(f"force above max_force = {lim.max_force:g} kJ/mol/nm on {over.size} bead(s): "
                                f"{name_beads(over, fmag[over], '|F| = {:.3g} kJ/mol/nm')}")
        finite = bad_pos.size == 0
        if lim.check_displacement and finite and box is not None and self._previous is not None:
            from enpcg.neighbors import perpendicular_widths

            width = float(perpendicular_widths(box).min())
            moved = np.linalg.norm(pos - self._previous[1], axis=1)
            far = np.flatnonzero(moved > width)
            if far.size:
                far = far[np.argsort(-moved[far], kind="stable")]
                problems.append(f"{far.size} bead(s) moved more than the box width {width:.4g} nm since the last "
                                f"report (step {self._previous[0]}): {name_beads(far, moved[far], 'by {:.3g} nm')}")
        if lim.min_distance is not None and finite:
            i, j, r = self._close_pairs(pos, box)
            if r.size:
                src = f" ({lim.min_distance_source})" if lim.min_distance_source else ""
                shown = [f"{self._label(simulation, int(a))} and {self._label(simulation, int(b))} at {d:.4g} nm"
                         for a, b, d in zip(i[:_NAMED], j[:_NAMED], r[:_NAMED])]
                beads.update(int(v) for v in np.concatenate([i, j]))
                more = f" and {r.size - _NAMED} more" if r.size > _NAMED else ""
                problems.append(f"{r.size} non-bonded bead pair(s) closer than min_distance = "
                                f"{lim.min_distance:.4g} nm{src}: " + "; ".join(shown) + more)
        if problems:
            raise SimulationHealthError(f"simulation failed at step {step} (t = {t:.6g} ps): " + "; ".join(problems)
                                        + f". {HEALTH_FIX}", step=step, time_ps=t, beads=sorted(beads),
                                        problems=problems)
        self._previous = (step, pos)
