"""Oriented CG data in memory and on disk: positions, body axes, forces and torques of beads.

Units: positions nm, forces kJ/mol/nm, torques kJ/mol, box nm (rows), energies kJ/mol. On disk this is a CG
H5MD file written by :func:`enpcg.mapping.map_trajectory` (or the OpenMM torque reporter) with the extra
per-bead vectors ``torque``, ``body_x``, ``body_y``, ``body_z``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import input_error
from ..topology import CGTopology


@dataclass
class OrientedData:
    """positions (F, n, 3) nm; axes (F, n, 3, 3) (columns e_x, e_y, e_z); forces (F, n, 3) kJ/mol/nm;
    torques (F, n, 3) kJ/mol; box (F, 3, 3) nm or None; topology CGTopology; energies (F,) kJ/mol or None."""

    positions: np.ndarray
    axes: np.ndarray
    forces: np.ndarray
    torques: np.ndarray
    box: Optional[np.ndarray]
    topology: CGTopology
    energies: Optional[np.ndarray] = None

    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])

    def select(self, idx) -> "OrientedData":
        """The frames ``idx`` (any numpy index) as a new OrientedData."""
        pick = (lambda a: None if a is None else a[idx])
        return OrientedData(self.positions[idx], self.axes[idx], self.forces[idx], self.torques[idx],
                            pick(self.box), self.topology, pick(self.energies))


def read_oriented(path, frames=None) -> OrientedData:
    """Read an oriented CG H5MD file (bead positions, forces, torques, body axes, topology)."""
    from ..h5md import read_h5md

    fr = read_h5md(path, frames=frames, require_forces=True)
    missing = [k for k in ("torque", "body_x", "body_y", "body_z") if k not in fr.extra]
    if missing:
        raise input_error(f"lacks the oriented-bead datasets {missing}", path=path,
                          field="particles/all/" + missing[0],
                          fix="map the atomistic trajectory with a mapping whose beads declare `orientation`")
    if fr.topology_json is None:
        raise input_error("has no CG topology", path=path, field="parameters/enpcg/topology_json",
                          fix="write it with enpcg.mapping.map_trajectory")
    topo = CGTopology.from_dict(json.loads(fr.topology_json))
    axes = np.stack([fr.extra["body_x"], fr.extra["body_y"], fr.extra["body_z"]], axis=-1)
    return OrientedData(fr.positions, axes, fr.forces, fr.extra["torque"], fr.box, topo, fr.potential_energy)


def write_oriented(path, data: OrientedData, *, time=None, step=None, metadata=None) -> Path:
    """Write OrientedData as a CG H5MD file (atomically: temporary file, then rename)."""
    from ..fileio import atomic_path
    from ..h5md import H5MDWriter
    from ..mapping import ORIENTED_VECTORS

    path = Path(path)
    nf = data.n_frames
    topo = data.topology
    with atomic_path(path) as tmp:
        with H5MDWriter(tmp, topo.n_beads, masses=topo.masses, species=list(topo.bead_types),
                        topology_json=json.dumps(topo.to_dict()), metadata=metadata or {},
                        extra_vectors=ORIENTED_VECTORS) as w:
            w.append_many(data.positions, data.forces, data.box if data.box is not None else np.zeros((nf, 3, 3)),
                          np.arange(nf, dtype=float) if time is None else time,
                          np.arange(nf) if step is None else step, potential_energy=data.energies,
                          torque=data.torques, body_x=data.axes[..., 0], body_y=data.axes[..., 1],
                          body_z=data.axes[..., 2])
    return path
