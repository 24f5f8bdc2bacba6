"""OpenMM reporter that writes positions AND forces of the simulated Hamiltonian to an H5MD file.

Each frame's positions, forces, box, time, step and potential energy come from one ``State`` (the one
``Simulation`` hands to :meth:`H5MDReporter.report`, requested with forces and energy), so forces belong to
exactly the stored positions. Units: nm, kJ/mol/nm, ps, kJ/mol. Positions are not wrapped into the box, so
molecules stay whole (mapping to CG beads needs whole molecules).
"""
from __future__ import annotations

import json

import numpy as np
from openmm import unit

from enpcg.errors import EnpcgError
from enpcg.h5md import H5MDWriter

# Architecture docs call it H5MDForceReporter; both names refer to the same class.
__all__ = ["H5MDReporter", "H5MDForceReporter", "topology_to_json"]


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
