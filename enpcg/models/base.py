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


def save_model(model: CGModel, directory, metadata: Optional[dict] = None) -> Path:
    """Write ``model.json`` and ``model.pt`` into ``directory`` (atomically, each file)."""
    from .. import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    desc = model.describe()
    desc["dtype"] = _dtype_name(model)
    desc["metadata"] = {"enpcg_version": __version__,
                        "units": {"length": "nm", "energy": "kJ/mol", "force": "kJ/mol/nm", "mass": "amu"},
                        **(metadata or {})}
    with atomic_path(directory / "model.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    write_json(directory / "model.json", desc)
    return directory


def load_model(directory, dtype: Optional[torch.dtype] = None) -> CGModel:
    """Load a model directory written by :func:`save_model` (weights with ``weights_only=True``)."""
    directory = Path(directory)
    cfg_path = directory / "model.json"
    if not cfg_path.exists():
        raise EnpcgError(f"{cfg_path}: model config not found; a model directory holds model.json and model.pt "
                         "(written by `enpcg fit`)")
    try:
        desc = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise EnpcgError(f"{cfg_path}: not valid JSON ({e})") from None
    for key in ("kind", "config", "topology"):
        if key not in desc:
            raise EnpcgError(f"{cfg_path}: field {key!r} is missing; the file was not written by enpcg")
    model = model_from_description(desc)
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    dt = getattr(torch, desc.get("dtype", "float64"))
    model.to(dt)
    model.load_state_dict(state)
    if dtype is not None:
        model.to(dtype)
    model.metadata = desc.get("metadata", {})
    return model


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
