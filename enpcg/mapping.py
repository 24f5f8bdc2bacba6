"""Atom -> bead mapping: read a mapping file, map positions and forces, map a whole trajectory.

Units: positions and box in nm, forces in kJ/mol/nm, masses in amu. Atom and bead indices are 0-based.

A mapping is a linear operator. Bead positions are ``R = M x`` with the position matrix ``M`` of shape
(n_beads, n_atoms) whose rows sum to 1 (centre of mass, centre of geometry or explicit weights). Bead forces
are ``F_I = sum_{i in I} f_i`` (the force matrix holds 1 for every atom of a bead): for beads that share no
atoms this is the force map that satisfies the consistency condition of Noid et al., J. Chem. Phys. 128,
244114 (2008), so the mapped forces average to the mean force of the CG coordinates. See docs/conventions.md.

Two file formats are read (:func:`load_mapping` picks by extension, then by content):

* enpcg YAML (documented in docs/conventions.md): molecule templates repeated over consecutive atom blocks,
  with an optional ``linear`` generator for chains.
* VOTCA CSG mapping XML (``<cg_molecule>``): beads name atoms as ``resid:resname:atomname``; resolving them
  needs the atomistic topology (``openmm.app.Topology``, ``mdtraj.Topology`` or a PDB path). Each chain of
  that topology is one molecule; it matches the file's ``<ident>`` when its first residue name (or its chain
  id) equals it, and ``resid`` counts residues from 1 within the chain, as VOTCA does within a molecule.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EnpcgError, input_error
from .fileio import atomic_path
from .topology import CGTopology

# Allowed keys of the YAML format, one place (the error messages list them).
YAML_TOP_KEYS = ("exclusion_bonds", "molecules")
YAML_MOLECULE_KEYS = ("name", "count", "n_atoms", "weights", "beads", "linear", "bonds", "angles", "dihedrals")
YAML_BEAD_KEYS = ("name", "type", "atoms", "weights", "orientation")
# Extra per-bead vectors of a CG H5MD file with oriented beads: the mapped torque (kJ/mol) and the body axes
# (unit vectors, the columns of the bead's rotation matrix).
ORIENTED_VECTORS = {"torque": "kJ mol-1", "body_x": "", "body_y": "", "body_z": ""}
ORIENTATION_POINTS = {"frame": 3, "director": 2}  # atom groups that define each kind of body frame
YAML_LINEAR_KEYS = ("atoms_per_bead", "type", "name_prefix")
WEIGHT_SCHEMES = ("mass", "geometry")
TERM_WIDTH = {"bonds": 2, "angles": 3, "dihedrals": 4}

# Allowed children of each VOTCA XML element (VOTCA csg manual, "Mapping file"; csg cgmoleculedef.cc).
VOTCA_CHILDREN = {
    "cg_molecule": ("name", "ident", "topology", "maps"),
    "topology": ("cg_beads", "cg_bonded"),
    "cg_beads": ("cg_bead",),
    "cg_bead": ("name", "type", "mapping", "beads", "symmetry"),
    "cg_bonded": ("bond", "angle", "dihedral"),
    "bond": ("name", "beads"),
    "angle": ("name", "beads"),
    "dihedral": ("name", "beads"),
    "maps": ("map",),
    "map": ("name", "weights"),
}
VOTCA_TERM = {"bond": "bonds", "angle": "angles", "dihedral": "dihedrals"}

# Rounding of floats in the canonical JSON behind Mapping.hash(): equal mappings read from different
# formats must hash equal even when their normalised weights differ in the last bit.
_HASH_DIGITS = 12


# ===================================================================================== resolved molecules
@dataclass
class _MoleculeSpec:
    """One CG molecule resolved to global atom indices (what both file readers produce).

    bead_weights holds per bead either "mass", "geometry" or an explicit (unnormalised) weight array.
    Terms are (label, [bead index within the molecule or bead name, ...]).
    """

    residue_name: str
    bead_names: list
    bead_types: list
    bead_atoms: list
    bead_weights: list
    bead_labels: list
    terms: dict = field(default_factory=lambda: {k: [] for k in TERM_WIDTH})
    bead_orientations: list = None  # per bead None or (kind, [atom index arrays]) with global indices


def _short(x, limit=80) -> str:
    """A bounded repr of a value read from a file (nested and aliased YAML structures are not expanded)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxstring, r.maxother, r.maxlong = 3, 6, 6, 6, 40, 40, 40
    return r.repr(x)[:limit]


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _require_int(value, source, where, minimum):
    if not _is_int(value) or value < minimum:
        raise input_error(f"must be an integer >= {minimum}; received {_short(value)}", path=source, field=where,
                          fix=f"give a whole number >= {minimum}")
    return int(value)


def _require_name(value, source, where):
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise input_error(f"must be a non-empty name; received {_short(value)}", path=source, field=where,
                          fix="give a short text name")
    return str(value).strip()


def _check_keys(d, allowed, source, where, required=()):
    if not isinstance(d, dict):
        raise input_error(f"must be a mapping with keys {list(allowed)}; received {type(d).__name__} "
                          f"{_short(d)}", path=source, field=where, fix="write it as `key: value` lines")
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise input_error(f"unknown key(s) {unknown}; allowed keys: {list(allowed)}", path=source, field=where,
                          fix="remove or rename the unknown keys (check the spelling)")
    missing = [k for k in required if k not in d]
    if missing:
        raise input_error(f"missing required key(s) {missing}", path=source, field=where,
                          fix=f"add {missing}")


def _weight_spec(value, source, where, n):
    """'mass', 'geometry' or an explicit list of n non-negative weights with a positive sum."""
    if isinstance(value, str):
        if value not in WEIGHT_SCHEMES:
            raise input_error(f"unknown weights {value!r}; allowed: {list(WEIGHT_SCHEMES)} or a list of numbers",
                              path=source, field=where, fix="use mass (centre of mass) or geometry")
        return value
    if not isinstance(value, (list, tuple, np.ndarray)) or any(isinstance(v, (bool, str)) for v in value):
        raise input_error(f"must be {list(WEIGHT_SCHEMES)} or a list of numbers; received {_short(value)}",
                          path=source, field=where, fix="give one non-negative number per atom of the bead")
    try:
        w = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # nested lists, dicts, None-like entries
        raise input_error(f"must be {list(WEIGHT_SCHEMES)} or a flat list of numbers; received {_short(value)}",
                          path=source, field=where, fix="give one non-negative number per atom of the bead") from None
    if w.shape != (n,):
        raise input_error(f"has {w.size} weights but the bead has {n} atoms", path=source, field=where,
                          fix="give exactly one weight per atom, in the order of the bead's atoms")
    _check_weight_values(w, source, where)
    return w


def _check_weight_values(w, source, where):
    if not np.all(np.isfinite(w)):
        raise input_error(f"weights must be finite; received {w.tolist()}", path=source, field=where,
                          fix="replace nan/inf weights")
    if np.any(w < 0):
        raise input_error(f"weights must be >= 0; received {w.tolist()}", path=source, field=where,
                          fix="use non-negative weights (they are normalised to sum to 1)")
    if not w.sum() > 0:
        raise input_error(f"weights sum to {w.sum()}; they must have a positive sum", path=source, field=where,
                          fix="give at least one positive weight")


# ===================================================================================== the Mapping
class Mapping:
    """A linear atom -> bead map and the CG topology it defines.

    Attributes
    ----------
    n_atoms, n_beads : int
    bead_atoms : list of np.ndarray, (n_beads,) arrays of int atom indices (0-based) of each bead
    bead_weights : list of np.ndarray, normalised position weights of each bead's atoms (sum to 1)
    atom_masses : np.ndarray, shape=(n_atoms,), float64, amu
    topology : CGTopology (bead masses = sum of atom masses, amu)
    source : str, the mapping file (for messages)

    Built by :func:`load_mapping`; the constructor validates the resolved molecules.
    """

    def __init__(self, molecules, n_atoms, atom_masses, exclusion_bonds=2, source="<mapping>"):
        self.source = str(source)
        self.n_atoms = int(n_atoms)
        self.atom_masses = np.asarray(atom_masses, dtype=np.float64)
        if self.atom_masses.shape != (self.n_atoms,):
            raise input_error(f"atom masses have shape {self.atom_masses.shape}; expected ({self.n_atoms},)",
                              path=self.source, field="masses", fix="pass one mass (amu) per atom of the system")
        owner = np.full(self.n_atoms, -1, dtype=np.int64)
        labels, names, types, atoms, weights, mol_index, residue_names = [], [], [], [], [], [], []
        terms = {k: [] for k in TERM_WIDTH}
        orient = []
        for mol in molecules:
            if not mol.bead_names:
                continue
            orient.extend(mol.bead_orientations or [None] * len(mol.bead_names))
            first = len(names)
            m = len(residue_names)
            residue_names.append(mol.residue_name)
            for name, btype, idx, wspec, label in zip(mol.bead_names, mol.bead_types, mol.bead_atoms,
                                                      mol.bead_weights, mol.bead_labels):
                idx = np.asarray(idx, dtype=np.int64)
                b = len(names)
                self._check_bead_atoms(idx, label, owner, labels)
                owner[idx] = b
                w = self._resolve_weights(wspec, idx, label)
                names.append(name)
                types.append(btype)
                atoms.append(idx)
                weights.append(w / w.sum())
                labels.append(label)
                mol_index.append(m)
            lookup = {}
            for k, name in enumerate(mol.bead_names):
                lookup.setdefault(name, []).append(k)
            n_mol = len(mol.bead_names)
            for kind, entries in mol.terms.items():
                for label, term in entries:
                    local = [self._term_index(x, lookup, n_mol, label) for x in term]
                    if len(local) != TERM_WIDTH[kind]:
                        raise input_error(f"has {len(local)} beads; a {kind[:-1]} needs {TERM_WIDTH[kind]}",
                                          path=self.source, field=label, fix=f"list {TERM_WIDTH[kind]} beads")
                    if len(set(local)) != len(local):
                        raise input_error(f"repeats a bead: {term}", path=self.source, field=label,
                                          fix="list distinct beads")
                    terms[kind].append([first + i for i in local])
        if not names:
            raise input_error("the mapping defines no beads", path=self.source, field="molecules",
                              fix="define at least one bead")
        uncovered = np.flatnonzero(owner < 0)
        if uncovered.size:
            warnings.warn(f"{self.source}: {uncovered.size} of {self.n_atoms} atoms are in no bead and are dropped "
                          f"(first: {uncovered[:10].tolist()}); intended for solvent or other ignored atoms",
                          UserWarning, stacklevel=3)
        self.bead_atoms = atoms
        self.bead_weights = weights
        self.bead_labels = labels
        self.bead_orientations = orient
        for b, o in enumerate(orient):
            if o is not None:
                for g in o[1]:
                    outside = np.setdiff1d(g, atoms[b])
                    if outside.size:
                        raise input_error(f"orientation uses atom {int(outside[0])}, which is not an atom of the "
                                          "bead", path=self.source, field=f"{labels[b]}.orientation",
                                          fix="build the frame from the bead's own atoms")
        self.topology = CGTopology(
            bead_names=names, bead_types=types,
            masses=np.array([self.atom_masses[a].sum() for a in atoms]),
            molecule_index=np.array(mol_index, dtype=np.int64),
            bonds=terms["bonds"], angles=terms["angles"], dihedrals=terms["dihedrals"],
            residue_names=residue_names, exclusion_bonds=exclusion_bonds,
            orientations=["none" if o is None else o[0] for o in orient])
        # Flat arrays for the vectorised maps: entries grouped bead by bead, in bead order.
        self._entry_atoms = np.concatenate(atoms)
        self._entry_weights = np.concatenate(weights)
        sizes = np.array([len(a) for a in atoms])
        self._starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._first_atom = np.array([a[0] for a in atoms], dtype=np.int64)
        self._entry_anchor = np.repeat(self._first_atom, sizes)
        self._position_matrix = None
        self._force_matrix = None

    # ------------------------------------------------------------------------------- validation helpers
    def _check_bead_atoms(self, idx, label, owner, labels):
        if idx.size == 0:
            raise input_error("bead has no atoms", path=self.source, field=label,
                              fix="give the bead at least one atom, or delete it")
        bad = idx[(idx < 0) | (idx >= self.n_atoms)]
        if bad.size:
            raise input_error(f"names atom {int(bad[0])} but the system has {self.n_atoms} atoms "
                              f"(0..{self.n_atoms - 1})", path=self.source, field=label,
                              fix="correct the atom indices or the molecule counts")
        uniq, counts = np.unique(idx, return_counts=True)
        if np.any(counts > 1):
            raise input_error(f"lists atom {int(uniq[counts > 1][0])} more than once", path=self.source,
                              field=label, fix="list each atom once")
        taken = idx[owner[idx] >= 0]
        if taken.size:
            other = labels[owner[taken[0]]]
            raise input_error(f"atom {int(taken[0])} is already in bead {other}; an atom may belong to one bead only",
                              path=self.source, field=label, fix="remove the atom from one of the two beads")

    def _resolve_weights(self, wspec, idx, label):
        if isinstance(wspec, str):
            w = self.atom_masses[idx].copy() if wspec == "mass" else np.ones(idx.size)
            _check_weight_values(w, self.source, f"{label}.weights ({wspec})")
            return w
        w = np.asarray(wspec, dtype=np.float64)
        if w.shape != idx.shape:
            raise input_error(f"has {w.size} weights but the bead has {idx.size} atoms", path=self.source,
                              field=f"{label}.weights", fix="give one weight per atom")
        _check_weight_values(w, self.source, f"{label}.weights")
        return w

    def _term_index(self, x, lookup, n_mol, label):
        if _is_int(x):
            if not 0 <= x < n_mol:
                raise input_error(f"refers to bead {x} but the molecule has {n_mol} beads (0..{n_mol - 1})",
                                  path=self.source, field=label, fix="use bead indices within the molecule")
            return int(x)
        if isinstance(x, str):
            if x not in lookup:
                raise input_error(f"refers to bead {x!r}, which the molecule does not define; beads: "
                                  f"{sorted(lookup)[:20]}", path=self.source, field=label,
                                  fix="use a bead name (or 0-based bead index) of this molecule")
            if len(lookup[x]) > 1:
                raise input_error(f"bead name {x!r} is not unique in the molecule", path=self.source,
                                  field=label, fix="use bead indices or unique bead names")
            return lookup[x][0]
        raise input_error(f"bead references must be indices or names; received {_short(x)}", path=self.source,
                          field=label, fix="use 0-based bead indices")

    # ------------------------------------------------------------------------------- sizes and matrices
    @property
    def n_beads(self) -> int:
        return len(self.bead_atoms)

    @property
    def position_matrix(self) -> np.ndarray:
        """(n_beads, n_atoms) float64: R = M x; each row sums to 1. Dense: meant for checks and small systems."""
        if self._position_matrix is None:
            m = np.zeros((self.n_beads, self.n_atoms))
            for b, (a, w) in enumerate(zip(self.bead_atoms, self.bead_weights)):
                m[b, a] = w
            self._position_matrix = m
        return self._position_matrix

    @property
    def force_matrix(self) -> np.ndarray:
        """(n_beads, n_atoms) float64: F = D f with D = 1 for every atom of a bead (sum of atomic forces)."""
        if self._force_matrix is None:
            m = np.zeros((self.n_beads, self.n_atoms))
            for b, a in enumerate(self.bead_atoms):
                m[b, a] = 1.0
            self._force_matrix = m
        return self._force_matrix

    # ------------------------------------------------------------------------------- maps
    def _frames(self, x, name):
        arr = np.asarray(x, dtype=np.float64)
        single = arr.ndim == 2
        if single:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[1:] != (self.n_atoms, 3):
            raise EnpcgError(f"{name} must be shape (n_frames, {self.n_atoms}, 3) or ({self.n_atoms}, 3) for "
                             f"mapping {self.source}; you supplied {np.shape(x)}")
        return arr, single

    def map_positions(self, positions, box=None) -> np.ndarray:
        """Bead positions, nm.

        positions : (F, n_atoms, 3) or (n_atoms, 3) nm; box : (F, 3, 3) or (3, 3) nm (rows a, b, c in
        OpenMM reduced form) or None for a non-periodic system. Returns (F, n_beads, 3) (or (n_beads, 3)).
        Each bead's atoms are unwrapped by minimum image relative to the bead's first atom before the
        weighted average, so a bead straddling the box boundary maps to the right place; the result is not
        wrapped back into the primary box.
        """
        x, single = self._frames(positions, "positions")
        anchor = x[:, self._first_atom]                                   # (F, n_beads, 3)
        d = x[:, self._entry_atoms] - x[:, self._entry_anchor]             # (F, n_entries, 3)
        if box is not None:
            d = minimum_image(d, _check_box(box, x.shape[0]))
        out = anchor + np.add.reduceat(d * self._entry_weights[None, :, None], self._starts, axis=1)
        return out[0] if single else out

    def map_forces(self, forces) -> np.ndarray:
        """Bead forces F_I = sum_{i in I} f_i, kJ/mol/nm: (F, n_atoms, 3) -> (F, n_beads, 3) (or 2-D -> 2-D)."""
        f, single = self._frames(forces, "forces")
        out = np.add.reduceat(f[:, self._entry_atoms], self._starts, axis=1)
        return out[0] if single else out

    # ------------------------------------------------------------------------------- oriented beads
    @property
    def oriented(self) -> bool:
        """True when any bead declares an orientation (a frame or a director)."""
        return any(o is not None for o in self.bead_orientations)

    def _relative(self, x, box):
        """Atom positions of every entry relative to its bead's first atom, minimum image: (F, n_entries, 3)."""
        d = x[:, self._entry_atoms] - x[:, self._entry_anchor]
        if box is not None:
            d = minimum_image(d, _check_box(box, x.shape[0]))
        return d

    def map_axes(self, positions, box=None) -> np.ndarray:
        """Body axes of every bead, (F, n_beads, 3, 3) (or (n_beads, 3, 3)), columns e_x, e_y, e_z.

        From the centres of geometry of the atom groups the mapping file declares (atoms unwrapped as for
        :meth:`map_positions`): ``frame`` beads get e_x along c_B - c_A and e_y towards c_C; ``director``
        beads e_x along c_B - c_A and a deterministic completion; beads without orientation the identity.
        """
        from .oriented.frames import director_frame, frame_from_points

        x, single = self._frames(positions, "positions")
        nf = x.shape[0]
        out = np.broadcast_to(np.eye(3), (nf, self.n_beads, 3, 3)).copy()
        b = None if box is None else _check_box(box, nf)
        for kind, npts in ORIENTATION_POINTS.items():
            beads = [i for i, o in enumerate(self.bead_orientations) if o is not None and o[0] == kind]
            if not beads:
                continue
            anchor = self._first_atom[beads]
            pts = []
            for k in range(npts):
                c = np.zeros((nf, len(beads), 3))
                for j, bead in enumerate(beads):
                    g = self.bead_orientations[bead][1][k]
                    d = x[:, g] - x[:, anchor[j]][:, None]
                    if b is not None:
                        d = minimum_image(d, b)
                    c[:, j] = d.mean(axis=1)
                pts.append(c)
            out[:, beads] = frame_from_points(*pts) if kind == "frame" else director_frame(*pts)
        return out[0] if single else out

    def _arms(self, x, box):
        """Lever arms r_i - R_I of every entry, (F, n_entries, 3) nm."""
        d = self._relative(x, box)
        centre = np.add.reduceat(d * self._entry_weights[None, :, None], self._starts, axis=1)
        sizes = np.diff(np.append(self._starts, len(self._entry_atoms)))
        return d - np.repeat(centre, sizes, axis=1)

    def map_torques(self, positions, forces, box=None) -> np.ndarray:
        """Mapped torques tau_I = sum_{i in I} (r_i - R_I) x f_i, kJ/mol, (F, n_beads, 3) (or 2-D).

        positions nm and forces kJ/mol/nm of the atoms, shaped as for :meth:`map_positions`. With the
        force map of summed atomic forces, (F_I, tau_I) are the net force and torque on the bead's atoms.
        """
        x, single = self._frames(positions, "positions")
        f, _ = self._frames(forces, "forces")
        if f.shape[0] != x.shape[0]:
            raise EnpcgError(f"positions have {x.shape[0]} frames but forces {f.shape[0]}")
        arms = self._arms(x, box)
        out = np.add.reduceat(np.cross(arms, f[:, self._entry_atoms]), self._starts, axis=1)
        return out[0] if single else out

    def body_second_moments(self, positions, box=None, axes=None) -> np.ndarray:
        """Second moments sum_i m_i d_i d_i^T of every bead's atoms about its centre, in its body frame:
        (F, n_beads, 3, 3) amu nm^2, with d_i = axes^T (r_i - R_I). Defines the rigid body that represents
        an oriented bead in OpenMM (principal moments of inertia follow as tr(C) - C)."""
        x, single = self._frames(positions, "positions")
        if axes is None:
            axes = self.map_axes(x, box)
        axes = np.asarray(axes).reshape(x.shape[0], self.n_beads, 3, 3)
        arms = self._arms(x, box)
        sizes = np.diff(np.append(self._starts, len(self._entry_atoms)))
        q = np.repeat(axes, sizes, axis=1)                                  # (F, n_entries, 3, 3)
        body = np.einsum("feji,fej->fei", q, arms)                          # axes^T arm
        m = self.atom_masses[self._entry_atoms][None, :, None, None]
        out = np.add.reduceat(m * body[..., :, None] * body[..., None, :], self._starts, axis=1)
        return out[0] if single else out

    # ------------------------------------------------------------------------------- identity
    def to_dict(self) -> dict:
        """Canonical, JSON-able description: atoms, rounded normalised weights and the CG topology."""
        def rnd(v):
            return [float(f"{x:.{_HASH_DIGITS}g}") for x in v]

        topo = self.topology.to_dict()
        topo["masses"] = rnd(topo["masses"])
        return {
            "format": "enpcg-mapping/1",
            "n_atoms": self.n_atoms,
            "bead_atoms": [a.tolist() for a in self.bead_atoms],
            "bead_weights": [rnd(w) for w in self.bead_weights],
            "force_map": "sum",
            "topology": topo,
            **({"orientations": [None if o is None else [o[0], [g.tolist() for g in o[1]]]
                                 for o in self.bead_orientations]} if self.oriented else {}),
        }

    def hash(self) -> str:
        """sha256 hex digest of the canonical JSON of :meth:`to_dict` (binds models to mappings)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def __repr__(self):
        return f"Mapping({self.source!r}, n_atoms={self.n_atoms}, n_beads={self.n_beads})"


def _check_box(box, n_frames):
    b = np.asarray(box, dtype=np.float64)
    if b.shape == (3, 3):
        b = np.broadcast_to(b, (n_frames, 3, 3))
    if b.shape != (n_frames, 3, 3):
        raise EnpcgError(f"box must be shape ({n_frames}, 3, 3) or (3, 3) nm; you supplied {np.shape(box)}")
    diag = np.diagonal(b, axis1=1, axis2=2)
    if not np.all(np.isfinite(b)) or np.any(diag <= 0):
        raise EnpcgError("box vectors must be finite with positive diagonal (OpenMM reduced form, rows a, b, c); "
                         "pass box=None for a non-periodic system")
    return b


def minimum_image(d, box):
    """Minimum-image displacements, numpy twin of :func:`enpcg.geometry.minimum_image`.

    d : (F, P, 3) nm; box : (F, 3, 3) nm rows in OpenMM reduced form. Returns (F, P, 3) nm.
    """
    a, b, c = box[:, None, 0], box[:, None, 1], box[:, None, 2]
    d = d - c * np.round(d[..., 2:3] / c[..., 2:3])
    d = d - b * np.round(d[..., 1:2] / b[..., 1:2])
    d = d - a * np.round(d[..., 0:1] / a[..., 0:1])
    return d


# ===================================================================================== YAML reader
def _parse_yaml(text, source, n_atoms):
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise input_error(f"not valid YAML ({e})", path=source, fix="fix the YAML syntax") from None
    except RecursionError:
        raise input_error("not a mapping file: YAML nested too deeply to read", path=source,
                          fix="write the mapping as documented in docs/conventions.md") from None
    _check_keys(doc, YAML_TOP_KEYS, source, "top level", required=("molecules",))
    exclusion_bonds = _require_int(doc.get("exclusion_bonds", 2), source, "exclusion_bonds", 0)
    mols = doc["molecules"]
    if not isinstance(mols, list) or not mols:
        raise input_error(f"must be a non-empty list of molecule templates; received {_short(mols)}",
                          path=source, field="molecules", fix="list at least one molecule (see docs/conventions.md)")
    specs = []
    offset = 0
    for m, mol in enumerate(mols):
        where = f"molecules[{m}]"
        _check_keys(mol, YAML_MOLECULE_KEYS, source, where, required=("name", "n_atoms"))
        res = _require_name(mol["name"], source, f"{where}.name")
        n_mol = _require_int(mol["n_atoms"], source, f"{where}.n_atoms", 1)
        count = mol.get("count", 1)
        if count == "fill":     # as many copies as the remaining atoms hold (system size set elsewhere)
            if n_atoms is None or (n_atoms - offset) % n_mol or n_atoms <= offset:
                raise input_error(f"count: fill needs a known system size that leaves a whole number of "
                                  f"{n_mol}-atom copies; system atoms: {n_atoms}, atoms before this template: "
                                  f"{offset}", path=source, field=f"{where}.count",
                                  fix="pass n_atoms/masses/atom_topology, or give count as a number")
            count = (n_atoms - offset) // n_mol
        count = _require_int(count, source, f"{where}.count", 1)
        if n_atoms is not None and offset + count * n_mol > n_atoms:
            raise input_error(f"{count} copies of {n_mol} atoms need atoms {offset}..{offset + count * n_mol - 1} "
                              f"but the system has {n_atoms} atoms", path=source, field=f"{where}.count",
                              fix="correct count or n_atoms so that all molecules fit in the system")
        default_w = mol.get("weights", "mass")
        if not isinstance(default_w, str):
            raise input_error(f"molecule-level weights must be one of {list(WEIGHT_SCHEMES)}; received "
                              f"{_short(default_w)}", path=source, field=f"{where}.weights",
                              fix="put explicit weight lists on the beads instead")
        _weight_spec(default_w, source, f"{where}.weights", 0)
        beads, terms = _yaml_beads(mol, source, where, n_mol, default_w)
        for copy in range(count):
            start = offset + copy * n_mol
            specs.append(_MoleculeSpec(
                residue_name=res,
                bead_names=[b[0] for b in beads], bead_types=[b[1] for b in beads],
                bead_atoms=[b[2] + start for b in beads], bead_weights=[b[3] for b in beads],
                bead_labels=[f"{b[4]} (copy {copy}, atoms {b[2][0] + start}..)" for b in beads],
                terms=terms,
                bead_orientations=[None if len(b) < 6 or b[5] is None else
                                   (b[5][0], [g + start for g in b[5][1]]) for b in beads]))
        offset += count * n_mol
    return specs, exclusion_bonds, offset


def _yaml_orientation(spec, source, where, n_mol):
    """``{frame: [A, B, C]}`` or ``{director: [A, B]}``; each point an atom index within the molecule or a
    list of them (the group's centre of geometry). Returns (kind, [local atom index arrays])."""
    fix = ("write `orientation: {frame: [A, B, C]}` (e_x along B - A, e_y towards C) or "
           "`orientation: {director: [A, B]}`, each point an atom index or a list of atom indices")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in ORIENTATION_POINTS:
        raise input_error(f"must be a mapping with one key, frame or director; received {_short(spec)}",
                          path=source, field=where, fix=fix)
    kind, points = next(iter(spec.items()))
    need = ORIENTATION_POINTS[kind]
    if not isinstance(points, list) or len(points) != need:
        raise input_error(f"{kind} needs {need} points (atom indices or lists of them); received "
                          f"{_short(points)}", path=source, field=f"{where}.{kind}", fix=fix)
    groups = []
    for k, p in enumerate(points):
        g = [p] if _is_int(p) else p
        if not isinstance(g, list) or not g or not all(_is_int(a) for a in g):
            raise input_error(f"point {k} must be an atom index or a non-empty list of atom indices; received "
                              f"{_short(p)}", path=source, field=f"{where}.{kind}[{k}]", fix=fix)
        bad = [a for a in g if not 0 <= a < n_mol]
        if bad:
            raise input_error(f"atom index {bad[0]} does not exist (0..{n_mol - 1} within the molecule)",
                              path=source, field=f"{where}.{kind}[{k}]", fix="use 0-based indices within the molecule")
        groups.append(np.asarray(g, dtype=np.int64))
    return kind, groups


def _yaml_beads(mol, source, where, n_mol, default_w):
    """Beads (name, type, local atom array, weight spec, label) and bonded terms of one template."""
    has_beads, has_linear = "beads" in mol, "linear" in mol
    if has_beads == has_linear:
        raise input_error("give exactly one of `beads` (explicit list) or `linear` (generator)", path=source,
                          field=where, fix="see docs/conventions.md for both forms")
    beads = []
    terms = {k: None for k in TERM_WIDTH}
    if has_linear:
        lin = mol["linear"]
        _check_keys(lin, YAML_LINEAR_KEYS, source, f"{where}.linear", required=("atoms_per_bead", "type"))
        per = _require_int(lin["atoms_per_bead"], source, f"{where}.linear.atoms_per_bead", 1)
        if n_mol % per:
            raise input_error(f"atoms_per_bead {per} does not divide n_atoms {n_mol}", path=source,
                              field=f"{where}.linear.atoms_per_bead",
                              fix="choose a divisor of n_atoms, or list the beads explicitly")
        btype = _require_name(lin["type"], source, f"{where}.linear.type")
        prefix = str(lin.get("name_prefix", "B"))
        nb = n_mol // per
        for k in range(nb):
            beads.append((f"{prefix}{k + 1}", btype, np.arange(k * per, (k + 1) * per),
                          default_w, f"{where}.linear bead {k}"))
        for kind, width in TERM_WIDTH.items():
            terms[kind] = [(f"{where}.linear {kind}[{k}]", list(range(k, k + width))) for k in range(nb - width + 1)]
    else:
        raw = mol["beads"]
        if not isinstance(raw, list):
            raise input_error(f"must be a list of beads; received {_short(raw)}", path=source,
                              field=f"{where}.beads", fix="write `beads: [{name: B1, type: A, atoms: [0, 1]}, ...]`")
        for b, bead in enumerate(raw):
            bw = f"{where}.beads[{b}]"
            _check_keys(bead, YAML_BEAD_KEYS, source, bw, required=("name", "type", "atoms"))
            name = _require_name(bead["name"], source, f"{bw}.name")
            btype = _require_name(bead["type"], source, f"{bw}.type")
            atoms = bead["atoms"]
            if not isinstance(atoms, list) or not all(_is_int(a) for a in atoms):
                raise input_error(f"must be a list of 0-based atom indices; received {_short(atoms)}",
                                  path=source, field=f"{bw}.atoms", fix="write e.g. atoms: [0, 1, 2]")
            if not atoms:
                raise input_error("bead has no atoms", path=source, field=f"{bw}.atoms",
                                  fix="give the bead at least one atom, or delete it")
            bad = [a for a in atoms if not 0 <= a < n_mol]
            if bad:
                raise input_error(f"atom index {bad[0]} does not exist: the molecule has n_atoms={n_mol} "
                                  f"(indices 0..{n_mol - 1}, 0-based within the molecule)", path=source,
                                  field=f"{bw}.atoms", fix="use 0-based indices within the molecule")
            wspec = _weight_spec(bead.get("weights", default_w), source, f"{bw}.weights", len(atoms))
            orientation = _yaml_orientation(bead["orientation"], source, f"{bw}.orientation", n_mol) \
                if "orientation" in bead else None
            beads.append((name, btype, np.asarray(atoms, dtype=np.int64), wspec, f"{bw} ({name})", orientation))
    for kind, width in TERM_WIDTH.items():
        if kind in mol:
            raw = mol[kind]
            if not isinstance(raw, list) or not all(isinstance(t, (list, tuple)) for t in raw):
                example = list(range(width))
                raise input_error(f"must be a list of {width}-bead lists; received {_short(raw)}",
                                  path=source, field=f"{where}.{kind}", fix=f"write e.g. {kind}: [{example}]")
            terms[kind] = [(f"{where}.{kind}[{k}]", list(t)) for k, t in enumerate(raw)]
        elif terms[kind] is None:
            terms[kind] = []
    return beads, terms


# ===================================================================================== VOTCA reader
def _xml_children(el, source, path, required=()):
    """Children of an XML element grouped by tag, after checking the tags against VOTCA_CHILDREN."""
    allowed = VOTCA_CHILDREN[el.tag]
    groups = {}
    for child in el:
        if not isinstance(child.tag, str):      # comments and processing instructions
            continue
        if child.tag not in allowed:
            hint = " (VOTCA force weights `d` are not supported: enpcg always sums atomic forces)" \
                if child.tag == "d" else ""
            raise input_error(f"unknown element <{child.tag}>{hint}; allowed: {list(allowed)}", path=source,
                              field=path, fix="remove or rename it")
        groups.setdefault(child.tag, []).append(child)
    missing = [t for t in required if t not in groups]
    if missing:
        raise input_error(f"missing element(s) {['<%s>' % t for t in missing]}", path=source, field=path,
                          fix="add them (see the VOTCA csg manual, mapping file)")
    return groups


def _xml_text(groups, tag, source, path):
    els = groups.get(tag, [])
    if len(els) != 1:
        raise input_error(f"needs exactly one <{tag}>; found {len(els)}", path=source, field=path,
                          fix=f"give one <{tag}>")
    text = (els[0].text or "").strip()
    if not text:
        raise input_error(f"<{tag}> is empty", path=source, field=f"{path}/{tag}", fix=f"fill in <{tag}>")
    return text


def _parse_votca(text, source, atom_topology):
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise input_error(f"not valid XML ({e})", path=source, fix="fix the XML syntax") from None
    if root.tag != "cg_molecule":
        raise input_error(f"root element is <{root.tag}>; a VOTCA mapping has root <cg_molecule>", path=source,
                          field="root", fix="use a VOTCA CSG mapping file (one <cg_molecule> per file)")
    top = _xml_children(root, source, "cg_molecule", required=("name", "ident", "topology", "maps"))
    name = _xml_text(top, "name", source, "cg_molecule")
    ident = _xml_text(top, "ident", source, "cg_molecule")
    topo = _xml_children(top["topology"][0], source, "cg_molecule/topology", required=("cg_beads",))
    beads_el = _xml_children(topo["cg_beads"][0], source, "topology/cg_beads", required=("cg_bead",))
    maps = {}
    for k, mel in enumerate(_xml_children(top["maps"][0], source, "cg_molecule/maps").get("map", [])):
        g = _xml_children(mel, source, f"maps/map[{k}]", required=("name", "weights"))
        mname = _xml_text(g, "name", source, f"maps/map[{k}]")
        wtext = _xml_text(g, "weights", source, f"maps/map {mname}")
        try:
            maps[mname] = np.array([float(x) for x in wtext.split()])
        except ValueError:
            raise input_error(f"weights must be numbers; received {wtext!r}", path=source,
                              field=f"maps/map {mname}/weights", fix="list numbers separated by spaces") from None
    beads = []
    for k, bel in enumerate(beads_el["cg_bead"]):
        where = f"cg_beads/cg_bead[{k}]"
        g = _xml_children(bel, source, where, required=("name", "type", "mapping", "beads"))
        bname = _xml_text(g, "name", source, where)
        where = f"cg_bead {bname}"
        btype = _xml_text(g, "type", source, where)
        mapname = _xml_text(g, "mapping", source, where)
        if "symmetry" in g and _xml_text(g, "symmetry", source, where) != "1":
            raise input_error("only spherical beads (symmetry 1) are supported", path=source,
                              field=f"{where}/symmetry", fix="use <symmetry>1</symmetry> or drop the element")
        if mapname not in maps:
            raise input_error(f"refers to map {mapname!r}, which <maps> does not define; maps: {sorted(maps)}",
                              path=source, field=f"{where}/mapping", fix="add the <map> or correct the name")
        atoms = (g["beads"][0].text or "").split()
        if not atoms:
            raise input_error("bead has no atoms", path=source, field=f"{where}/beads",
                              fix="list its atoms as resid:resname:atomname")
        w = maps[mapname]
        if w.size != len(atoms):
            raise input_error(f"has {len(atoms)} atoms but map {mapname!r} has {w.size} weights", path=source,
                              field=f"{where}/beads", fix="give one weight per atom in the <map>")
        _check_weight_values(w, source, f"maps/map {mapname}/weights")
        beads.append((bname, btype, atoms, w, where))
    names = [b[0] for b in beads]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise input_error(f"bead names {dup} are not unique", path=source, field="cg_beads",
                          fix="give every bead of the molecule its own name")
    terms = {k: [] for k in TERM_WIDTH}
    if "cg_bonded" in topo:
        bonded = _xml_children(topo["cg_bonded"][0], source, "topology/cg_bonded")
        for tag, kind in VOTCA_TERM.items():
            for k, el in enumerate(bonded.get(tag, [])):
                g = _xml_children(el, source, f"cg_bonded/{tag}[{k}]", required=("name", "beads"))
                tname = _xml_text(g, "name", source, f"cg_bonded/{tag}[{k}]")
                flat = (g["beads"][0].text or "").split()
                width = TERM_WIDTH[kind]
                if len(flat) % width:
                    raise input_error(f"lists {len(flat)} bead names, not a multiple of {width}", path=source,
                                      field=f"cg_bonded/{tag} {tname}/beads", fix=f"list {width} beads per {tag}")
                for j in range(0, len(flat), width):
                    terms[kind].append((f"cg_bonded/{tag} {tname} #{j // width}", flat[j:j + width]))
    if atom_topology is None:
        raise input_error("a VOTCA mapping names atoms as resid:resname:atomname, so it needs the atomistic "
                          "topology", path=source, field="atom_topology",
                          fix="pass atom_topology= (openmm.app.Topology, mdtraj.Topology or a PDB path)")
    molecules = _atomistic_molecules(atom_topology)
    matched = [mol for mol in molecules if ident in (mol[0], mol[1])]
    if not matched:
        found = sorted({m[0] for m in molecules})
        raise input_error(f"<ident> {ident!r} matches no molecule (chain) of the atomistic topology; molecule "
                          f"names found (first residue of each chain): {found[:20]}", path=source,
                          field="cg_molecule/ident", fix="set <ident> to the atomistic molecule's residue name")
    specs = []
    for mi, (_, chain_id, lookup) in enumerate(matched):
        idx_list = []
        for bname, btype, atoms, w, where in beads:
            idx = []
            for a in atoms:
                if a not in lookup:
                    sample = list(lookup)[:8]
                    raise input_error(f"atom {a!r} is not in molecule {ident!r} (chain {chain_id}) of the "
                                      f"atomistic topology; atoms there look like {sample}", path=source,
                                      field=f"{where}/beads", fix="use resid:resname:atomname with resid counted "
                                      "from 1 within the molecule")
                if lookup[a] is None:
                    raise input_error(f"atom {a!r} is ambiguous: several atoms of chain {chain_id} have that name",
                                      path=source, field=f"{where}/beads", fix="give the atoms unique names")
                idx.append(lookup[a])
            idx_list.append(np.asarray(idx, dtype=np.int64))
        specs.append(_MoleculeSpec(
            residue_name=name, bead_names=list(names), bead_types=[b[1] for b in beads], bead_atoms=idx_list,
            bead_weights=[b[3] for b in beads], bead_labels=[f"{b[4]} (chain {chain_id})" for b in beads],
            terms=terms))
    return specs


def _items(x):
    """openmm exposes chains()/residues()/atoms() as methods, mdtraj as properties."""
    return list(x() if callable(x) else x)


def _load_topology(atom_topology):
    if isinstance(atom_topology, (str, Path)):
        path = Path(atom_topology)
        if not path.exists():
            raise input_error("atomistic topology file not found", path=path, fix="check the path")
        from openmm import app

        return app.PDBFile(str(path)).topology
    return atom_topology


def _atomistic_molecules(atom_topology):
    """[(first residue name, chain id, {"resid:resname:atomname": atom index or None if ambiguous})]."""
    top = _load_topology(atom_topology)
    out = []
    for ci, chain in enumerate(_items(top.chains)):
        residues = _items(chain.residues)
        if not residues:
            continue
        lookup = {}
        for r, res in enumerate(residues, start=1):
            for atom in _items(res.atoms):
                key = f"{r}:{res.name}:{atom.name}"
                lookup[key] = None if key in lookup else int(atom.index)
        chain_id = getattr(chain, "id", None) or getattr(chain, "chain_id", None) or str(ci)
        out.append((residues[0].name, str(chain_id), lookup))
    return out


def _topology_atoms(atom_topology):
    """(n_atoms, masses in amu or None when any atom lacks an element) of an atomistic topology."""
    top = _load_topology(atom_topology)
    atoms = _items(top.atoms)
    masses = []
    for a in atoms:
        el = a.element
        if el is None:
            return len(atoms), None
        m = el.mass
        m = m.value_in_unit(m.unit) if hasattr(m, "value_in_unit") else float(m)
        masses.append(m)
    masses = np.array(masses, dtype=np.float64)
    return len(atoms), (masses if np.all(masses > 0) else None)


# ===================================================================================== public loaders
def _is_votca(path, text):
    suffix = path.suffix.lower()
    if suffix == ".xml":
        return True
    if suffix in (".yaml", ".yml"):
        return False
    return text.lstrip().startswith("<")


def _unknown_masses(path):
    return input_error("atom masses are unknown (needed for bead masses and mass weights)", path=path,
                       field="masses", fix="pass masses= (amu, one per atom), e.g. the masses stored in the "
                       "atomistic H5MD file, or an atom_topology whose atoms have elements")


def load_mapping(path, atom_topology=None, n_atoms=None, masses=None) -> Mapping:
    """Read a mapping file (enpcg YAML or VOTCA XML, by extension, else by content).

    path : mapping file. atom_topology : openmm.app.Topology, mdtraj.Topology or PDB path (needed for
    VOTCA; optional for YAML, where it fixes n_atoms and may supply element masses). n_atoms : atoms in the
    atomistic system (default: from masses, the topology, or the YAML molecule blocks). masses : (n_atoms,)
    amu; default: element masses from atom_topology. United-atom systems must pass masses explicitly (e.g.
    ``read_h5md(path, frames=[0]).masses``): element masses would ignore the hydrogens.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise input_error("mapping file not found", path=path, fix="check the path") from None
    except UnicodeDecodeError as e:
        raise input_error(f"not a text file ({e})", path=path,
                          fix="pass a YAML or VOTCA XML mapping file (UTF-8 text)") from None
    except OSError as e:  # a directory, no permission, ...
        raise input_error(f"cannot read the mapping file ({e.strerror or e})", path=path,
                          fix="pass the path of a readable mapping file") from None
    sizes = {}
    if n_atoms is not None:
        sizes["n_atoms"] = _require_int(n_atoms, path, "n_atoms argument", 1)
    if masses is not None:
        masses = np.asarray(masses, dtype=np.float64)
        if masses.ndim != 1:
            raise input_error(f"masses must be shape (n_atoms,) amu; you supplied {masses.shape}", path=path,
                              field="masses", fix="pass one mass per atom")
        sizes["masses"] = masses.size
    top_masses = None
    if atom_topology is not None:
        sizes["atom_topology"], top_masses = _topology_atoms(atom_topology)
    if len(set(sizes.values())) > 1:
        raise input_error(f"atom counts disagree: {sizes}", path=path, field="n_atoms",
                          fix="pass the topology, masses and n_atoms of the same system")
    n = next(iter(sizes.values()), None)
    if n is None:  # neither masses nor a topology: refuse before expanding the file's molecule counts
        raise _unknown_masses(path)
    if _is_votca(path, text):
        specs = _parse_votca(text, path, atom_topology)
        exclusion_bonds = 2
    else:
        specs, exclusion_bonds, n_yaml = _parse_yaml(text, path, n)
        n = n_yaml if n is None else n
    if masses is None:
        masses = top_masses
    if masses is None:
        raise _unknown_masses(path)
    if not np.all(np.isfinite(masses)) or np.any(masses < 0):
        raise input_error("atom masses must be finite and >= 0 amu", path=path, field="masses",
                          fix="pass the system's particle masses")
    return Mapping(specs, n, masses, exclusion_bonds=exclusion_bonds, source=path)


# ===================================================================================== trajectories
def map_trajectory(mapping: Mapping, in_h5md, out_h5md, *, out_topology_json=None, out_pdb=None, chunk=50,
                   progress=True) -> Path:
    """Map an atomistic H5MD trajectory (with forces) to a CG H5MD trajectory.

    Oriented beads (an ``orientation`` in the mapping file) add the extra vectors ``torque`` (kJ/mol) and
    ``body_x``, ``body_y``, ``body_z`` (the body axes) to every frame and each oriented type's mean body-frame
    second moment (amu nm^2) to the topology (``body_moments``).

    Writes ``out_h5md`` (bead positions nm, forces kJ/mol/nm, box nm, time ps, step, potential energy
    kJ/mol when present, bead masses amu, species = bead types, topology_json = the CG topology, metadata =
    the atomistic metadata plus ``mapping_hash``), ``out_topology_json`` (default: ``cg_topology.json``
    beside ``out_h5md``) and ``out_pdb`` (default: ``cg.pdb`` beside it; first frame, CONECT records for the
    CG bonds). ``chunk`` frames are read at a time.

    The input is checked in full first (atom count, masses, box, finite positions and forces, naming the
    frame), so a bad trajectory is rejected before anything is written; outputs are then written to
    temporary files and renamed only once all of them are complete. Returns the path of the CG H5MD.
    """
    from .h5md import H5MDWriter, n_frames as h5md_n_frames, read_h5md

    in_h5md, out_h5md = Path(in_h5md), Path(out_h5md)
    out_topology_json = Path(out_topology_json) if out_topology_json else out_h5md.parent / "cg_topology.json"
    out_pdb = Path(out_pdb) if out_pdb else out_h5md.parent / "cg.pdb"
    chunk = _require_int(chunk, None, "chunk", 1)
    outputs = [out_h5md, out_topology_json, out_pdb]
    if in_h5md.resolve() in [p.resolve() for p in outputs] or len({p.resolve() for p in outputs}) < 3:
        raise input_error(f"output paths {[str(p) for p in outputs]} must differ from each other and from the "
                          "input", path=in_h5md, field="out_h5md", fix="choose another output path")
    total = h5md_n_frames(in_h5md)
    if total == 0:
        raise input_error("the trajectory has no frames", path=in_h5md, field="particles/all/position",
                          fix="sample the atomistic system first")
    windows = [slice(s, min(s + chunk, total)) for s in range(0, total, chunk)]

    # pass 1: validate everything before any output exists (read_h5md names non-finite frames itself); for
    # oriented beads also accumulate each type's mean body-frame second moment (needed in the topology,
    # which is written before the frames)
    head = None
    topo = mapping.topology
    moments = {}
    for w in _progress(windows, progress, "check"):
        fr = read_h5md(in_h5md, frames=w, require_forces=True)
        if head is None:
            head = fr
            _check_head(mapping, fr, in_h5md)
        if fr.box is None:
            raise input_error("the trajectory has no box", path=in_h5md, field="particles/all/box/edges",
                              fix="sample a periodic system (OpenMM writes the box vectors with every frame)")
        _check_box_frames(fr.box, w.start, in_h5md)
        if mapping.oriented:
            c = mapping.body_second_moments(fr.positions, fr.box)
            for t in {bt for bt, o in zip(topo.bead_types, topo.orientations) if o != "none"}:
                sel = [i for i, bt in enumerate(topo.bead_types) if bt == t]
                acc = moments.setdefault(t, [np.zeros((3, 3)), 0])
                acc[0] += c[:, sel].sum(axis=(0, 1))
                acc[1] += c.shape[0] * len(sel)

    # pass 2: map and write to temporary files; they replace the outputs only when all are complete
    if moments:
        import copy

        topo = copy.deepcopy(topo)
        topo.body_moments = {t: (acc[0] / acc[1]).tolist() for t, acc in moments.items()}
    extra = ORIENTED_VECTORS if mapping.oriented else ()
    metadata = dict(head.metadata or {})
    metadata.update({"mapping_hash": mapping.hash(), "mapping_source": mapping.source,
                     "atomistic_source": str(in_h5md), "n_atoms_atomistic": mapping.n_atoms})
    first = None
    with contextlib.ExitStack() as stack:
        tmp_h5 = stack.enter_context(atomic_path(out_h5md))
        tmp_json = stack.enter_context(atomic_path(out_topology_json))
        tmp_pdb = stack.enter_context(atomic_path(out_pdb))
        with H5MDWriter(tmp_h5, topo.n_beads, masses=topo.masses, species=list(topo.bead_types),
                        topology_json=json.dumps(topo.to_dict()), metadata=metadata,
                        extra_vectors=extra) as writer:
            for w in _progress(windows, progress, "map"):
                fr = read_h5md(in_h5md, frames=w, require_forces=True)
                pos = mapping.map_positions(fr.positions, fr.box)
                vectors = {}
                if mapping.oriented:
                    axes = mapping.map_axes(fr.positions, fr.box)
                    vectors = {"torque": mapping.map_torques(fr.positions, fr.forces, fr.box),
                               "body_x": axes[..., 0], "body_y": axes[..., 1], "body_z": axes[..., 2]}
                writer.append_many(pos, mapping.map_forces(fr.forces), fr.box, fr.time, fr.step,
                                   potential_energy=fr.potential_energy, **vectors)
                if first is None:
                    first = (pos[0], fr.box[0])
        topo.save_json(tmp_json)
        topo.write_pdb(tmp_pdb, first[0], first[1])
    return out_h5md


def _progress(items, enabled, desc):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="chunk")


def _check_head(mapping, fr, path):
    n_in = fr.positions.shape[1]
    if n_in != mapping.n_atoms:
        raise input_error(f"trajectory has {n_in} atoms but mapping {mapping.source} is for {mapping.n_atoms}",
                          path=path, field="particles/all/position",
                          fix="use the mapping written for this atomistic system")
    if fr.masses is not None:
        close = np.isclose(fr.masses, mapping.atom_masses, rtol=1e-6, atol=1e-9)
        if not close.all():
            bad = int(np.flatnonzero(~close)[0])
            raise input_error(f"atom {bad} has mass {fr.masses[bad]} amu in the trajectory but "
                              f"{mapping.atom_masses[bad]} amu in the mapping {mapping.source}", path=path,
                              field="parameters/enpcg/masses",
                              fix="load the mapping with masses=read_h5md(path, frames=[0]).masses")


def _check_box_frames(box, start, path):
    diag = np.diagonal(box, axis1=1, axis2=2)
    bad = ~(np.isfinite(box).reshape(len(box), -1).all(axis=1) & (diag > 0).all(axis=1))
    if bad.any():
        frame = start + int(np.flatnonzero(bad)[0])
        raise input_error(f"frame {frame} has an invalid box {box[frame - start].tolist()} (needs finite rows "
                          "with a positive diagonal, OpenMM reduced form)", path=path,
                          field="particles/all/box/edges", fix="drop the frame or resample")
