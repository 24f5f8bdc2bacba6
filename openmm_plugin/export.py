"""Export a CG model (:class:`enpcg.models.CGModel`) as OpenMM forces.

One function, :func:`export_forces`, with three backends (registered by name in :data:`BACKENDS`):

``"torch"``
    A ``openmmtorch.TorchForce`` running a TorchScript copy of the model (weights included). Fast, runs on
    every platform openmm-torch supports (Reference, CPU, CUDA, OpenCL), and serializes with the System.
``"python"``
    An ``openmm.PythonForce`` (OpenMM >= 8.6) whose computation is a picklable :class:`ModelComputation`
    holding the model description and weights; energy and forces come from autograd in this Python
    process. Slow; needs no plugin; useful as a cross-check.
``"native"``
    ``model.native_forces()``: built-in OpenMM forces (tabulated/custom forces) for models that have a
    native form (priors, splines); a neural model raises a clear error.
``"mixed"``
    Native forces for every term of a ``sum`` model that has a native form (e.g. the priors under a neural
    correction) and one TorchForce for the rest: the same energy as ``"torch"``, but the bonded terms and
    the repulsion run as OpenMM's own kernels instead of ~a third of the TorchForce's operations (neural
    demo model on 2 CPU cores: priors 4 ms of a 17 ms TorchForce call). A model with no native term gives
    the TorchForce alone, one with no other term the native forces alone.

Units: positions and box in nm, energy in kJ/mol, forces in kJ/mol/nm (OpenMM's).

Security: a TorchScript file and a serialized System holding a TorchForce or a PythonForce carry code
(TorchScript programs; pickled Python objects) that runs when loaded or evaluated. Load them only from
sources you trust, as you would a Python script.
"""

import copy
import json
from pathlib import Path

import numpy as np
import torch  # before openmm, so OpenMM's plugin loader finds libtorch for the openmm-torch kernels
import openmm
from torch import Tensor

from enpcg.errors import EnpcgError
from enpcg.fileio import atomic_path
from enpcg.models.base import CGModel, energy_and_forces, model_dtype, model_from_description

from ._imports import ensure_vesin, import_openmmtorch

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _resolve_dtype(model: CGModel, dtype) -> torch.dtype:
    """The dtype the exported model computes in: ``dtype`` (torch dtype or its name) or the model's own."""
    if dtype is None:
        return model_dtype(model)
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    if dtype in _DTYPES.values():
        return dtype
    raise EnpcgError(f"dtype must be one of {sorted(_DTYPES)} (or the torch dtype) or None for the model's own; "
                     f"you supplied {dtype!r}")


def _model_copy(model: CGModel, dtype: torch.dtype) -> CGModel:
    """A detached copy of ``model`` (weights and config) in ``dtype``, in eval mode, on the CPU."""
    m = copy.deepcopy(model).to(device="cpu", dtype=dtype)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


# ------------------------------------------------------------------------------------------------ torch
class _PeriodicEnergy(torch.nn.Module):
    """TorchForce module: ``forward(positions (n, 3) nm, box (3, 3) nm) -> energy () kJ/mol, float64``.

    openmm-torch passes positions and box as float64 on Reference/CPU and on CUDA/OpenCL in double
    precision, float32 otherwise; they are cast to the model's dtype here, so autograd returns the
    gradient in the dtype OpenMM gave. The energy is read with ``item<double>()``, so any float dtype would
    do; float64 keeps the sum of a float64 model exact.
    """

    def __init__(self, model: CGModel, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, positions: Tensor, box: Tensor) -> Tensor:
        return self.model(positions.to(self.dtype), box.to(self.dtype)).to(torch.float64)


class _NonPeriodicEnergy(torch.nn.Module):
    """TorchForce module without periodicity: ``forward(positions (n, 3) nm) -> energy () kJ/mol``."""

    def __init__(self, model: CGModel, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, positions: Tensor) -> Tensor:
        return self.model(positions.to(self.dtype), None).to(torch.float64)


def torch_module(model: CGModel, *, periodic: bool = True, dtype=None) -> torch.nn.Module:
    """The eager module that :func:`script_model` compiles: ``forward(positions (n, 3) nm, box (3, 3) nm)
    -> energy () kJ/mol`` (see :class:`_PeriodicEnergy`), on a copy of the weights in ``dtype``.

    The copy is in eval mode and none of its weights requires a gradient. That matters for speed once
    scripted: TorchScript's autodiff gives each differentiable subgraph a backward that computes the
    gradient of every input that requires one, so a scripted copy of a trainable model would compute all
    weight gradients at every call (the neural demo model at 4,032 beads: 1.3x the eager time), which
    eager ``autograd.grad`` with respect to the positions skips. It is also the eager twin of the export:
    compare timings or results of :func:`script_model` with it, not with the trainable model.
    """
    if not isinstance(model, CGModel):
        raise EnpcgError(f"model must be an enpcg CGModel; you supplied {type(model).__name__}")
    dt = _resolve_dtype(model, dtype)
    wrapper = (_PeriodicEnergy if periodic else _NonPeriodicEnergy)(_model_copy(model, dt), dt)
    return wrapper.eval()


def script_model(model: CGModel, *, periodic: bool = True, dtype=None) -> torch.jit.ScriptModule:
    """TorchScript module of ``model`` in the form TorchForce calls it: ``torch.jit.script`` of
    :func:`torch_module` (see there and :class:`_PeriodicEnergy`).

    The module holds a copy of the model's weights (later changes to ``model`` do not reach it). It is left
    unfrozen: openmm-torch (>= 1.0) moves it to the Context's device, then calls ``eval()`` and
    ``torch.jit.freeze`` itself, so what runs in OpenMM is the frozen module (weights folded into the graph,
    ``forward`` only). Freezing here instead would pin the weights to the CPU (``.to(device)`` cannot move
    graph constants). To time or test the module as OpenMM runs it, use
    ``torch.jit.freeze(script_model(model))``; measured against :func:`torch_module` on 2 CPU cores (neural
    demo model, 4,032 beads, energy + forces, float64) that is 0.97-0.99x the eager time, and the unfrozen
    module 1.04-1.07x.
    """
    module = torch_module(model, periodic=periodic, dtype=dtype)
    ensure_vesin(required=False)  # models that call vesin's neighbour-list ops need them registered
    try:
        return torch.jit.script(module)
    except Exception as e:  # TorchScript compile errors are RuntimeError/NotSupportedError subclasses
        raise EnpcgError(f"model kind {model.kind!r} could not be compiled with torch.jit.script ({e}); "
                         "export it with backend='python' instead") from None


def save_torchscript(model: CGModel, path, *, periodic: bool = True, dtype=None) -> Path:
    """Write the TorchForce module of ``model`` to ``path`` (``torch.jit.save``, atomically).

    Load it with ``TorchForce(str(path))``; the file runs code when loaded: keep it among trusted files.
    """
    module = script_model(model, periodic=periodic, dtype=dtype)
    with atomic_path(path) as tmp:
        torch.jit.save(module, str(tmp))
    return Path(path)


def graph_safe_model(model: CGModel, box=None, positions=None) -> CGModel:
    """A copy of ``model`` (same weights) whose pair lists CUDA graphs can capture: every ``pair_list`` in its
    config becomes :func:`enpcg.neighbors.graph_safe_pair_list` of ``box`` (3, 3) nm and the term's cutoff
    (the fixed-shape cell list, or the dense list for boxes too small for 3 cells per side); ``positions``
    (n, 3) nm, if given, size the cell lists' capacities."""
    from enpcg.neighbors import graph_safe_pair_list

    def convert(cfg):
        if isinstance(cfg, list):
            return [convert(c) for c in cfg]
        if not isinstance(cfg, dict):
            return cfg
        out = {k: convert(v) for k, v in cfg.items()}
        if "pair_list" in cfg:
            out["pair_list"] = graph_safe_pair_list(box, float(cfg.get("cutoff", 1.0)), positions)
        return out

    desc = model.describe()
    if '"pair_list"' not in json.dumps(desc["config"]):
        return model  # no pair list: nothing to change
    new = model_from_description({"kind": desc["kind"], "config": convert(desc["config"])}, model.topology)
    new.to(model_dtype(model))
    new.load_state_dict(model.state_dict())
    return new


def _torch_forces(model: CGModel, *, periodic: bool, dtype, cuda_graphs: bool, box=None, positions=None) -> list:
    openmmtorch = import_openmmtorch()
    if cuda_graphs:
        model = graph_safe_model(model, box if periodic else None, positions)
    force = openmmtorch.TorchForce(script_model(model, periodic=periodic, dtype=dtype))
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    force.setOutputsForces(False)  # forces come from OpenMM-side autograd of the energy
    if cuda_graphs:
        # CUDA platform only (others ignore it); the model must be graph-safe (fixed shapes, no host syncs).
        force.setProperty("useCUDAGraphs", "true")
    return [force]


# ------------------------------------------------------------------------------------------------ python
class ModelComputation:
    """PythonForce computation: energy (kJ/mol) and forces ((n, 3) kJ/mol/nm) of a CG model, by autograd.

    Holds the model description (``kind``, ``config``, ``topology`` dict), its state dict (as numpy
    arrays) and the dtype; the torch model is rebuilt lazily on first call (and after unpickling), so
    ``XmlSerializer`` can pickle it. Unpickling needs the model kind registered (the built-in kinds
    register themselves on import; a kind defined elsewhere must be imported first).
    """

    def __init__(self, description: dict, state: dict, dtype: str = "float64", periodic: bool = True):
        self.description = description
        self.state = state
        self.dtype = dtype
        self.periodic = bool(periodic)
        self._model = None

    @classmethod
    def from_model(cls, model: CGModel, *, dtype=None, periodic: bool = True) -> "ModelComputation":
        dt = _resolve_dtype(model, dtype)
        state = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
        comp = cls(model.describe(), state, str(dt).replace("torch.", ""), periodic)
        try:
            comp.model()
        except Exception as e:
            raise EnpcgError(f"model kind {model.kind!r} cannot be rebuilt from its description and weights "
                             f"({type(e).__name__}: {e}); backend='python' needs a registered kind whose "
                             "config rebuilds it") from None
        return comp

    def model(self) -> CGModel:
        """The rebuilt torch model (cached)."""
        if self._model is None:
            m = model_from_description(self.description)
            m.to(_DTYPES[self.dtype])
            m.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in self.state.items()})
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
            self._model = m
        return self._model

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_model"] = None  # rebuilt on demand; keeps pickles free of torch modules
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)

    def __call__(self, state):
        """OpenMM State -> (energy kJ/mol, forces (n, 3) kJ/mol/nm as float64 numpy)."""
        pos = state.getPositions(asNumpy=True).value_in_unit(openmm.unit.nanometer)
        box = None
        if self.periodic:
            box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(openmm.unit.nanometer)
        energy, forces = energy_and_forces(self.model(), np.asarray(pos), None if box is None else np.asarray(box))
        return energy, np.asarray(forces, dtype=np.float64)


def _python_forces(model: CGModel, *, periodic: bool, dtype, cuda_graphs: bool) -> list:
    if not hasattr(openmm, "PythonForce"):
        raise EnpcgError(f"backend='python' needs openmm.PythonForce (OpenMM >= 8.6); this is OpenMM "
                         f"{openmm.__version__}; use backend='torch' or upgrade OpenMM")
    force = openmm.PythonForce(ModelComputation.from_model(model, dtype=dtype, periodic=periodic))
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    return [force]


# ------------------------------------------------------------------------------------------------ native
_PERIODIC_METHODS = {
    openmm.NonbondedForce: (openmm.NonbondedForce.CutoffNonPeriodic, openmm.NonbondedForce.CutoffPeriodic),
    openmm.CustomNonbondedForce: (openmm.CustomNonbondedForce.CutoffNonPeriodic,
                                  openmm.CustomNonbondedForce.CutoffPeriodic),
}


def _make_nonperiodic(force):
    """Turn periodicity off in a native force: bonded forces by their flag, cutoff nonbonded ones by method."""
    for cls, (nonperiodic, periodic_method) in _PERIODIC_METHODS.items():
        if isinstance(force, cls):
            if force.getNonbondedMethod() == periodic_method:
                force.setNonbondedMethod(nonperiodic)
            return
    if hasattr(force, "setUsesPeriodicBoundaryConditions"):
        force.setUsesPeriodicBoundaryConditions(False)


def _native_forces(model: CGModel, *, periodic: bool, dtype, cuda_graphs: bool) -> list:
    # dtype does not apply: native forces compute in the platform's precision. The model sets periodicity
    # from its own config (as its torch code does); periodic=False (no box given) turns it off in both.
    forces = list(model.native_forces())
    if not periodic:
        for f in forces:
            _make_nonperiodic(f)
    return forces


def split_native(model: CGModel):
    """(native forces of the terms of ``model`` that have a native form, the model of the other terms or None):
    the two parts of the ``"mixed"`` backend. A ``sum`` model is split term by term; any other model is one
    term. The second part is that term itself when it is one, else a new ``sum`` of them with the same weights
    (the TorchForce export copies it either way)."""
    terms = list(model.terms) if model.kind == "sum" else [model]
    native, rest = [], []
    for term in terms:
        try:
            native.append(list(term.native_forces()))
        except EnpcgError:  # no native form (neural terms)
            rest.append(term)
    if not rest:
        return [f for fs in native for f in fs], None
    if len(rest) == 1:
        return [f for fs in native for f in fs], rest[0]
    remaining = model_from_description(
        {"kind": "sum", "config": {"terms": [{"kind": t.kind, "config": t.config} for t in rest]}}, model.topology)
    remaining.to(model_dtype(model))
    for dst, src in zip(remaining.terms, rest):
        dst.load_state_dict(src.state_dict())
    return [f for fs in native for f in fs], remaining


def _mixed_forces(model: CGModel, *, periodic: bool, dtype, cuda_graphs: bool, box=None, positions=None) -> list:
    native, remaining = split_native(model)
    if not periodic:
        for f in native:
            _make_nonperiodic(f)
    if remaining is None:
        return native
    return native + _torch_forces(remaining, periodic=periodic, dtype=dtype, cuda_graphs=cuda_graphs, box=box,
                                  positions=positions)


# ------------------------------------------------------------------------------------------------ front
BACKENDS = {"torch": _torch_forces, "python": _python_forces, "native": _native_forces, "mixed": _mixed_forces}


def export_forces(model: CGModel, backend: str = "torch", *, periodic: bool = True, dtype=None,
                  force_group: int = 0, cuda_graphs: bool = False, box=None, positions=None) -> list:
    """OpenMM forces computing ``model``'s energy (kJ/mol) and forces (kJ/mol/nm) from positions in nm.

    Parameters
    ----------
    model : CGModel
        The CG model; it is copied (later changes to it do not reach the forces).
    backend : {"torch", "python", "native", "mixed"}
        ``"torch"``: TorchForce (openmm-torch); ``"python"``: openmm.PythonForce; ``"native"``: the model's
        built-in OpenMM forces; ``"mixed"``: native forces for the terms that have them, a TorchForce for the
        rest. See the module docstring.
    periodic : bool
        Pass the periodic box (nm) to the model; False for an isolated cluster. A model whose config says
        ``periodic: false`` ignores the box either way (its native forces are then non-periodic too).
    dtype : torch.float32 | torch.float64 | "float32" | "float64" | None
        Precision the model computes in ("torch" and "python"); None keeps the model's own.
    force_group : int
        OpenMM force group (0-31) of every returned force.
    cuda_graphs : bool
        Capture the TorchForce in a CUDA graph (CUDA platform, backend="torch" only). The exported copy
        finds pairs with fixed shapes and no host synchronisation (:func:`graph_safe_model`): a cell list
        sized from ``box``, or the dense list in small boxes.
    box : (3, 3) array, nm, optional
        The System's periodic box; with ``cuda_graphs`` it sizes the cell list (a box that changes later,
        e.g. under a barostat, is handled while cells stay at least a cutoff wide; the list's overflow flag
        says when they do not).
    positions : (n, 3) array, nm, optional
        With ``cuda_graphs``: a typical configuration (e.g. the starting one) on which the cell list's
        capacities are sized (the fullest cell and the pairs per bead, x 1.5 and 1.25) instead of on the mean density;
        fewer candidates and padded pairs per step. A later overflow is flagged as usual.

    Returns
    -------
    list of openmm.Force, to add to a System with ``system.addForce``.
    """
    if backend not in BACKENDS:
        raise EnpcgError(f"unknown export backend {backend!r}; available backends: {sorted(BACKENDS)}")
    if not isinstance(model, CGModel):
        raise EnpcgError(f"model must be an enpcg CGModel; you supplied {type(model).__name__}")
    if not isinstance(force_group, (int, np.integer)) or not 0 <= int(force_group) <= 31:
        raise EnpcgError(f"force_group must be an integer from 0 to 31 (OpenMM's limit); you supplied {force_group!r}")
    if cuda_graphs and backend not in ("torch", "mixed"):
        raise EnpcgError(f"cuda_graphs=True applies to backend='torch' or 'mixed' only; you asked for "
                         f"backend={backend!r}")
    if positions is not None:
        if not cuda_graphs:
            raise EnpcgError("export_forces: 'positions' sizes the cell lists of cuda_graphs=True exports; pass "
                             "cuda_graphs=True or leave positions out")
        positions = np.asarray(positions, dtype=np.float64)
        n_beads = model.topology.n_beads
        if positions.shape != (n_beads, 3) or not np.all(np.isfinite(positions)):
            raise EnpcgError(f"export_forces: positions must be a finite ({n_beads}, 3) array in nm, one row per "
                             f"bead of the model's topology; you supplied shape {positions.shape}")
    kw = {"box": box, "positions": positions} if backend in ("torch", "mixed") else {}
    forces = BACKENDS[backend](model, periodic=bool(periodic), dtype=dtype, cuda_graphs=bool(cuda_graphs), **kw)
    for f in forces:
        f.setForceGroup(int(force_group))
        if backend in ("torch", "python") or (backend == "mixed" and type(f).__name__ == "TorchForce"):
            f.setName(f"enpcg {model.kind} ({'torch' if backend == 'mixed' else backend})")
    return forces
