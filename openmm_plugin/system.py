"""The front door for OpenMM scripts: a fitted CG model as an OpenMM System (in the manner of openmm-ml).

>>> from openmm_plugin import CGPotential
>>> potential = CGPotential("runs/pe/model")                 # a model directory (or a CGModel)
>>> system = potential.create_system("runs/pe/cg.pdb")        # beads, masses, box, the model's forces
>>> topology = potential.topology.to_openmm_topology(box)     # CG bonds declared, for reporters

Units: nm, ps, kJ/mol, amu (OpenMM's). Box vectors are the rows of a (3, 3) array in nm.

Also here: :func:`save_system` / :func:`load_system`, XML files of Systems. Loading goes around a crash of
the installed openmm-torch (1.5 wheel with OpenMM 8.6): its XML deserializer segfaults on every TorchForce,
so TorchForces are rebuilt here in Python from the module the XML carries. A System file holding a
TorchForce or a PythonForce runs code when loaded or evaluated: load only files you trust.
"""
from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch  # before openmm, so OpenMM's plugin loader finds libtorch for the openmm-torch kernels
import openmm
from openmm import app, unit

from enpcg.errors import EnpcgError
from enpcg.fileio import atomic_write
from enpcg.models.base import CGModel, check_model_matches, load_model, topology_hash
from enpcg.topology import CGTopology

from ._imports import import_openmmtorch
from .export import _resolve_dtype, export_forces


def _box_array(box, what: str) -> Optional[np.ndarray]:
    """(3, 3) float64 nm from an array, a Quantity or a sequence of Vec3; None stays None."""
    if box is None:
        return None
    if unit.is_quantity(box):
        box = box.value_in_unit(unit.nanometer)
    try:
        arr = np.asarray(box, dtype=np.float64)  # Vec3 is a tuple: a list of three reads as (3, 3)
    except (TypeError, ValueError):
        raise EnpcgError(f"{what} must be a (3, 3) array of box vectors in nm; you supplied {box!r}") from None
    if arr.shape != (3, 3):
        raise EnpcgError(f"{what} must be shape (3, 3) (box vectors as rows, nm); you supplied {arr.shape}")
    return arr


def _names_match(model_names: list, other_names: list, width: Optional[int]) -> Optional[int]:
    """Index of the first bead whose names differ (compared on ``width`` characters), or None."""
    for i, (a, b) in enumerate(zip(model_names, other_names)):
        a, b = a.strip(), b.strip()
        if width is not None:
            a, b = a[:width], b[:width]
        if a != b:
            return i
    return None


def _names_hash(names: list, width: Optional[int]) -> str:
    """sha256 hex digest of bead names (stripped, cut to ``width`` characters): what a PDB can be checked by."""
    import hashlib

    cut = [n.strip()[:width] if width is not None else n.strip() for n in names]
    return hashlib.sha256(json.dumps(cut, separators=(",", ":")).encode()).hexdigest()


def _fitted_periodic(config: dict) -> bool:
    """True when a model config (or any term of a "sum" model) declares ``periodic: true``."""
    if config.get("periodic"):
        return True
    return any(_fitted_periodic(t.get("config", {})) for t in config.get("terms", []))


class CGPotential:
    """A fitted CG model, ready to become an OpenMM System.

    Parameters
    ----------
    model_or_directory : CGModel or path
        A model object, or a model directory (``model.json`` + ``model.pt``, see ``enpcg.models.save_model``).
    dtype : torch.float32 | torch.float64 | "float32" | "float64" | None
        Precision the exported model computes in (backends "torch" and "python"); None keeps the model's.
    mapping : enpcg.mapping.Mapping or its hash (str), optional
        The mapping of the system to simulate: refused (EnpcgError naming both hashes) unless the model was
        trained on data of this mapping (see :func:`enpcg.models.base.check_model_matches`).

    Attributes
    ----------
    model : CGModel
    topology : CGTopology, the CG topology the model was fitted for (bead count, names, masses in amu).
    """

    def __init__(self, model_or_directory: Union[CGModel, str, Path], dtype=None, mapping=None):
        if isinstance(model_or_directory, CGModel):
            model = model_or_directory  # not converted here: the export copies it into ``dtype``
        elif isinstance(model_or_directory, (str, Path)):
            model = load_model(model_or_directory)
        else:
            raise EnpcgError(f"CGPotential takes a CGModel or a model directory; you supplied "
                             f"{type(model_or_directory).__name__}")
        if getattr(model, "oriented", False):
            raise EnpcgError(f"model kind {model.kind!r} is an oriented-bead model: its beads need body frames and "
                             "rigid massive sites; build its System with "
                             "openmm_plugin.oriented.create_oriented_system(model, centres, axes, box)")
        _resolve_dtype(model, dtype)  # reject a bad dtype here rather than at export
        if mapping is not None:
            check_model_matches(model, mapping_hash=mapping, source=getattr(mapping, "source", "mapping"))
        self.model = model
        self.dtype = dtype
        self.topology: CGTopology = model.topology

    def openmm_topology(self, box=None) -> app.Topology:
        """The model's CG topology as an ``openmm.app.Topology`` (one residue per molecule, CG bonds
        declared), with periodic box vectors ``box`` ((3, 3) nm) when given: for Simulation and reporters."""
        return self.topology.to_openmm_topology(_box_array(box, "box") if box is not None else None)

    def __repr__(self):
        return f"CGPotential(kind={self.model.kind!r}, n_beads={self.topology.n_beads})"

    # ------------------------------------------------------------------ topology checks
    def check_topology(self, cg_topology, source=None):
        """Refuse a CG topology the model was not trained for (EnpcgError with both hashes and the fix).

        cg_topology : CGTopology (compared in full by topology hash: names, types, masses, molecules, bonded
        terms), openmm.app.Topology or a PDB path (bead count and names, the most a PDB carries).
        source : the file it came from, for the message.
        """
        self._check_topology(cg_topology, source)

    def _check_topology(self, cg_topology, source=None):
        """Validate ``cg_topology`` against the model's; return (masses amu, box nm or None from it)."""
        top = self.topology
        if cg_topology is None:
            return top.masses, None
        width = None
        box = None
        masses = top.masses
        source = str(source) if source is not None else type(cg_topology).__name__
        if isinstance(cg_topology, CGTopology):
            names = cg_topology.bead_names
            masses = cg_topology.masses
        elif isinstance(cg_topology, app.Topology):
            names = [a.name for a in cg_topology.atoms()]
            box = cg_topology.getPeriodicBoxVectors()
        elif isinstance(cg_topology, (str, Path)):
            path = Path(cg_topology)
            if not path.exists():
                raise EnpcgError(f"{path}: CG topology PDB not found")
            try:
                pdb = app.PDBFile(str(path))
            except Exception as e:
                raise EnpcgError(f"{path}: could not read it as a PDB file ({e})") from None
            names = [a.name for a in pdb.topology.atoms()]
            box = pdb.topology.getPeriodicBoxVectors()
            width = 4  # PDB atom names hold 4 characters
            source = str(path)
        else:
            raise EnpcgError(f"cg_topology must be a CGTopology, an openmm.app.Topology or a PDB path; you "
                             f"supplied {type(cg_topology).__name__}")

        def refuse(what):
            model_name = getattr(self.model, "source", None) or f"<{self.model.kind} model in memory>"
            meta = getattr(self.model, "metadata", None) or {}
            raise EnpcgError(
                f"{source}: {what}: model {model_name} (topology hash {topology_hash(top)}, mapping hash "
                f"{meta.get('mapping_hash') or 'not recorded'}); bead-name hash {_names_hash(names, width)} "
                f"(found) vs {_names_hash(top.bead_names, width)} (expected). Fix: use the cg.pdb / "
                "cg_topology.json that `enpcg map` wrote for the data the model was fitted on, or refit the "
                "model on data mapped to these beads")

        if len(names) != top.n_beads:
            refuse(f"the topology has {len(names)} beads but the model was fitted for {top.n_beads} beads")
        bad = _names_match(top.bead_names, names, width)
        if bad is not None:
            refuse(f"bead {bad} is named {names[bad]!r} but the model expects {top.bead_names[bad]!r} there (both "
                   f"have {top.n_beads} beads; the bead order must be the one the model was fitted on)")
        if isinstance(cg_topology, CGTopology) and cg_topology is not top:  # types, masses, bonded terms...
            check_model_matches(self.model, topology=cg_topology, source=source)
        return masses, _box_array(box, f"{source} periodic box") if box is not None else None

    # ------------------------------------------------------------------ systems
    def _system_args(self, cg_topology, box, kw):
        """(masses amu, box nm or None, periodic, export_forces keywords) of a System, as create_system reads
        its arguments."""
        masses, top_box = self._check_topology(cg_topology)
        box = _box_array(box, "box") if box is not None else top_box
        if box is None and "periodic" not in kw and _fitted_periodic(self.model.config):
            raise EnpcgError(f"the {self.model.kind!r} model is periodic (its config says periodic: true) but no box "
                             "was given: pass box=(3, 3) nm or a PDB/Topology with a CRYST1 box, or "
                             "periodic=False to simulate it as an isolated cluster")
        kw = dict(kw)
        periodic = kw.pop("periodic", box is not None)
        if periodic and box is None:
            raise EnpcgError("periodic=True needs a box: pass box=(3, 3) nm or a PDB/Topology that has one")
        kw.setdefault("dtype", self.dtype)
        if kw.get("cuda_graphs") and box is not None:
            kw.setdefault("box", box)  # sizes the graph-safe cell list
        return masses, box, periodic, kw

    @staticmethod
    def _particles(masses, box, remove_cm_motion: bool) -> openmm.System:
        """A System of the beads (masses amu) with box vectors ``box`` (nm) and no model forces yet."""
        system = openmm.System()
        for m in masses:
            system.addParticle(float(m))
        if box is not None:
            try:
                system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
            except openmm.OpenMMException as e:
                raise EnpcgError(f"box {box.tolist()} nm is not in OpenMM's reduced form (a along x, b in the xy "
                                 f"plane, |b_x| <= a_x/2, ...): {e}") from None
        if remove_cm_motion:
            system.addForce(openmm.CMMotionRemover())
        return system

    def create_system(self, cg_topology=None, *, box=None, backend: str = "torch",
                      remove_cm_motion: bool = True, **kw) -> openmm.System:
        """An OpenMM System of the CG beads with the model's forces.

        Parameters
        ----------
        cg_topology : CGTopology | openmm.app.Topology | str | Path | None
            Checked against the model's topology (bead count, bead names and order); a PDB path or an
            OpenMM Topology also supplies the periodic box when ``box`` is None. None: the model's own.
        box : (3, 3) array, nm, optional
            Periodic box vectors (rows, OpenMM reduced form). Without a box (here or from ``cg_topology``)
            the system is non-periodic.
        backend : {"torch", "python", "native", "mixed"}
            See :func:`openmm_plugin.export.export_forces`.
        remove_cm_motion : bool
            Add a CMMotionRemover (OpenMM's default for MD).
        **kw
            ``periodic`` (default: whether there is a box), ``dtype``, ``force_group``, ``cuda_graphs``:
            passed to :func:`export_forces`.

        Returns
        -------
        openmm.System : one particle per bead (mass in amu), box vectors set, the model's forces.

        A TorchForce whose model finds pairs with the fixed-capacity cell list (``cuda_graphs=True``, or a
        ``"cells"`` pair list in the model's config) stops a run with a NaN energy when the list overflows;
        :meth:`cell_lists` (same arguments) gives what ``run_simulation(cell_lists=...)`` needs to restart it
        with larger capacities.
        """
        masses, box, periodic, kw = self._system_args(cg_topology, box, kw)
        system = self._particles(masses, box, remove_cm_motion)
        for f in export_forces(self.model, backend, periodic=periodic, **kw):
            system.addForce(f)
        return system

    def cell_lists(self, cg_topology=None, *, box=None, backend: str = "torch", remove_cm_motion: bool = True,
                   **kw) -> Optional["CellLists"]:
        """The fixed-capacity cell lists of the System that :meth:`create_system` builds from the same arguments,
        as a :class:`CellLists` (checks a structure against their capacities, rebuilds the System with larger
        ones), or None when that System has none (backend other than "torch" or "mixed" (whose TorchForce holds
        only the terms without a native form), no periodic box, or no "cells"
        pair list after the graph-safe swap of ``cuda_graphs=True``). For
        :func:`openmm_plugin.simulate.run_simulation` (``cell_lists=``)."""
        if backend not in ("torch", "mixed"):
            return None
        masses, box, periodic, kw = self._system_args(cg_topology, box, kw)
        if not periodic:
            return None
        model = self.model
        if backend == "mixed":  # only the terms without a native form are in the TorchForce
            from .export import split_native

            model = split_native(model)[1]
            if model is None:
                return None
        if kw.get("cuda_graphs"):
            from .export import graph_safe_model

            model = graph_safe_model(model, kw.get("box"))  # what export_forces scripts
        if not _cell_pair_lists(model):
            return None
        model = copy.deepcopy(model)  # graph_safe_model may return the model itself; its lists get replaced
        return CellLists(model, _resolve_dtype(self.model, kw.get("dtype")), len(masses), kw)

    def add_forces(self, system: openmm.System, *, backend: str = "torch", force_group: int = 0,
                   periodic: bool = True, **kw) -> list:
        """Add the model's forces to ``system`` (which must hold exactly the model's beads); return them.

        ``periodic`` says whether the model sees the box (nm); ``**kw`` (``dtype``, ``cuda_graphs``) go to
        :func:`export_forces`.
        """
        n = system.getNumParticles()
        if n != self.topology.n_beads:
            raise EnpcgError(f"the System has {n} particles but the model was fitted for {self.topology.n_beads} "
                             "beads; add the forces to a System of the model's CG beads")
        kw.setdefault("dtype", self.dtype)
        forces = export_forces(self.model, backend, periodic=periodic, force_group=force_group, **kw)
        for f in forces:
            system.addForce(f)
        return forces


def _cell_pair_lists(model) -> list:
    """The PairLists of ``model`` (in module order) that find pairs with a fixed-capacity CellList."""
    from enpcg.neighbors import PairList

    return [m for m in model.modules() if isinstance(m, PairList) and len(m.cells) > 0]


class CellLists:
    """The fixed-capacity cell lists (:class:`enpcg.cell_list.CellList`) of a CG System's TorchForce, and how to
    rebuild that System with larger ones: what :func:`openmm_plugin.simulate.run_simulation` (``cell_lists=``)
    uses to restart a run whose cell list overflowed. Made by :meth:`CGPotential.cell_lists`.

    The TorchForce's overflow flag lives inside OpenMM's copy of the module and cannot be read from Python;
    :meth:`overflowed` evaluates an eager copy of the same model (same capacities, same dtype) on a structure
    instead. Units: nm.

    Attributes: ``n_particles`` (int); :attr:`capacities`, one ``{"cell_capacity", "max_neighbors"}`` per cell
    list in module order (JSON-able; :meth:`set_capacities` takes the same list back).
    """

    def __init__(self, model: CGModel, dtype: torch.dtype, n_particles: int, export_kw: dict):
        model = model.to(dtype)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self._model, self._dtype = model, dtype
        kw = dict(export_kw)
        self._cuda_graphs = bool(kw.pop("cuda_graphs", False))
        kw.pop("box", None)  # the model already holds its cell lists: export it as it is (see system())
        kw.pop("dtype", None)
        self._export_kw = kw
        self.n_particles = int(n_particles)

    def _lists(self):
        return [pl.cells[0] for pl in _cell_pair_lists(self._model)]

    @property
    def capacities(self) -> list:
        return [{"cell_capacity": int(cl.cell_capacity), "max_neighbors": int(cl.max_neighbors)}
                for cl in self._lists()]

    def set_capacities(self, capacities: list) -> None:
        """Rebuild the cell lists with ``capacities`` (as :attr:`capacities` gives them)."""
        pls = _cell_pair_lists(self._model)
        if len(capacities) != len(pls):
            raise EnpcgError(f"{len(capacities)} cell-list capacities given for a model with {len(pls)} cell lists")
        for pl, cap in zip(pls, capacities):
            pl.cells[0] = pl.cells[0].with_capacities(cap["cell_capacity"], cap["max_neighbors"]).to(self._dtype)

    def _tensors(self, positions, box):
        x = torch.as_tensor(np.asarray(positions, dtype=np.float64)).to(self._dtype)
        b = torch.as_tensor(np.asarray(box, dtype=np.float64)).to(self._dtype)
        return x, b

    def overflowed(self, positions, box) -> bool:
        """Whether the cell lists at their present capacities overflow on ``positions`` (n, 3) in ``box`` (3, 3)
        (nm), as the TorchForce's would on the same input (openmm-torch hands it float64 positions on the
        Reference and CPU platforms; the model casts them to its dtype, as here)."""
        x, b = self._tensors(positions, box)
        if not (torch.isfinite(x).all() and torch.isfinite(b).all()):
            return False
        for cl in self._lists():
            cl.reset_overflow()
        with torch.no_grad():
            self._model(x, b)
        return any(cl.overflowed() for cl in self._lists())

    def grow(self, positions, box, max_capacity_factor: int = 1 << 10) -> list:
        """Double the capacity that ``positions`` in ``box`` overflow (a cell's, the pair slots, or both), as
        often as needed, until :meth:`overflowed` is False there; return the new :attr:`capacities`.
        EnpcgError when that needs more than ``max_capacity_factor`` x the present capacities, or when no
        capacity would help (a box shrunk below the cell grid)."""
        x, b = self._tensors(positions, box)
        for pl in _cell_pair_lists(self._model):
            cl = pl.cells[0]
            need_cell, need_nb = cl.needed(x, b)
            cap, nb = cl.cell_capacity, cl.max_neighbors
            while cap < min(need_cell, cl.n_particles):
                cap *= 2
            while nb < min(need_nb, cl.n_particles - 1):
                nb *= 2
            if cap > max_capacity_factor * cl.cell_capacity or nb > max_capacity_factor * cl.max_neighbors:
                raise EnpcgError(f"the cell list would need cell_capacity {need_cell} and max_neighbors {need_nb} "
                                 f"(now {cl.cell_capacity} and {cl.max_neighbors}): more than "
                                 f"{max_capacity_factor}x; the structure has collapsed. Fix: check the model")
            if (cap, nb) != (cl.cell_capacity, cl.max_neighbors):
                pl.cells[0] = cl.with_capacities(cap, nb).to(self._dtype)
        if self.overflowed(positions, box):
            raise EnpcgError("the cell list overflows although its capacities hold the fullest cell and the most "
                             "partners of this structure: its cells are narrower than the cutoff (the box shrank "
                             "below the grid it was built for). Fix: rebuild the model's pair list for this box")
        return self.capacities

    def double(self) -> list:
        """Double every capacity of every cell list (after an overflow at a structure no longer at hand, e.g.
        one the minimiser passed through); return the new :attr:`capacities`. EnpcgError when they are
        already as large as the particle count allows."""
        before = self.capacities
        for pl in _cell_pair_lists(self._model):
            pl.cells[0] = pl.cells[0].grown().to(self._dtype)
        if self.capacities == before:
            raise EnpcgError(f"the cell list overflowed with capacities {before}, already as large as "
                             f"{self.n_particles} particles allow: its cells are narrower than the cutoff (the box "
                             "shrank below the grid it was built for). Fix: rebuild the model's pair list for this box")
        return self.capacities

    def system(self, system: openmm.System) -> openmm.System:
        """A copy of ``system`` (the one built with these cell lists: its particles, box, constraints and other
        forces are kept) whose TorchForce is replaced by one exported with the present capacities."""
        for pl in _cell_pair_lists(self._model):
            pl.cells[0].reset_overflow()
        # The model is already graph-safe with these capacities: exported as it is (export_forces would swap
        # in freshly sized cell lists with cuda_graphs=True), with the CUDA-graph property set here.
        forces = export_forces(self._model, "torch", periodic=True, dtype=self._dtype, **self._export_kw)
        if self._cuda_graphs:
            for f in forces:
                f.setProperty("useCUDAGraphs", "true")
        return _replace_torch_forces(system, forces)


def _replace_torch_forces(system: openmm.System, forces: list) -> openmm.System:
    """A copy of ``system`` with its TorchForces replaced, in order, by ``forces`` (as many). The copy goes
    through XML (the TorchForces themselves are never deserialized, see :func:`deserialize_system`)."""
    root = ET.fromstring(openmm.XmlSerializer.serialize(system))
    forces_el = root.find("Forces")
    elements = list(forces_el) if forces_el is not None else []
    n_torch = sum(el.get("type") == "TorchForce" for el in elements)
    if n_torch != len(forces):
        raise EnpcgError(f"the System holds {n_torch} TorchForce(s), but the cell lists belong to a model exported "
                         f"as {len(forces)}: pass CGPotential.cell_lists(...) with the arguments of the "
                         "create_system call that built this System")
    replacements = iter(forces)
    return _rebuild_with_forces(root, lambda el: next(replacements))


def _rebuild_with_forces(root: ET.Element, torch_force) -> openmm.System:
    """The System of the XML tree ``root`` with its forces re-added in order: OpenMM's own deserialized, each
    TorchForce element replaced by ``torch_force(element)`` (OpenMM's XML reader cannot rebuild TorchForces)."""
    forces_el = root.find("Forces")
    elements = list(forces_el)
    for el in elements:
        forces_el.remove(el)
    system = openmm.XmlSerializer.deserialize(ET.tostring(root, encoding="unicode"))
    for el in elements:
        if el.get("type") == "TorchForce":
            system.addForce(torch_force(el))
        else:
            system.addForce(openmm.XmlSerializer.deserialize(ET.tostring(el, encoding="unicode")))
    return system


# ---------------------------------------------------------------------- System XML files
def save_system(system: openmm.System, path) -> Path:
    """Write ``system`` as OpenMM XML to ``path`` (atomically)."""
    xml = openmm.XmlSerializer.serialize(system)
    with atomic_write(path) as fh:
        fh.write(xml)
    return Path(path)


def _torch_force_from_element(element: ET.Element):
    """Rebuild a TorchForce from its XML element (the TorchScript module is hex or base64 encoded)."""
    import base64
    import binascii
    import io

    openmmtorch = import_openmmtorch()
    encoded = element.get("encodedFileContents", "")
    if not encoded:
        raise EnpcgError("a TorchForce in the System XML has no encodedFileContents; it refers to a file "
                         f"{element.get('file')!r} instead: rebuild it with TorchForce(file)")
    try:
        data = bytes.fromhex(encoded)
    except ValueError:
        try:
            data = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise EnpcgError("a TorchForce in the System XML has a module that is neither hex nor base64") from None
    module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    properties = {p.get("name"): p.get("value") for p in element.iter("Property")}
    force = openmmtorch.TorchForce(module, properties)
    force.setForceGroup(int(element.get("forceGroup", "0")))
    force.setUsesPeriodicBoundaryConditions(element.get("usesPeriodic", "0") == "1")
    force.setOutputsForces(element.get("outputsForces", "0") == "1")
    for child in element:
        if child.tag == "GlobalParameters":
            for p in child:
                force.addGlobalParameter(p.get("name"), float(p.get("default")))
        elif child.tag == "ParameterDerivatives":
            for p in child:
                force.addEnergyParameterDerivative(p.get("name"))
    return force


def deserialize_system(xml: str) -> openmm.System:
    """An OpenMM System from its XML text; TorchForces are rebuilt in Python (see the module docstring)."""
    root = ET.fromstring(xml)
    forces_el = root.find("Forces")
    if root.tag != "System" or forces_el is None:
        return openmm.XmlSerializer.deserialize(xml)
    force_elements = list(forces_el)
    if not any(el.get("type") == "TorchForce" for el in force_elements):
        return openmm.XmlSerializer.deserialize(xml)
    import_openmmtorch()
    return _rebuild_with_forces(root, _torch_force_from_element)


def load_system(path) -> openmm.System:
    """Read a System XML file written by :func:`save_system` (or ``XmlSerializer``). Trusted files only."""
    path = Path(path)
    if not path.exists():
        raise EnpcgError(f"{path}: System XML file not found")
    try:
        return deserialize_system(path.read_text())
    except ET.ParseError as e:
        raise EnpcgError(f"{path}: not valid XML ({e})") from None
