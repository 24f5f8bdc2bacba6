"""A trained equivariant model as the atomistic reference of ``enpcg sample``.

``enpcg sample --reference MODEL_DIR`` (a model directory whose ``model.json`` has kind "equivariant") runs
MD with an OpenMM System whose only force is the model (a TorchForce), so the sampled frames and their
forces come from the same model. Particles carry the masses stored in the model's topology (the H5MD masses
it was trained on, amu), the box and starting positions are those of a melt (by default the bundled one,
:func:`systems.polyethylene.default_melt`), whose atom count and site names must match the model's.
Units: nm, kJ/mol, amu.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import EnpcgError
from .train import site_names


def is_equivariant_model_dir(path) -> bool:
    """True if ``path`` is a folder holding a model.json of kind "equivariant"."""
    cfg = Path(path) / "model.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("kind") == "equivariant"
    except (json.JSONDecodeError, AttributeError):
        return False


def equivariant_reference(model_dir, melt=None):
    """A :class:`systems.polyethylene.PolymerSystem` whose System is the equivariant model in ``model_dir``.

    melt : PolymerSystem or None (the bundled melt); gives the OpenMM topology, positions (nm) and box (nm).
    Raises EnpcgError when the melt's atoms (count, or site names by :func:`~enpcg.equivariant.train.site_names`)
    differ from the model's topology.
    """
    import openmm as mm

    from openmm_plugin.export import export_forces
    from systems.polyethylene import PolymerSystem, default_melt

    from ..models import load_model

    model = load_model(model_dir)
    if model.kind != "equivariant":
        raise EnpcgError(f"{Path(model_dir) / 'model.json'}: kind is {model.kind!r}; a sampling reference must be "
                         "an 'equivariant' model (train one with `enpcg train`)")
    if melt is None:
        melt = default_melt()
    top = model.topology
    atom_names = [a.name for a in melt.topology.atoms()]
    melt_sites = site_names(melt.masses, atom_names)
    if melt.n_particles != top.n_beads or melt_sites != list(top.bead_types):
        bad = next((k for k, (a, b) in enumerate(zip(melt_sites, top.bead_types)) if a != b), None)
        detail = (f"{melt.n_particles} atoms vs the model's {top.n_beads}" if melt.n_particles != top.n_beads
                  else f"atom {bad} is {melt_sites[bad]} in the melt but {top.bead_types[bad]} in the model")
        raise EnpcgError(f"{Path(model_dir) / 'model.json'}: topology does not match the starting melt ({detail}). "
                         "Fix: sample with a model trained on frames of the bundled melt (`enpcg sample "
                         "--reference default`, then `enpcg train`)")
    system = mm.System()
    for m in top.masses:
        system.addParticle(float(m))
    box = np.asarray(melt.box, dtype=np.float64)
    system.setDefaultPeriodicBoxVectors(*[mm.Vec3(*row) for row in box])
    # float32: twice as fast as float64 on CPUs and far faster on GPUs; thermal noise dwarfs its rounding, and
    # the frames' forces come from this same float32 model, so sampling and forces share one Hamiltonian.
    for force in export_forces(model, "torch", periodic=True, dtype="float32"):
        system.addForce(force)
    meta = {"reference": "equivariant", "model_dir": str(model_dir), **dict(melt.metadata or {})}
    return PolymerSystem(system=system, topology=melt.topology, positions=np.asarray(melt.positions), box=box,
                         masses=np.asarray(top.masses, dtype=np.float64), metadata=meta)
