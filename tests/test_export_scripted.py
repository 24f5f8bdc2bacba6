"""The TorchForce module of a neural CG model (priors + network, as the demo's): what it holds and what runs.

openmm-torch calls ``eval()`` and ``torch.jit.freeze`` on the module when a Context is created, so the module
that runs in OpenMM is the frozen ``script_model``; its eager twin is ``torch_module``. Checks: the export's
weights require no gradient (else TorchScript's autodiff computes every weight gradient at each call, 1.3x
slower than eager at 4k beads), the frozen and unfrozen modules give the eager twin's energy and forces
(float64 1e-12, float32 1e-5 relative), and so does a CPU-platform TorchForce built from the saved file.
12 + 4 beads, so the file runs in seconds.
"""
import numpy as np
import pytest
import torch  # before openmm: openmm-torch's kernel plugins need libtorch loaded
import openmm as mm
from openmm import unit

from enpcg.models import create_model
from enpcg.topology import CGTopology
from openmm_plugin._imports import import_openmmtorch
from openmm_plugin.export import save_torchscript, script_model, torch_module

BOX = np.diag([2.4, 2.5, 2.6])


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def sum_model():
    """Priors (bonds, angles, repulsion) + a neural model with the many-body readout switched on, float64."""
    names, types, mol, bonds = [], [], [], []
    for c in range(3):
        for k in range(4):
            i = len(names)
            names.append(f"C{c}B{k}")
            types.append("A")
            mol.append(c)
            if k > 0:
                bonds.append((i - 1, i))
    for f in range(4):
        names.append(f"F{f}")
        types.append("A")
        mol.append(3 + f)
    top = CGTopology(names, types, np.full(len(names), 28.0), np.array(mol), bonds=bonds)
    priors = {"kind": "priors", "config": {"cutoff": 0.8, "bonds": {"A-A": {"k": 2000.0, "r0": 0.4}},
                                           "angles": {"A-A-A": {"k": 30.0, "theta0": 2.3}},
                                           "repulsion": {"A-A": {"epsilon": 2.0, "sigma": 0.35}}}}
    model = create_model("sum", top, terms=[priors, {"kind": "neural", "config": {"cutoff": 0.9, "seed": 3}}])
    with torch.no_grad():
        ro = model.terms[1].readout2.weight
        ro.copy_(torch.randn(ro.shape, generator=torch.Generator().manual_seed(4)))
    return top, model.to(torch.float64)


def positions(top, seed=5):
    return np.random.default_rng(seed).uniform(0.0, 2.4, size=(top.n_beads, 3))


def energy_forces(module, x, box, dtype):
    xx = torch.as_tensor(x, dtype=dtype).clone().requires_grad_(True)
    e = module(xx, torch.as_tensor(box, dtype=dtype))
    (g,) = torch.autograd.grad(e, xx)
    return float(e.detach()), -g.detach().double().numpy()


def test_export_weights_require_no_gradient_and_model_is_untouched():
    _, model = sum_model()
    s = script_model(model)
    assert not any(p.requires_grad for p in s.parameters())
    assert not s.training
    assert all(p.requires_grad for p in model.parameters())  # the trainable model keeps its own
    assert not any(p.requires_grad for p in torch_module(model).parameters())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_frozen_and_unfrozen_export_equal_eager_twin(dtype, tol):
    top, model = sum_model()
    x = positions(top)
    e0, f0 = energy_forces(torch_module(model, dtype=dtype), x, BOX, dtype)
    for module in (script_model(model, dtype=dtype), torch.jit.freeze(script_model(model, dtype=dtype))):
        for _ in range(3):  # the profiling executor optimises the graph over the first calls
            e, f = energy_forces(module, x, BOX, dtype)
            assert abs(e - e0) <= tol * max(1.0, abs(e0))
            assert rel(f, f0) <= tol


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
def test_saved_file_in_cpu_torch_force_equals_eager_twin(tmp_path, dtype, tol):
    openmmtorch = import_openmmtorch()
    top, model = sum_model()
    x = positions(top, seed=6)
    e0, f0 = energy_forces(torch_module(model, dtype=dtype), x, BOX, getattr(torch, dtype))
    force = openmmtorch.TorchForce(str(save_torchscript(model, tmp_path / "model.pt", dtype=dtype)))
    force.setUsesPeriodicBoundaryConditions(True)
    system = mm.System()
    for m in top.masses:
        system.addParticle(float(m))
    system.setDefaultPeriodicBoxVectors(*[mm.Vec3(*row) for row in BOX])
    system.addForce(force)
    ctx = mm.Context(system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("CPU"))
    ctx.setPositions(x * unit.nanometer)
    for _ in range(3):
        st = ctx.getState(getEnergy=True, getForces=True)
        e = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        f = st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        assert abs(e - e0) <= tol * max(1.0, abs(e0))
        assert rel(f, f0) <= tol
