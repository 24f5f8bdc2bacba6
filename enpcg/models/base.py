"""Base class, registry and files of coarse-grained models.

A model is a ``torch.nn.Module`` whose energy is an SE(3)-invariant function of bead positions:

* ``forward(positions (n, 3) nm, box (3, 3) nm or None) -> energy () kJ/mol`` — the TorchForce contract;
* ``batch_energy(positions (B, n, 3) nm, box (B, 3, 3) nm or None) -> (B,) kJ/mol`` — used in fitting.

Both are TorchScript-compatible. A model is rebuilt from its ``config`` (JSON) and the CG topology it is
bound to; its weights live in the state dict. A model directory holds ``model.json`` (kind, config,
topology, metadata) and ``model.pt`` (state dict), both written atomically.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import EnpcgError
from ..fileio import atomic_path, write_json
from ..topology import CGTopology

# TF32 matrix products on Ampere+ GPUs break the equivariance and force-matching accuracy of these models
# (5e-2 relative force errors measured); every model user imports this module, so keep it off here, once.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

MODEL_REGISTRY: dict = {}


def register_model(name: str):
    """Class decorator: register a :class:`CGModel` subclass under ``name`` (its ``kind``)."""

    def deco(cls):
        if name in MODEL_REGISTRY:
            raise RuntimeError(f"model kind {name!r} registered twice")
        cls.kind = name
        MODEL_REGISTRY[name] = cls
        return cls

    return deco


def _ensure_registered():
    # Import the modules that register the built-in kinds.
    from . import analytic, composite  # noqa: F401
    from . import neural, priors, spline  # noqa: F401
    from ..equivariant import model as _equivariant  # noqa: F401  (kind "equivariant", atomistic)
    from ..oriented import gay_berne, neural as _oriented_neural, sites  # noqa: F401  (oriented beads)


class CGModel(torch.nn.Module):
    """Base class of CG energy models (energies in kJ/mol, positions in nm).

    Subclasses implement ``batch_energy`` (decorated with ``@torch.jit.export``) and set ``self.config``
    (JSON-able keyword arguments that rebuild the model together with the topology).
    """

    kind = "base"
    # Python-side attributes TorchScript must not try to compile.
    __jit_ignored_attributes__ = ["config", "topology"]

    def __init__(self, topology: CGTopology):
        super().__init__()
        self.topology = topology
        self.config: dict = {}

    def forward(self, positions: Tensor, box: Optional[Tensor] = None) -> Tensor:
        if box is None:
            return self.batch_energy(positions.unsqueeze(0), None)[0]
        return self.batch_energy(positions.unsqueeze(0), box.unsqueeze(0))[0]

    @torch.jit.export
    def batch_energy(self, positions: Tensor, box: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    # Python-only helpers ------------------------------------------------------------------
    @torch.jit.unused
    def native_forces(self) -> list:
        """OpenMM forces that represent this model natively, or raise if it has no native form."""
        raise EnpcgError(
            f"model kind {self.kind!r} has no native OpenMM representation; export it with backend='torch' "
            "or backend='python'"
        )

    @torch.jit.unused
    def describe(self) -> dict:
        return {"kind": self.kind, "config": self.config, "topology": self.topology.to_dict()}


def create_model(kind: str, topology: CGTopology, **config) -> CGModel:
    """Build a registered model by name; an unknown name lists the registered ones."""
    _ensure_registered()
    if kind not in MODEL_REGISTRY:
        raise EnpcgError(f"unknown model kind {kind!r}; registered kinds: {sorted(MODEL_REGISTRY)}")
    try:
        return MODEL_REGISTRY[kind](topology, **config)
    except TypeError as e:
        raise EnpcgError(f"model kind {kind!r}: bad configuration ({e})") from None


def model_from_description(desc: dict, topology: Optional[CGTopology] = None) -> CGModel:
    """Rebuild a model (without weights) from ``{"kind", "config"}`` and a topology."""
    if topology is None:
        topology = CGTopology.from_dict(desc["topology"])
    return create_model(desc["kind"], topology, **desc.get("config", {}))


def _dtype_name(model: torch.nn.Module) -> str:
    for p in list(model.parameters()) + list(model.buffers()):
        if p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    return "float64"


# ----------------------------------------------------------------------------------------- model metadata
# Every model.json carries these metadata fields (save_model fills what it can; the fitting stages add the
# mapping and training-data hashes). Files written before they existed still load, with a warning.
METADATA_KEYS = ("enpcg_version", "units", "bead_types", "topology_hash", "mapping_hash", "cutoff",
                 "training_data_hash")
MODEL_UNITS = {"length": "nm", "time": "ps", "energy": "kJ/mol", "force": "kJ/mol/nm", "mass": "amu",
               "temperature": "K", "angle": "rad"}
# Rounding of masses in the topology hash (as in Mapping.hash): equal topologies hash equal after a JSON
# round trip or a different file format.
_HASH_DIGITS = 12


def topology_hash(topology: CGTopology) -> str:
    """sha256 hex digest of what binds a model to its beads: bead names, types, masses (amu, 12 significant
    digits), molecules, bonds, angles, dihedrals, exclusions and orientations (not residue names, not the
    data-derived body moments)."""
    import hashlib

    key = {
        "format": "enpcg-topology/1",
        "bead_names": list(topology.bead_names),
        "bead_types": list(topology.bead_types),
        "masses": [float(f"{float(m):.{_HASH_DIGITS}g}") for m in topology.masses],
        "molecule_index": [int(m) for m in topology.molecule_index],
        "bonds": np.asarray(topology.bonds).tolist(),
        "angles": np.asarray(topology.angles).tolist(),
        "dihedrals": np.asarray(topology.dihedrals).tolist(),
        "exclusion_bonds": int(topology.exclusion_bonds),
        "orientations": list(topology.orientations),
    }
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def model_cutoff(config: dict) -> Optional[float]:
    """The largest ``cutoff`` (nm) in a model config, terms of a "sum" model included; None if it has none."""
    found = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "cutoff" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    found.append(float(v))
                else:
                    walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(config)
    return max(found) if found else None


def model_metadata(model: "CGModel", metadata: Optional[dict] = None) -> dict:
    """The metadata ``save_model`` writes: enpcg version, units, bead types, topology hash and cutoff from the
    model, ``mapping_hash`` and ``training_data_hash`` None (unknown) unless ``metadata`` supplies them, then
    everything in ``metadata``."""
    from .. import __version__

    return {"enpcg_version": __version__, "units": dict(MODEL_UNITS),
            "bead_types": model.topology.type_names(), "topology_hash": topology_hash(model.topology),
            "mapping_hash": None, "cutoff": model_cutoff(model.config), "training_data_hash": None,
            **(metadata or {})}


def save_model(model: CGModel, directory, metadata: Optional[dict] = None) -> Path:
    """Write ``model.json`` and ``model.pt`` into ``directory`` (atomically, each file).

    ``model.json`` holds kind, config, topology, dtype and metadata (:func:`model_metadata`: enpcg version,
    units, bead types, topology hash, mapping hash, cutoff, training-data hash, plus ``metadata``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    desc = model.describe()
    desc["dtype"] = _dtype_name(model)
    desc["metadata"] = model_metadata(model, metadata)
    with atomic_path(directory / "model.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    write_json(directory / "model.json", desc)
    return directory


def _read_description(directory) -> dict:
    directory = Path(directory)
    cfg_path = directory / "model.json"
    if not cfg_path.exists():
        raise EnpcgError(f"{cfg_path}: model config not found; a model directory holds model.json and model.pt "
                         "(written by `enpcg fit`)")
    try:
        desc = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EnpcgError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(desc, dict):
        raise EnpcgError(f"{cfg_path}: must hold a JSON object with kind, config, topology and metadata; found "
                         f"{type(desc).__name__}. Fix: point at a model folder written by `enpcg fit`")
    for key in ("kind", "config", "topology"):
        if key not in desc:
            raise EnpcgError(f"{cfg_path}: field {key!r} is missing; the file was not written by enpcg")
    if not isinstance(desc.get("metadata", {}), dict):
        raise EnpcgError(f"{cfg_path}: field 'metadata' must be a JSON object; found "
                         f"{type(desc['metadata']).__name__}. Fix: restore the file written by `enpcg fit`")
    return desc


def load_model(directory, dtype: Optional[torch.dtype] = None) -> CGModel:
    """Load a model directory written by :func:`save_model` (weights with ``weights_only=True``).

    ``model.metadata`` is the stored metadata; ``model.source`` the directory. A file written before the
    metadata fields of :data:`METADATA_KEYS` existed loads with a warning (its mapping cannot be checked).
    """
    directory = Path(directory)
    desc = _read_description(directory)
    model = model_from_description(desc)
    weights = directory / "model.pt"
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EnpcgError(f"{weights}: model weights not found; a model directory holds model.json "
                         "and model.pt. Fix: copy the whole folder written by `enpcg fit`") from None
    except Exception as e:  # damaged, not a torch file, or objects beyond tensors (refused by weights_only)
        why = ("it holds Python objects besides tensors, which could run code when unpickled"
               if "Weights only load failed" in str(e) else
               f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}")
        raise EnpcgError(f"{weights}: cannot be read as model weights with torch.load(weights_only=True) ({why}). "
                         "Fix: use the model.pt written by `enpcg fit` with this model.json; files holding code or "
                         "arbitrary objects are refused") from None
    dt = getattr(torch, desc.get("dtype", "float64"))
    model.to(dt)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise EnpcgError(f"{weights}: the weights do not fit the model that {directory / 'model.json'} describes "
                         f"({' '.join(str(e).split())[:300]}). Fix: keep model.json and model.pt of the same fit "
                         "together") from None
    if dtype is not None:
        model.to(dtype)
    model.metadata = desc.get("metadata", {})
    model.source = str(directory)
    missing = [k for k in METADATA_KEYS if k not in model.metadata]
    if missing:
        import warnings

        warnings.warn(f"{directory / 'model.json'}: metadata lacks {missing} (written by an older enpcg); the model "
                      "loads, but what it was trained on cannot be fully checked. Fix: refit it with this enpcg "
                      "version, or re-save it with enpcg.models.save_model(model, folder, metadata={...}) "
                      "adding mapping_hash and training_data_hash", UserWarning, stacklevel=2)
    return model


# ------------------------------------------------------------------------------ model against the system
def _topology_difference(expected: CGTopology, found: CGTopology) -> str:
    """Words for the first difference between two CG topologies (for error messages)."""
    if expected.n_beads != found.n_beads:
        return f"{found.n_beads} beads where the model has {expected.n_beads}"
    for what, a, b in (("name", expected.bead_names, found.bead_names),
                       ("type", expected.bead_types, found.bead_types)):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"bead {i} has {what} {y!r} where the model has {x!r}"
    for i, (x, y) in enumerate(zip(expected.masses, found.masses)):
        if float(f"{x:.{_HASH_DIGITS}g}") != float(f"{y:.{_HASH_DIGITS}g}"):
            return f"bead {i} has mass {y} amu where the model has {x} amu"
    if not np.array_equal(expected.molecule_index, found.molecule_index):
        i = int(np.flatnonzero(expected.molecule_index != found.molecule_index)[0])
        return f"bead {i} is in molecule {found.molecule_index[i]} where the model has {expected.molecule_index[i]}"
    for kind in ("bonds", "angles", "dihedrals"):
        a, b = np.asarray(getattr(expected, kind)), np.asarray(getattr(found, kind))
        if a.shape != b.shape or not np.array_equal(a, b):
            return f"{len(b)} {kind} where the model has {len(a)}" if a.shape != b.shape else \
                f"{kind} differ (first at entry {int(np.flatnonzero((a != b).any(axis=1))[0])})"
    if expected.exclusion_bonds != found.exclusion_bonds:
        return f"exclusion_bonds {found.exclusion_bonds} where the model has {expected.exclusion_bonds}"
    return "orientations differ"


def check_model_matches(model, *, mapping_hash=None, topology: Optional[CGTopology] = None, source=None) -> None:
    """Refuse a model that was not trained for this mapping or CG topology.

    model : a CGModel (from :func:`load_model`), a model directory, or a ``model.json`` description dict.
    mapping_hash : hex digest (``Mapping.hash()``, or a CG H5MD file's ``metadata["mapping_hash"]``) or a
        Mapping; compared with the model's ``metadata.mapping_hash``. None: not checked.
    topology : CGTopology compared, by :func:`topology_hash`, with the topology stored in the model.
    source : what the mapping hash or topology came from (a file), named in the message.

    Raises EnpcgError naming both hashes (expected by the model, found here) and the fix. A model saved
    without a mapping hash (older enpcg, or a model built in Python) cannot be checked against a mapping:
    that warns and passes.
    """
    import warnings

    if isinstance(model, (str, Path)):
        name = str(model)
        desc = _read_description(model)
        metadata, model_top = desc.get("metadata", {}), None
        if topology is not None:
            try:
                model_top = CGTopology.from_dict(desc["topology"])
            except (TypeError, EnpcgError) as e:
                raise EnpcgError(f"{Path(model) / 'model.json'}: field 'topology': {e}") from None
    elif isinstance(model, dict):
        name = str(model.get("source", "<model description>"))
        metadata, model_top = model.get("metadata", {}), None
        if topology is not None:
            model_top = CGTopology.from_dict(model["topology"])
    else:
        name = str(getattr(model, "source", None) or f"<{getattr(model, 'kind', 'model')} model in memory>")
        metadata, model_top = getattr(model, "metadata", None) or {}, model.topology
    where = source if source is not None else "this system"

    if mapping_hash is not None:
        found = mapping_hash.hash() if hasattr(mapping_hash, "hash") else str(mapping_hash)
        expected = metadata.get("mapping_hash")
        if not expected:
            warnings.warn(f"model {name} records no mapping hash (saved by an older enpcg or built in Python), so "
                          f"it cannot be checked against the mapping of {where} (hash {found}). Fix: refit the "
                          "model with this enpcg version to record it", UserWarning, stacklevel=2)
        elif expected != found:
            raise EnpcgError(
                f"{where}: mapping hash {found} (found) differs from the mapping hash {expected} (expected) that "
                f"model {name} was trained for (model.json metadata.mapping_hash): the model was not trained on "
                "this mapping and would give wrong forces. Fix: use the model fitted on data mapped with this "
                "mapping, or refit it on these data (`enpcg fit --data` the cg.h5 that `enpcg map` wrote with "
                "this mapping)")
    if topology is not None:
        expected = topology_hash(model_top)
        found = topology_hash(topology)
        if expected != found:
            raise EnpcgError(
                f"{where}: CG topology hash {found} (found) differs from the topology hash {expected} (expected) "
                f"that model {name} was trained for ({_topology_difference(model_top, topology)}): the model was "
                "not trained for these beads. Fix: pass the cg_topology.json / cg.pdb that `enpcg map` wrote "
                "for the data the model was fitted on, or refit the model on data mapped to this topology")


def as_tensor(x, dtype=torch.float64) -> Tensor:
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return getattr(torch, _dtype_name(model))


def energy_and_forces(model: CGModel, positions, box=None):
    """Energy (kJ/mol) and forces (n, 3) kJ/mol/nm of one configuration by autograd; numpy in and out.

    positions : (n, 3) nm; box : (3, 3) nm or None. Computed in the model's dtype.
    """
    dt = model_dtype(model)
    x = torch.as_tensor(np.asarray(positions), dtype=dt).clone().requires_grad_(True)
    b = None if box is None else torch.as_tensor(np.asarray(box), dtype=dt)
    e = model(x, b)
    (g,) = torch.autograd.grad(e, x)
    return float(e.detach()), (-g).detach().cpu().numpy()


def batch_forces(model: CGModel, positions: Tensor, box: Optional[Tensor], create_graph: bool = False):
    """Energies (B,) and forces (B, n, 3) of a batch of tensors by autograd (for fitting)."""
    x = positions if positions.requires_grad else positions.clone().requires_grad_(True)
    e = model.batch_energy(x, box)
    (g,) = torch.autograd.grad(e.sum(), x, create_graph=create_graph)
    return e, -g
