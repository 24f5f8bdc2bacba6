"""OpenMM side of enpcg: export CG models as OpenMM forces, build CG Systems, run CG simulations.

Units are OpenMM's: nm, ps, kJ/mol, amu, K; forces in kJ/mol/nm; box vectors are the rows of a (3, 3) array.

>>> from openmm_plugin import CGPotential, run_simulation
>>> potential = CGPotential("runs/pe/model")
>>> system = potential.create_system("runs/pe/cg.pdb")

Names are imported on first use, so ``import openmm_plugin`` stays light. ``torch`` is imported before
``openmm`` here (openmm-torch's kernel plugins need libtorch loaded when OpenMM loads its plugins).

Security: TorchScript files and serialized Systems holding a TorchForce or a PythonForce run code when
loaded or evaluated; use only files from sources you trust.
"""
import importlib

_EXPORTS = {
    "CGPotential": ".system",
    "load_system": ".system",
    "save_system": ".system",
    "deserialize_system": ".system",
    "export_forces": ".export",
    "script_model": ".export",
    "save_torchscript": ".export",
    "BACKENDS": ".export",
    "run_simulation": ".simulate",
    "langevin_integrator": ".integrators",
    "fit_friction": ".cg_dynamics",
    "calibrate_time_scale": ".cg_dynamics",
    "DynamicsCalibration": ".cg_dynamics",
    "equilibrate": ".protocols",
    "quench": ".protocols",
    "age": ".protocols",
    "ProtocolRecords": ".protocols",
    "import_openmmtorch": "._imports",
    "create_oriented_system": ".oriented",
    "OrientedForceReporter": ".oriented",
    "rigid_body_layout": ".oriented",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import torch  # noqa: F401  (first: see the module docstring)

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
