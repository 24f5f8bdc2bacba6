"""H5MD trajectories with forces: writer with an atomic frame counter and resume, and a validating reader.

Layout (H5MD 1.1; every dataset key lives in this module):

```
/h5md                       attrs version=[1, 1]; groups author (name), creator (name="enpcg", version)
/particles/all/position     value (F, n, 3) nm, step (F,) int, time (F,) ps
/particles/all/force        value (F, n, 3) kJ mol-1 nm-1, step, time
/particles/all/<extra>      value (F, n, 3), step, time (e.g. torque, kJ mol-1)
/particles/all/box          attrs dimension=3, boundary=["periodic"]*3; edges/{value (F, 3, 3) nm, step, time}
/observables/potential_energy   value (F,) kJ mol-1, step, time
/parameters/enpcg           attrs n_frames (the frame counter), format, extra_vectors;
                            datasets masses (n,) amu, species (n,) str, topology_json, metadata (JSON strings)
```

Box vectors are rows of each (3, 3) edges matrix. Values are float64, chunked and resizable along frames.

Crash safety: frames are buffered in memory and written by :meth:`H5MDWriter.flush`, which writes the data,
flushes the file, and only then raises the counter ``n_frames``. Readers read only the first ``n_frames``
frames; a resuming writer cuts longer datasets back to ``n_frames``. So an interrupted run keeps every frame
that was flushed and resumes without gaps or duplicates.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EnpcgError

# ----------------------------------------------------------------------------------------------- keys
H5MD_VERSION = (1, 1)
PARTICLES = "particles/all"                 # the one particle group we write
POSITION = "particles/all/position"         # value (F, n, 3) nm
FORCE = "particles/all/force"               # value (F, n, 3) kJ/mol/nm
BOX = "particles/all/box"                   # attrs dimension, boundary
EDGES = "particles/all/box/edges"           # value (F, 3, 3) nm, rows are box vectors
POTENTIAL_ENERGY = "observables/potential_energy"  # value (F,) kJ/mol
PARAMETERS = "parameters/enpcg"             # attrs n_frames, format, extra_vectors; masses, species, ...
COUNTER = "n_frames"                        # attribute of PARAMETERS: frames that are complete on disk
FORMAT = "enpcg-h5md-1"

UNITS = {"length": "nm", "force": "kJ mol-1 nm-1", "time": "ps", "energy": "kJ mol-1", "mass": "amu"}
KNOWN_EXTRA_UNITS = {"torque": "kJ mol-1", "velocity": "nm ps-1"}

# factors to OpenMM units, used when reading files written by other tools (MDAnalysis writes angstrom)
_TO_NM = {"nm": 1.0, "Angstrom": 0.1, "angstrom": 0.1, "A": 0.1, "pm": 1e-3}
_TO_KJ_MOL_NM = {"kJ mol-1 nm-1": 1.0, "kJ mol-1 Angstrom-1": 10.0, "kJ mol-1 A-1": 10.0,
                 "kcal mol-1 Angstrom-1": 41.84, "kcal mol-1 A-1": 41.84, "kcal mol-1 nm-1": 4.184}
_TO_PS = {"ps": 1.0, "fs": 1e-3, "ns": 1e3}
_TO_KJ_MOL = {"kJ mol-1": 1.0, "kcal mol-1": 4.184}

_BUFFER_BYTES = 64 * 2**20  # flush automatically once this much frame data waits in memory


def _enpcg_version():
    try:
        from importlib.metadata import version

        return version("enpcg")
    except Exception:  # not installed: still write a valid creator group
        return "unknown"


def _chunk_frames(frame_shape):
    """Frames per chunk: at most 256 KiB of float64 and 128 frames (small files stay small)."""
    return int(max(1, min(128, 2**18 // (8 * int(np.prod(frame_shape, dtype=np.int64))))))


def _str(x):
    return x.decode() if isinstance(x, bytes) else str(x)


# ----------------------------------------------------------------------------------------------- writer
class H5MDWriter:
    """Append frames (positions, forces, box, time, step, potential energy) to an H5MD file.

    Parameters
    ----------
    path : str or Path, the .h5 file. Created (or overwritten) unless ``resume`` is true and it exists.
    n_particles : int, number of particles n in every frame.
    masses : array-like, shape=(n,), amu, optional.
    species : list of str, (n,), optional, a name per particle (atom or bead name/type).
    topology_json : str or dict, optional, a topology description stored verbatim (dicts are dumped).
    metadata : dict, optional, JSON-able run information (temperature, timestep, ...). On resume it is merged
        into the stored metadata.
    extra_vectors : sequence of names, or dict name -> unit, optional: extra per-particle (F, n, 3) data,
        e.g. ``("torque",)``, passed to :meth:`append` as keyword arguments.
    resume : bool, open an existing file and continue after its last complete frame (datasets longer than
        the counter are cut back). A missing file is created.
    with_forces : bool, False writes a file without ``/particles/all/force`` (frames of a plain trajectory).

    Frames wait in memory until :meth:`flush` (or :meth:`close`, or about 64 MiB are pending). Use as a
    context manager; leaving the block flushes and closes.
    """

    def __init__(self, path, n_particles, *, masses=None, species=None, topology_json=None, metadata=None,
                 extra_vectors=(), resume=False, with_forces=True):
        import h5py

        self.path = Path(path)
        self.n_particles = int(n_particles)
        if self.n_particles <= 0:
            raise EnpcgError(f"{self.path}: n_particles must be positive; you supplied {n_particles}")
        if isinstance(extra_vectors, str):
            extra_vectors = (extra_vectors,)
        if isinstance(extra_vectors, dict):
            self._extra_units = {str(k): str(v) for k, v in extra_vectors.items()}
        else:
            self._extra_units = {str(k): KNOWN_EXTRA_UNITS.get(str(k), "") for k in extra_vectors}
        for name in self._extra_units:
            if name in ("position", "force", "box", "mass", "species", "image", "id") or "/" in name or not name:
                raise EnpcgError(f"{self.path}: extra_vectors name {name!r} is reserved or invalid; "
                                 "use another name")
        self._pending = []
        self._pending_bytes = 0
        self._closed = False
        masses = None if masses is None else np.asarray(masses, dtype=np.float64)
        if masses is not None and masses.shape != (self.n_particles,):
            raise EnpcgError(f"{self.path}: masses must be shape ({self.n_particles},); you supplied "
                             f"{masses.shape}")
        if species is not None and len(species) != self.n_particles:
            raise EnpcgError(f"{self.path}: species must have {self.n_particles} entries; you supplied "
                             f"{len(species)}")

        if resume and self.path.exists():
            self._open_existing(masses, metadata)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = h5py.File(self.path, "w")
            self._create_layout(masses, species, topology_json, metadata, with_forces)
            self._committed = 0

    # ------------------------------------------------------------------ layout
    def _create_layout(self, masses, species, topology_json, metadata, with_forces):
        import h5py

        f = self._file
        h5 = f.create_group("h5md")
        h5.attrs["version"] = np.array(H5MD_VERSION, dtype=np.int32)
        h5.create_group("author").attrs["name"] = os.environ.get("USER") or _safe_user()
        creator = h5.create_group("creator")
        creator.attrs["name"] = "enpcg"
        creator.attrs["version"] = _enpcg_version()

        self._new_element(POSITION, (self.n_particles, 3), UNITS["length"])
        self.has_forces = bool(with_forces)
        if self.has_forces:
            self._new_element(FORCE, (self.n_particles, 3), UNITS["force"])
        for name, unit in self._extra_units.items():
            self._new_element(f"{PARTICLES}/{name}", (self.n_particles, 3), unit)
        box = f[PARTICLES].create_group("box")
        box.attrs["dimension"] = np.int32(3)
        box.attrs["boundary"] = np.array(["periodic"] * 3, dtype=h5py.string_dtype())
        self._new_element(EDGES, (3, 3), UNITS["length"])
        self.has_potential_energy = None  # decided by the first frame

        par = f.create_group(PARAMETERS)
        par.attrs["format"] = FORMAT
        par.attrs["extra_vectors"] = json.dumps(self._extra_units)
        par.attrs[COUNTER] = np.int64(0)
        if masses is not None:
            par.create_dataset("masses", data=masses).attrs["unit"] = UNITS["mass"]
        if species is not None:
            par.create_dataset("species", data=np.array([str(s) for s in species], dtype=h5py.string_dtype()))
        if topology_json is not None:
            if not isinstance(topology_json, str):
                topology_json = json.dumps(topology_json)
            par.create_dataset("topology_json", data=topology_json, dtype=h5py.string_dtype())
        par.create_dataset("metadata", data=json.dumps(metadata or {}), dtype=h5py.string_dtype())
        f.flush()

    def _new_element(self, key, frame_shape, unit):
        g = self._file.create_group(key)
        chunk = _chunk_frames(frame_shape)
        value = g.create_dataset("value", shape=(0, *frame_shape), maxshape=(None, *frame_shape),
                                 dtype=np.float64, chunks=(chunk, *frame_shape))
        if unit:
            value.attrs["unit"] = unit
        g.create_dataset("step", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(128,))
        g.create_dataset("time", shape=(0,), maxshape=(None,), dtype=np.float64,
                         chunks=(128,)).attrs["unit"] = UNITS["time"]

    def _open_existing(self, masses, metadata):
        import h5py

        try:
            self._file = h5py.File(self.path, "r+")
        except OSError as e:
            raise EnpcgError(f"{self.path}: cannot open for resuming ({e}). Fix: delete the file to start "
                             "over, or check that no other process has it open") from None
        f = self._file
        if PARAMETERS not in f or COUNTER not in f[PARAMETERS].attrs or POSITION not in f:
            self._file.close()
            raise EnpcgError(f"{self.path}: not an enpcg H5MD file (no {PARAMETERS} frame counter); cannot "
                             "resume. Fix: delete it or choose another output path")
        n_file = f[f"{POSITION}/value"].shape[1]
        if n_file != self.n_particles:
            self._file.close()
            raise EnpcgError(f"{self.path}: file has {n_file} particles per frame but the writer was asked "
                             f"for {self.n_particles}; cannot resume. Fix: use another output path")
        par = f[PARAMETERS]
        stored_extra = json.loads(_str(par.attrs.get("extra_vectors", "{}")))
        if self._extra_units and set(self._extra_units) != set(stored_extra):
            self._file.close()
            raise EnpcgError(f"{self.path}: file holds extra vectors {sorted(stored_extra)} but the writer "
                             f"was asked for {sorted(self._extra_units)}; cannot resume")
        self._extra_units = stored_extra
        if masses is not None and "masses" in par and not np.allclose(par["masses"][()], masses):
            self._file.close()
            raise EnpcgError(f"{self.path}: stored masses differ from the masses given; this file belongs "
                             "to another system. Fix: use another output path")
        self.has_forces = FORCE in f
        self._committed = int(par.attrs[COUNTER])
        self.has_potential_energy = True if POTENTIAL_ENERGY in f else (False if self._committed else None)
        if metadata:
            meta = json.loads(_str(par["metadata"][()])) if "metadata" in par else {}
            meta.update(metadata)
            if "metadata" in par:
                del par["metadata"]
            par.create_dataset("metadata", data=json.dumps(meta), dtype=h5py.string_dtype())
        self._truncate_datasets(self._committed)
        f.flush()

    def _time_dependent_groups(self):
        keys = [POSITION, EDGES] + ([FORCE] if self.has_forces else [])
        keys += [f"{PARTICLES}/{name}" for name in self._extra_units]
        if self.has_potential_energy:
            keys.append(POTENTIAL_ENERGY)
        return keys

    def _truncate_datasets(self, n):
        for key in self._time_dependent_groups():
            for ds in ("value", "step", "time"):
                d = self._file[f"{key}/{ds}"]
                if d.shape[0] > n:
                    d.resize(n, axis=0)

    # ------------------------------------------------------------------ appending
    @property
    def n_frames(self) -> int:
        """Frames appended so far (those on disk plus those waiting for :meth:`flush`)."""
        return self._committed + sum(len(p["time"]) for p in self._pending)

    @property
    def n_committed(self) -> int:
        """Frames on disk and counted (survive a crash)."""
        return self._committed

    def append(self, positions, forces, box, time, step, potential_energy=None, **extra):
        """Append one frame.

        positions : (n, 3) nm; forces : (n, 3) kJ/mol/nm (None only for a writer with ``with_forces=False``);
        box : (3, 3) nm (rows are box vectors) or (3,) edge lengths; time : ps; step : int;
        potential_energy : kJ/mol or None; extra : name -> (n, 3) for each of ``extra_vectors``.
        """
        self.append_many(np.asarray(positions, dtype=np.float64)[None],
                         None if forces is None else np.asarray(forces, dtype=np.float64)[None],
                         np.asarray(box, dtype=np.float64)[None], [time], [step],
                         None if potential_energy is None else [potential_energy],
                         **{k: np.asarray(v, dtype=np.float64)[None] for k, v in extra.items()})

    def append_many(self, positions, forces, box, time, step, potential_energy=None, **extra):
        """Append F frames: positions (F, n, 3) nm, forces (F, n, 3) kJ/mol/nm, box (F, 3, 3) or (3, 3) or
        (F, 3) or (3,) nm, time (F,) ps, step (F,) int, potential_energy (F,) kJ/mol or None, and each extra
        vector (F, n, 3)."""
        if self._closed:
            raise EnpcgError(f"{self.path}: writer is closed; open a new H5MDWriter(resume=True) to append")
        n = self.n_particles
        pos = np.asarray(positions, dtype=np.float64)
        if pos.ndim != 3 or pos.shape[1:] != (n, 3):
            raise EnpcgError(f"{self.path}: positions must be shape (F, {n}, 3); you supplied {pos.shape}")
        nf = pos.shape[0]
        frame = {"positions": pos}
        if self.has_forces:
            if forces is None:
                raise EnpcgError(f"{self.path}: forces are required by this writer; you supplied None")
            frc = np.asarray(forces, dtype=np.float64)
            if frc.shape != pos.shape:
                raise EnpcgError(f"{self.path}: forces must be shape {pos.shape}; you supplied {frc.shape}")
            frame["forces"] = frc
        elif forces is not None:
            raise EnpcgError(f"{self.path}: this writer was created with with_forces=False; forces given")
        frame["box"] = _box_array(box, nf, self.path)
        frame["time"] = np.broadcast_to(np.asarray(time, dtype=np.float64).reshape(-1), (nf,)).copy()
        frame["step"] = np.broadcast_to(np.asarray(step).astype(np.int64).reshape(-1), (nf,)).copy()
        has_pe = potential_energy is not None
        if self.has_potential_energy is not None and has_pe != self.has_potential_energy:
            raise EnpcgError(f"{self.path}: potential_energy must be given for every frame or for none; "
                             f"frame {self.n_frames} {'has' if has_pe else 'lacks'} it")
        if has_pe:
            pe = np.asarray(potential_energy, dtype=np.float64).reshape(-1)
            if pe.shape != (nf,):
                raise EnpcgError(f"{self.path}: potential_energy must be shape ({nf},); you supplied {pe.shape}")
            frame["potential_energy"] = pe
        if set(extra) != set(self._extra_units):
            raise EnpcgError(f"{self.path}: extra vectors given {sorted(extra)}; this file expects "
                             f"{sorted(self._extra_units)}")
        for name, value in extra.items():
            arr = np.asarray(value, dtype=np.float64)
            if arr.shape != pos.shape:
                raise EnpcgError(f"{self.path}: {name} must be shape {pos.shape}; you supplied {arr.shape}")
            frame[name] = arr
        for name in ["positions", "forces", "box", "time"] + list(self._extra_units):
            if name in frame:
                _check_finite(frame[name], name, self.path, first_frame=self.n_frames)
        if self.has_potential_energy is None:  # the first valid frame decides for the whole file
            self.has_potential_energy = has_pe
        self._pending.append(frame)
        self._pending_bytes += sum(v.nbytes for v in frame.values())
        if self._pending_bytes > _BUFFER_BYTES:
            self.flush()

    def flush(self):
        """Write pending frames, flush the file, then raise the frame counter (and flush again)."""
        if self._closed or not self._pending:
            return
        cat = {k: np.concatenate([p[k] for p in self._pending]) for k in self._pending[0]}
        start, nf = self._committed, len(cat["time"])
        stop = start + nf
        if self.has_potential_energy and POTENTIAL_ENERGY not in self._file:
            self._new_element(POTENTIAL_ENERGY, (), UNITS["energy"])
        targets = {POSITION: "positions", EDGES: "box", FORCE: "forces", POTENTIAL_ENERGY: "potential_energy"}
        targets.update({f"{PARTICLES}/{name}": name for name in self._extra_units})
        for key in self._time_dependent_groups():
            g = self._file[key]
            for ds, data in (("value", cat[targets[key]]), ("step", cat["step"]), ("time", cat["time"])):
                d = g[ds]
                d.resize(stop, axis=0)
                d[start:stop] = data
        self._file.flush()
        # the counter moves only once the data are on disk: a crash before this line loses these frames
        # from the reader's view, and a resuming writer cuts the datasets back
        self._file[PARAMETERS].attrs.modify(COUNTER, np.int64(stop))
        self._file.flush()
        self._committed = stop
        self._pending = []
        self._pending_bytes = 0

    def truncate(self, n_frames):
        """Drop every frame after the first ``n_frames`` (pending ones included); used when resuming a run
        whose checkpoint is older than the last flushed frame."""
        n_frames = int(n_frames)
        if n_frames < 0 or n_frames > self.n_frames:
            raise EnpcgError(f"{self.path}: cannot truncate to {n_frames} frames; the file has {self.n_frames}")
        self.flush()
        self._file[PARAMETERS].attrs.modify(COUNTER, np.int64(n_frames))
        self._file.flush()
        self._committed = n_frames
        self._truncate_datasets(n_frames)
        self._file.flush()

    def committed_steps(self) -> np.ndarray:
        """(n_committed,) int64 steps of the frames on disk."""
        return np.asarray(self._file[f"{POSITION}/step"][: self._committed], dtype=np.int64)

    def close(self):
        """Flush pending frames and close the file (safe to call twice)."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._file.close()
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _safe_user():
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def _box_array(box, nf, path):
    """Box input (F, 3, 3), (3, 3), (F, 3) or (3,) nm -> (F, 3, 3)."""
    b = np.asarray(box, dtype=np.float64)
    if b.shape == (3,):
        b = np.diag(b)
    if b.shape == (3, 3):  # one full matrix (wins over "F=3 frames of edge lengths")
        b = np.broadcast_to(b, (nf, 3, 3))
    elif b.shape == (nf, 3):  # edge lengths per frame
        b = np.stack([np.diag(x) for x in b])
    if b.shape != (nf, 3, 3):
        raise EnpcgError(f"{path}: box must be shape ({nf}, 3, 3), (3, 3) or (3,) in nm; you supplied {b.shape}")
    return np.array(b, dtype=np.float64)


def _check_finite(arr, name, path, first_frame=0, frame_numbers=None):
    """Raise naming the first frame (file numbering) and particle holding NaN or inf."""
    if np.all(np.isfinite(arr)):
        return
    bad = np.argwhere(~np.isfinite(arr))[0]
    frame = int(frame_numbers[bad[0]]) if frame_numbers is not None else first_frame + int(bad[0])
    where = f"frame {frame}"
    if arr.ndim == 3 and name not in ("box",):
        where += f", particle {int(bad[1])}"
    raise EnpcgError(f"{path}: {name} holds NaN or inf at {where}. Fix: the simulation blew up there; "
                     "use a smaller time step or start from a minimised structure, and drop these frames")


# ----------------------------------------------------------------------------------------------- reader
@dataclass
class Frames:
    """Frames read from an H5MD file.

    positions : np.ndarray, shape=(F, n, 3), float64, nm
    forces : np.ndarray, shape=(F, n, 3), float64, kJ/mol/nm, or None
    box : np.ndarray, shape=(F, 3, 3), float64, nm, rows are box vectors (None if the file has no box)
    time : np.ndarray, shape=(F,), float64, ps (NaN where the file stores no time)
    step : np.ndarray, shape=(F,), int64
    potential_energy : np.ndarray, shape=(F,), float64, kJ/mol, or None
    masses : np.ndarray, shape=(n,), float64, amu, or None
    species : list of str (n,) or None
    topology_json : str or None
    metadata : dict
    extra : dict name -> np.ndarray (F, n, 3), as stored (enpcg writes torque in kJ/mol; other tools' units
        are in the dataset's 'unit' attribute and are not converted)
    """

    positions: np.ndarray
    forces: np.ndarray | None
    box: np.ndarray | None
    time: np.ndarray
    step: np.ndarray
    potential_energy: np.ndarray | None = None
    masses: np.ndarray | None = None
    species: list | None = None
    topology_json: str | None = None
    metadata: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_particles(self) -> int:
        return int(self.positions.shape[1])


def _open(path):
    import h5py

    path = Path(path)
    if not path.exists():
        raise EnpcgError(f"{path}: file not found. Fix: check the path, or create it with `enpcg sample` "
                         "(atomistic) or `enpcg map` (coarse-grained)")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise EnpcgError(f"{path}: not an HDF5/H5MD file ({e}). Fix: pass an H5MD file written by `enpcg sample`, "
                         "`enpcg map` or another H5MD writer") from None


@contextlib.contextmanager
def _reading(path):
    """Open an H5MD file for reading and check its top level. Errors h5py raises on a damaged file (bad
    object headers, truncated data) become an EnpcgError naming the file."""
    import h5py

    f = _open(path)
    try:
        with f:
            if "h5md" not in f or "particles" not in f:
                keys = sorted(f.keys())
                raise EnpcgError(f"{path}: not an H5MD file (top-level groups {keys}; /h5md and /particles are "
                                 "required). Fix: pass an H5MD file with positions under /particles")
            if not isinstance(f["particles"], h5py.Group):
                raise EnpcgError(f"{path}: /particles is a dataset, not a group; the file is not H5MD. Fix: pass an "
                                 "H5MD file written by `enpcg sample` or `enpcg map`")
            yield f
    except EnpcgError:
        raise
    except (OSError, RuntimeError, KeyError) as e:
        raise EnpcgError(f"{path}: the file is damaged and cannot be read ({type(e).__name__}: {e}). Fix: "
                         "recreate it (rerun the stage that wrote it, or resume it with the same settings)") from None


def _particle_group(f, path):
    groups = sorted(f["particles"].keys())
    if "all" in groups:
        return "particles/all"
    if len(groups) == 1:
        return f"particles/{groups[0]}"
    raise EnpcgError(f"{path}: /particles holds groups {groups} and none is named 'all'; cannot choose one. Fix: "
                     "keep one particle group, or name the one to read 'all'")


def _dataset(f, key, path, kinds="fiu"):
    """The dataset at ``key`` (None when absent); EnpcgError when it is a group or its dtype kind is not one
    of ``kinds`` (numpy kinds: f float, i/u integer, S/U/O text)."""
    import h5py

    if key not in f:
        return None
    ds = f[key]
    if not isinstance(ds, h5py.Dataset):
        raise EnpcgError(f"{path}: /{key} is a group, but a dataset belongs there; the file is damaged. Fix: "
                         "recreate the file")
    if ds.dtype.kind not in kinds:
        what = "numbers" if kinds == "fiu" else "text"
        raise EnpcgError(f"{path}: /{key} holds dtype {ds.dtype}, but {what} belong there; the file is damaged. "
                         "Fix: recreate the file")
    return ds


def _counter(f, path, n_data, key):
    """The frame counter (attribute n_frames of /parameters/enpcg), checked against the stored frames."""
    import h5py

    par = f[PARAMETERS]
    if not isinstance(par, h5py.Group):
        raise EnpcgError(f"{path}: /{PARAMETERS} is a dataset, but a group belongs there; the file is damaged. Fix: "
                         "recreate the file")
    raw = par.attrs[COUNTER]
    value = raw.item() if isinstance(raw, np.ndarray) and raw.size == 1 else raw
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise EnpcgError(f"{path}: the frame counter /{PARAMETERS}@{COUNTER} is {value!r}; it must be a whole "
                         "number >= 0, so the file is damaged. Fix: recreate the file, or resume the run that "
                         "wrote it")
    n = int(value)
    if n > n_data:
        raise EnpcgError(f"{path}: frame counter says {n} frames but /{key} holds only {n_data}; the file "
                         "is damaged. Fix: recreate the file, or resume the run that wrote it")
    return n


def _file_n_frames(f, path, pgroup):
    key = f"{pgroup}/position/value"
    ds = _dataset(f, key, path)
    if ds is None:
        raise EnpcgError(f"{path}: /{pgroup}/position/value is missing: the file holds no positions. Fix: pass a "
                         "trajectory file with positions")
    if ds.ndim != 3 or ds.shape[2] != 3:
        raise EnpcgError(f"{path}: /{key} must be shape (F, n, 3); found {ds.shape}. Fix: recreate the file")
    n_data = ds.shape[0]
    if PARAMETERS in f and COUNTER in f[PARAMETERS].attrs:
        return _counter(f, path, n_data, key)
    return n_data  # an H5MD file from another tool: every stored frame counts


def n_frames(path) -> int:
    """Number of complete frames in an H5MD file (the counter, or the position count for foreign files)."""
    with _reading(path) as f:
        return _file_n_frames(f, path, _particle_group(f, path))


def data_hash(paths, chunk_bytes=16 * 2**20) -> str:
    """sha256 hex digest of the frame data of one H5MD file or a sequence of them (in order): the complete
    frames (the counter) of positions, forces and box edges, as stored (dtype, shape and bytes), read
    ``chunk_bytes`` at a time, so hashing a large file costs one read of it and little memory. Recorded in a
    model's metadata as ``training_data_hash``."""
    import hashlib

    h = hashlib.sha256(b"enpcg-h5md-data/1")
    for path in ([paths] if isinstance(paths, (str, Path)) else list(paths)):
        with _reading(path) as f:
            pg = _particle_group(f, path)
            n = _file_n_frames(f, path, pg)
            h.update(f"file n_frames={n}".encode())
            for key in (f"{pg}/position/value", f"{pg}/force/value", f"{pg}/box/edges/value"):
                ds = f.get(key)
                if ds is None or not hasattr(ds, "shape") or not ds.shape:
                    continue
                h.update(f"{key.split('/', 2)[-1]} {ds.dtype.str} {(n, *ds.shape[1:])}".encode())
                per_frame = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
                step = max(1, chunk_bytes // per_frame)
                for s in range(0, min(n, ds.shape[0]), step):
                    h.update(np.ascontiguousarray(ds[s:min(s + step, n)]).tobytes())
    return h.hexdigest()


def _frame_index(frames, n, path):
    """Selection -> (sorted unique indices as slice or array, order to restore the request)."""
    if frames is None:
        return np.arange(n)
    if isinstance(frames, slice):
        return np.arange(n)[frames]
    idx = np.asarray(frames)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise EnpcgError(f"{path}: boolean frame mask must be shape ({n},); you supplied {idx.shape}")
        return np.flatnonzero(idx)
    idx = np.atleast_1d(idx).astype(np.int64)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise EnpcgError(f"{path}: frame index out of range (file has {n} frames); you asked for "
                         f"{int(idx.min())}..{int(idx.max())}")
    return np.where(idx < 0, idx + n, idx)


def _read_rows(ds, idx, n_total):
    """Read rows ``idx`` (any order, repeats allowed) of dataset ``ds`` efficiently."""
    if idx.size == 0:
        return np.zeros((0, *ds.shape[1:]), dtype=ds.dtype)
    lo, hi = int(idx.min()), int(idx.max()) + 1
    if hi - lo == idx.size and np.all(np.diff(idx) == 1):
        return ds[lo:hi]
    if hi - lo <= 4 * idx.size:  # dense enough: one block read, then pick in memory
        return ds[lo:hi][idx - lo]
    uniq, inverse = np.unique(idx, return_inverse=True)
    return ds[uniq][inverse]


def _unit_factor(ds, table, kind, path):
    unit = ds.attrs.get("unit")
    if unit is None:
        return 1.0
    unit = _str(unit)
    if unit not in table:
        raise EnpcgError(f"{path}: /{ds.name.lstrip('/')} has {kind} unit {unit!r}; supported: {sorted(table)}. "
                         "Fix: convert the data to one of them (enpcg writes nm, kJ mol-1 nm-1, ps, kJ mol-1)")
    return table[unit]


def _json_text(par, name, path, want_dict):
    """A JSON string dataset of /parameters/enpcg, parsed to check it (EnpcgError naming it if not JSON)."""
    ds = _dataset(par.file, f"{PARAMETERS}/{name}", path, kinds="SUO")
    if ds is None:
        return None
    raw = ds[()]
    if not isinstance(raw, (str, bytes)):
        raise EnpcgError(f"{path}: /{PARAMETERS}/{name} must be one JSON string; found shape {ds.shape}. Fix: "
                         "recreate the file")
    text = _str(raw) if isinstance(raw, str) else raw.decode("utf-8", "replace")
    try:
        value = json.loads(text)
    except ValueError as e:
        raise EnpcgError(f"{path}: /{PARAMETERS}/{name} is not valid JSON ({e}). Fix: recreate the file") from None
    if want_dict and not isinstance(value, dict):
        raise EnpcgError(f"{path}: /{PARAMETERS}/{name} must be a JSON object; found {type(value).__name__}. Fix: "
                         "recreate the file")
    return text if not want_dict else value


def _read_parameters(f, path, n_part):
    """(masses (n,) amu or None, species (n,) or None, topology JSON text or None, metadata dict)."""
    import h5py

    masses = species = topo = None
    metadata = {}
    if PARAMETERS not in f:
        return masses, species, topo, metadata
    par = f[PARAMETERS]
    if not isinstance(par, h5py.Group):
        raise EnpcgError(f"{path}: /{PARAMETERS} is a dataset, but a group belongs there; the file is damaged. Fix: "
                         "recreate the file")
    ds = _dataset(f, f"{PARAMETERS}/masses", path)
    if ds is not None:
        if ds.shape != (n_part,):
            raise EnpcgError(f"{path}: /{PARAMETERS}/masses has shape {ds.shape}; expected ({n_part},), one mass (amu) "
                             "per particle. Fix: recreate the file")
        masses = np.asarray(ds[()], dtype=np.float64)
    ds = _dataset(f, f"{PARAMETERS}/species", path, kinds="SUO")
    if ds is not None:
        if ds.shape != (n_part,):
            raise EnpcgError(f"{path}: /{PARAMETERS}/species has shape {ds.shape}; expected ({n_part},), one name "
                             "per particle. Fix: recreate the file")
        species = [_str(s) for s in ds[()]]
    topo = _json_text(par, "topology_json", path, want_dict=False)
    metadata = _json_text(par, "metadata", path, want_dict=True) or {}
    return masses, species, topo, metadata


def read_h5md(path, frames=None, require_forces=True) -> Frames:
    """Read frames of an H5MD file into OpenMM units.

    path : str or Path. frames : None (all), a slice, an int, an index array or a boolean mask over the
    complete frames. require_forces : raise if the file has no forces (force matching needs them).
    Returns :class:`Frames`. Only the first ``n_frames`` (the counter) frames are visible.

    Every dataset is checked (a dataset, not a group; numbers, not text; the shape that matches the
    positions; finite positions and forces; JSON parameters that parse), so a damaged or foreign file gives
    an EnpcgError naming the file and the dataset, never another exception.
    """
    import h5py

    path = Path(path)
    with _reading(path) as f:
        pg = _particle_group(f, path)
        n = _file_n_frames(f, path, pg)
        idx = _frame_index(frames, n, path)
        pos_ds = f[f"{pg}/position/value"]
        n_part = pos_ds.shape[1]
        length = _unit_factor(pos_ds, _TO_NM, "length", path)
        positions = _read_rows(pos_ds, idx, n).astype(np.float64) * length
        fds = _dataset(f, f"{pg}/force/value", path)
        if fds is not None:
            _check_shape(fds, (n, n_part, 3), path)
            forces = _read_rows(fds, idx, n).astype(np.float64) * _unit_factor(fds, _TO_KJ_MOL_NM, "force", path)
        elif require_forces:
            raise EnpcgError(f"{path}: /{pg}/force is missing: this file has no forces; sample with forces "
                             "(enpcg sample, or openmm_plugin.reporters.H5MDReporter) to fit by force matching")
        else:
            forces = None

        sds = _dataset(f, f"{pg}/position/step", path)
        if sds is not None:
            _check_shape(sds, (n,), path)
            raw = _read_rows(sds, idx, n)
            if not np.all(np.isfinite(raw)) or np.any(np.abs(raw) > 2**62):
                raise EnpcgError(f"{path}: /{sds.name.lstrip('/')} holds steps that are not whole numbers. Fix: "
                                 "recreate the file")
            step = raw.astype(np.int64)
        else:
            step = idx.astype(np.int64)
        time_key = f"{pg}/position/time"
        if time_key in f and isinstance(f[time_key], h5py.Dataset):
            tds = _dataset(f, time_key, path)
            _check_shape(tds, (n,), path)
            to_ps = _unit_factor(tds, _TO_PS, "time", path)
            time = _read_rows(tds, idx, n).astype(np.float64) * to_ps
        else:
            time = np.full(idx.size, np.nan)

        box = _read_box(f, pg, idx, n, path)

        pe = None
        eds = _dataset(f, f"{POTENTIAL_ENERGY}/value", path)
        if eds is not None:
            _check_shape(eds, (n,), path)
            pe = _read_rows(eds, idx, n).astype(np.float64) * _unit_factor(eds, _TO_KJ_MOL, "energy", path)

        extra = {}
        for name in f[pg]:
            item = f[f"{pg}/{name}"]
            if name in ("position", "force", "box") or not isinstance(item, h5py.Group) or "value" not in item:
                continue
            v = item["value"]
            if (isinstance(v, h5py.Dataset) and v.dtype.kind in "fiu" and v.ndim == 3
                    and v.shape[1:] == (n_part, 3)):
                _check_shape(v, (n, n_part, 3), path)
                extra[name] = _read_rows(v, idx, n).astype(np.float64)

        masses, species, topo, metadata = _read_parameters(f, path, n_part)

    # name the file's frame number, not the position in the selection
    _check_finite(positions, "positions", path, frame_numbers=idx)
    if forces is not None:
        _check_finite(forces, "forces", path, frame_numbers=idx)
    return Frames(positions=positions, forces=forces, box=box, time=time, step=step, potential_energy=pe,
                  masses=masses, species=species, topology_json=topo, metadata=metadata, extra=extra)


def _check_shape(ds, expected, path):
    """Datasets may be longer than the counter (an interrupted flush) but never shorter or differently shaped."""
    if (ds.ndim != len(expected) or ds.shape[0] < expected[0]
            or tuple(ds.shape[1:]) != tuple(expected[1:])):
        raise EnpcgError(f"{path}: /{ds.name.lstrip('/')} has shape {ds.shape}; expected ({expected[0]}"
                         f"{''.join(', ' + str(s) for s in expected[1:])}) to match the positions. Fix: recreate "
                         "the file, or drop the dataset")


def _read_box(f, pg, idx, n, path):
    import h5py

    key = f"{pg}/box/edges"
    if key not in f:
        return None
    item = f[key]
    if isinstance(item, h5py.Group):  # time-dependent: edges/value
        ds = _dataset(f, f"{key}/value", path)
        if ds is None:
            raise EnpcgError(f"{path}: /{key} is a group without its 'value' dataset; the file is damaged. Fix: "
                             "recreate the file")
        if ds.ndim not in (2, 3):
            raise EnpcgError(f"{path}: /{key}/value has shape {ds.shape}; expected (F, 3, 3) or (F, 3). Fix: "
                             "recreate the file")
        _check_shape(ds, (n, *ds.shape[1:]), path)
        edges = _read_rows(ds, idx, n).astype(np.float64)
    else:  # time-independent box
        ds = _dataset(f, key, path)
        edges = np.broadcast_to(ds[()].astype(np.float64), (idx.size, *ds.shape))
    edges = edges * _unit_factor(ds, _TO_NM, "length", path)
    if edges.shape[1:] == (3,):
        return np.stack([np.diag(e) for e in edges]) if len(edges) else np.zeros((0, 3, 3))
    if edges.shape[1:] != (3, 3):
        raise EnpcgError(f"{path}: /{key} has shape {edges.shape}; expected (F, 3, 3) or (F, 3). Fix: recreate "
                         "the file")
    return np.array(edges)
