"""Coarse-grained topology: beads, bead types, masses, molecules and bonded terms.

Units: masses in amu, positions in nm. Bead indices are 0-based. A :class:`CGTopology` is what a fitted
model is bound to; it is stored as JSON inside every model file and beside every CG dataset, and written as a
PDB (with CONECT bond records) that mdtraj and OpenMM read.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .errors import EnpcgError
from .fileio import atomic_write


def canonical_key(types) -> str:
    """Type key of a bonded term or pair, read the same either way: min("A-B-C", "C-B-A")."""
    fwd = "-".join(types)
    rev = "-".join(reversed(list(types)))
    return min(fwd, rev)


def _as_index_array(x, width, name):
    arr = np.asarray(x if x is not None and len(x) else np.zeros((0, width)), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != width:
        raise EnpcgError(f"CGTopology.{name} must be shape (n, {width}); you supplied {arr.shape}")
    return arr


@dataclass
class CGTopology:
    """Beads and bonded structure of a coarse-grained system.

    Attributes
    ----------
    bead_names : list of str, (n_beads,)
    bead_types : list of str, (n_beads,)
    masses : np.ndarray, shape=(n_beads,), float64, amu
    molecule_index : np.ndarray, shape=(n_beads,), int, molecule of each bead (0-based, contiguous)
    bonds, angles, dihedrals : np.ndarray, shape=(n, 2|3|4), int bead indices
    residue_names : list of str, (n_molecules,), residue name written to PDB for each molecule
    exclusion_bonds : int, nonbonded pairs separated by at most this many CG bonds are excluded
    orientations : list of str, (n_beads,), "none" (a point bead), "director" (uniaxial: body axis e_x only)
        or "frame" (a full body frame); default all "none" (see :mod:`enpcg.oriented`)
    body_moments : dict bead type -> (3, 3) list, amu nm^2, mean second moment sum_i m_i d_i d_i^T of the
        bead's atoms about the bead centre in its body frame (from the mapped data); it sets the mass
        distribution of the bead's rigid massive sites in OpenMM (``openmm_plugin.oriented``)
    """

    bead_names: list
    bead_types: list
    masses: np.ndarray
    molecule_index: np.ndarray
    bonds: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    angles: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))
    dihedrals: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    residue_names: list = None
    exclusion_bonds: int = 2
    orientations: list = None
    body_moments: dict = None

    def __post_init__(self):
        n = len(self.bead_names)
        self.bead_names = [str(x) for x in self.bead_names]
        self.bead_types = [str(x) for x in self.bead_types]
        self.masses = np.asarray(self.masses, dtype=np.float64)
        self.molecule_index = np.asarray(self.molecule_index, dtype=np.int64)
        for name, arr in (("bead_types", self.bead_types), ("masses", self.masses),
                          ("molecule_index", self.molecule_index)):
            if len(arr) != n:
                raise EnpcgError(f"CGTopology.{name} has {len(arr)} entries; expected one per bead ({n})")
        self.bonds = _as_index_array(self.bonds, 2, "bonds")
        self.angles = _as_index_array(self.angles, 3, "angles")
        self.dihedrals = _as_index_array(self.dihedrals, 4, "dihedrals")
        for name in ("bonds", "angles", "dihedrals"):
            arr = getattr(self, name)
            if arr.size and (arr.min() < 0 or arr.max() >= n):
                raise EnpcgError(f"CGTopology.{name} refers to bead {arr.max()} but there are {n} beads")
        if self.residue_names is None:
            self.residue_names = ["CG"] * self.n_molecules
        self.exclusion_bonds = int(self.exclusion_bonds)
        if self.orientations is None:
            self.orientations = ["none"] * n
        self.orientations = [str(o) for o in self.orientations]
        if len(self.orientations) != n:
            raise EnpcgError(f"CGTopology.orientations has {len(self.orientations)} entries; expected one per "
                             f"bead ({n})")
        bad = sorted({o for o in self.orientations} - {"none", "director", "frame"})
        if bad:
            raise EnpcgError(f"CGTopology.orientations: unknown kind(s) {bad}; allowed: none, director, frame")
        self.body_moments = {str(k): np.asarray(v, dtype=np.float64).tolist()
                             for k, v in (self.body_moments or {}).items()}

    @property
    def oriented(self) -> bool:
        """True when any bead carries an orientation."""
        return any(o != "none" for o in self.orientations)

    # ----------------------------------------------------------------- sizes and types
    @property
    def n_beads(self) -> int:
        return len(self.bead_names)

    @property
    def n_molecules(self) -> int:
        return int(self.molecule_index.max()) + 1 if self.n_beads else 0

    def type_names(self) -> list:
        """Sorted unique bead type names."""
        return sorted(set(self.bead_types))

    def type_index(self) -> np.ndarray:
        """(n_beads,) int: index of each bead's type in :meth:`type_names`."""
        lookup = {t: i for i, t in enumerate(self.type_names())}
        return np.array([lookup[t] for t in self.bead_types], dtype=np.int64)

    def pair_type_names(self) -> list:
        """Sorted pair keys "A-B" (A <= B) over all type pairs."""
        names = self.type_names()
        return [f"{a}-{b}" for i, a in enumerate(names) for b in names[i:]]

    def pair_type_matrix(self) -> np.ndarray:
        """(n_types, n_types) int: index into :meth:`pair_type_names` for each ordered type pair."""
        names = self.type_names()
        keys = {k: i for i, k in enumerate(self.pair_type_names())}
        m = np.zeros((len(names), len(names)), dtype=np.int64)
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                m[i, j] = keys["-".join(sorted([a, b]))]
        return m

    def term_keys(self, kind: str) -> list:
        """Canonical type key of each bonded term; kind is "bonds", "angles" or "dihedrals"."""
        terms = getattr(self, kind)
        return [canonical_key([self.bead_types[i] for i in t]) for t in terms]

    def term_type_names(self, kind: str) -> list:
        return sorted(set(self.term_keys(kind)))

    def term_type_index(self, kind: str) -> np.ndarray:
        lookup = {k: i for i, k in enumerate(self.term_type_names(kind))}
        return np.array([lookup[k] for k in self.term_keys(kind)], dtype=np.int64)

    # ----------------------------------------------------------------- graph
    def bond_graph_distances(self, max_distance: int) -> list:
        """Pairs (i < j, d) with bond-graph distance 1 <= d <= max_distance."""
        adj = [[] for _ in range(self.n_beads)]
        for i, j in self.bonds:
            adj[i].append(int(j))
            adj[j].append(int(i))
        out = []
        for s in range(self.n_beads):
            dist = {s: 0}
            q = deque([s])
            while q:
                u = q.popleft()
                if dist[u] == max_distance:
                    continue
                for v in adj[u]:
                    if v not in dist:
                        dist[v] = dist[u] + 1
                        q.append(v)
            out.extend((s, v, d) for v, d in dist.items() if v > s)
        return out

    def excluded_pairs(self) -> np.ndarray:
        """(n_excluded, 2) int, i < j: nonbonded pairs within ``exclusion_bonds`` CG bonds of each other."""
        if self.exclusion_bonds <= 0:
            return np.zeros((0, 2), dtype=np.int64)
        pairs = [(i, j) for i, j, _ in self.bond_graph_distances(self.exclusion_bonds)]
        if not pairs:
            return np.zeros((0, 2), dtype=np.int64)
        return np.array(sorted(pairs), dtype=np.int64)

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        d = {
            "bead_names": list(self.bead_names),
            "bead_types": list(self.bead_types),
            "masses": [float(m) for m in self.masses],
            "molecule_index": [int(m) for m in self.molecule_index],
            "bonds": self.bonds.tolist(),
            "angles": self.angles.tolist(),
            "dihedrals": self.dihedrals.tolist(),
            "residue_names": list(self.residue_names),
            "exclusion_bonds": self.exclusion_bonds,
        }
        # Oriented data only when present, so point-bead topologies (and mapping hashes) are unchanged.
        if self.oriented:
            d["orientations"] = list(self.orientations)
        if self.body_moments:
            d["body_moments"] = {k: [list(map(float, row)) for row in v] for k, v in self.body_moments.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CGTopology":
        known = {"bead_names", "bead_types", "masses", "molecule_index", "bonds", "angles", "dihedrals",
                 "residue_names", "exclusion_bonds", "orientations", "body_moments"}
        unknown = set(d) - known
        if unknown:
            raise EnpcgError(f"CG topology has unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**d)

    def save_json(self, path):
        with atomic_write(path) as fh:
            json.dump(self.to_dict(), fh)

    @classmethod
    def load_json(cls, path) -> "CGTopology":
        try:
            with open(path) as fh:
                d = json.load(fh)
        except FileNotFoundError:
            raise EnpcgError(f"{path}: CG topology file not found") from None
        except json.JSONDecodeError as e:
            raise EnpcgError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except (TypeError, EnpcgError) as e:
            raise EnpcgError(f"{path}: {e}") from None

    # ----------------------------------------------------------------- OpenMM / PDB
    def to_openmm_topology(self, box=None):
        """An ``openmm.app.Topology``: one chain and one residue per molecule, bonds declared.

        box : np.ndarray (3, 3) nm, optional, set as periodic box vectors.
        """
        from openmm import app, unit, Vec3

        top = app.Topology()
        atoms = []
        residue = None
        current = -1
        for i in range(self.n_beads):
            m = int(self.molecule_index[i])
            if m != current:
                chain = top.addChain()
                residue = top.addResidue(self.residue_names[m][:4], chain)
                current = m
            atoms.append(top.addAtom(self.bead_names[i], None, residue))
        for i, j in self.bonds:
            top.addBond(atoms[int(i)], atoms[int(j)])
        if box is not None:
            b = np.asarray(box, dtype=float)
            top.setPeriodicBoxVectors([Vec3(*b[k]) for k in range(3)] * unit.nanometer)
        return top

    def write_pdb(self, path, positions, box=None):
        """Write a PDB (positions in nm, box (3, 3) in nm) with one TER-separated chain per molecule and
        CONECT records for every CG bond, atomically. mdtraj and OpenMM read it with bonds."""
        pos = np.asarray(positions, dtype=float) * 10.0  # PDB is in angstrom
        if pos.shape != (self.n_beads, 3):
            raise EnpcgError(f"positions must be shape ({self.n_beads}, 3); you supplied {pos.shape}")
        lines = []
        if box is not None:
            b = np.asarray(box, dtype=float) * 10.0
            la, lb, lc = (np.linalg.norm(b[k]) for k in range(3))
            alpha = np.degrees(np.arccos(np.dot(b[1], b[2]) / (lb * lc)))
            beta = np.degrees(np.arccos(np.dot(b[0], b[2]) / (la * lc)))
            gamma = np.degrees(np.arccos(np.dot(b[0], b[1]) / (la * lb)))
            lines.append(f"CRYST1{la:9.3f}{lb:9.3f}{lc:9.3f}{alpha:7.2f}{beta:7.2f}{gamma:7.2f} P 1           1")
        serial = 0
        serials = []
        chain_ids = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        for i in range(self.n_beads):
            m = int(self.molecule_index[i])
            if i > 0 and m != int(self.molecule_index[i - 1]):
                serial += 1
                lines.append("TER")
            serial += 1
            serials.append(serial)
            name = self.bead_names[i][:4]
            resname = self.residue_names[m][:3]
            x, y, z = pos[i]
            lines.append(
                f"HETATM{serial % 100000:5d} {name:<4s} {resname:>3s} {chain_ids[m % 26]}{(m + 1) % 10000:4d}    "
                f"{x:8.3f}{y:8.3f}{z:8.3f}{1.0:6.2f}{0.0:6.2f}          {'':>2s}"
            )
        lines.append("TER")
        neighbours = [[] for _ in range(self.n_beads)]
        for i, j in self.bonds:
            neighbours[int(i)].append(int(j))
            neighbours[int(j)].append(int(i))
        for i, nb in enumerate(neighbours):
            for k in range(0, len(nb), 4):
                chunk = nb[k:k + 4]
                lines.append("CONECT" + f"{serials[i] % 100000:5d}" + "".join(f"{serials[j] % 100000:5d}" for j in chunk))
        lines.append("END")
        with atomic_write(path) as fh:
            fh.write("\n".join(lines) + "\n")
