"""E(3)-equivariant atomistic potential (``enpcg.equivariant``): symmetries, forces, TorchScript, neighbour
lists, virial, files, OpenMM export and NVE energy conservation.

Systems: a 30-atom cluster of two united-atom species (CH2, CH3) with random non-overlapping positions, the
same atoms in a triclinic periodic box, and a 200-atom periodic box for NVE. Units: nm, kJ/mol, kJ/mol/nm.

Tolerances (stated again in each test): energies as |dE| per atom in kJ/mol, force sets as ||dF|| / ||F||.
* symmetry (rotation, reflection, translation, permutation, periodic images), scripted vs eager, dense vs
  vesin: 1e-10 in float64; float32: 1e-5 for forces, 1e-4 kJ/mol per atom for energies (the total holds
  the per-species shifts, ~ -90 kJ/mol per atom, so float32 rounding alone is ~1e-5 per atom);
* finite differences (central, h = 1e-5 nm): 1e-6;
* OpenMM export (TorchForce and PythonForce, Reference and CPU): 1e-6 (float64 model), 1e-4 (float32 model);
* NVE (Verlet, 1 fs, float64 model): |drift| <= 0.01 kT per atom per 10 ps (kT at 300 K).
"""
import time

import numpy as np
import openmm as mm
import pytest
import torch
from openmm import unit

from enpcg.equivariant import EquivariantModel
from enpcg.errors import EnpcgError
from enpcg.models import batch_forces, create_model, energy_and_forces, load_model, save_model
from enpcg.topology import CGTopology
from openmm_plugin._imports import import_openmmtorch
from openmm_plugin.export import export_forces

import_openmmtorch()

MASSES = {"CH2": 14.027, "CH3": 15.035}  # amu
SHIFTS = (-80.0, -95.0)  # kJ/mol, per species in type_names() order (CH2, CH3)
BOX = np.array([[1.25, 0.0, 0.0], [0.3, 1.2, 0.0], [-0.2, 0.35, 1.15]])  # nm, OpenMM reduced form
N_ATOMS = 30
L_MAX = [0, 1, 2]
TOL64 = 1e-10
TOL_F32 = 1e-5
TOL_E32 = 1e-4


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def make_topology(n: int) -> CGTopology:
    """n united atoms: every third one CH3, the rest CH2; one molecule per atom (bonds play no part)."""
    types = ["CH3" if k % 3 == 0 else "CH2" for k in range(n)]
    return CGTopology(bead_names=types, bead_types=types, masses=[MASSES[t] for t in types],
                      molecule_index=np.arange(n))


def min_image(d: np.ndarray, box) -> np.ndarray:
    """Minimum-image vectors (..., 3) nm for a reduced-form box (rows) or None."""
    if box is None:
        return d
    for k in (2, 1, 0):
        d = d - np.round(d[..., k:k + 1] / box[k, k]) * box[k]
    return d


def random_positions(n: int, rng, box=None, side: float = 1.0, min_dist: float = 0.25) -> np.ndarray:
    """(n, 3) nm, random sequential addition with every (minimum-image) distance >= min_dist."""
    pos = []
    while len(pos) < n:
        if box is None:
            x = rng.uniform(0.0, side, 3)
        else:
            x = rng.uniform(0.0, 1.0, 3) @ box
        if not pos or np.min(np.linalg.norm(min_image(np.asarray(pos) - x, box), axis=1)) >= min_dist:
            pos.append(x)
    return np.asarray(pos)


def random_orthogonal(rng, reflect: bool) -> np.ndarray:
    """A random rotation (det +1) or rotation-reflection (det -1), (3, 3)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q


def dtype_of(model) -> torch.dtype:
    return next(model.parameters()).dtype


def ef(model, pos, box=None):
    """Energy (B,) kJ/mol and forces (B, n, 3) kJ/mol/nm as float64 numpy for pos (B, n, 3) or (n, 3) nm."""
    pos = np.asarray(pos)
    single = pos.ndim == 2
    dt = dtype_of(model)
    x = torch.as_tensor(pos[None] if single else pos, dtype=dt)
    b = None
    if box is not None:
        b = torch.as_tensor(np.broadcast_to(box, (x.shape[0], 3, 3)).copy(), dtype=dt)
    e, f = batch_forces(model, x, b)
    e, f = e.detach().double().numpy(), f.detach().double().numpy()
    return (e[0], f[0]) if single else (e, f)


def atom_energies(model, pos, box=None) -> np.ndarray:
    """Per-atom energies minus the per-species shifts, (n,) kJ/mol float64, for pos (n, 3) nm."""
    dt = dtype_of(model)
    b = None if box is None else torch.as_tensor(box, dtype=dt)[None]
    with torch.no_grad():
        e = model.atom_energies(torch.as_tensor(pos, dtype=dt)[None], b)[0].double().numpy()
    return e - np.asarray(SHIFTS)[model.topology.type_index()]


_CACHE = {}


def model_for(l_max: int, dtype=torch.float64, neighbor_list: str = "dense", n: int = N_ATOMS):
    """A random model (seeded by l_max) with per-species shifts set; same weights for both neighbour lists."""
    key = (l_max, dtype, neighbor_list, n)
    if key not in _CACHE:
        m = EquivariantModel(make_topology(n), l_max=l_max, n_layers=2, mul=8, neighbor_list=neighbor_list,
                             seed=10 + l_max)
        with torch.no_grad():
            m.species_energy.copy_(torch.tensor(SHIFTS))
        _CACHE[key] = m.to(dtype)
    return _CACHE[key]


@pytest.fixture(scope="module")
def cluster():
    return random_positions(N_ATOMS, np.random.default_rng(1))


@pytest.fixture(scope="module")
def periodic():
    return random_positions(N_ATOMS, np.random.default_rng(2), box=BOX)


# ---------------------------------------------------------------------------------------------- symmetry
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reflect", [False, True], ids=["rotation", "reflection"])
@pytest.mark.parametrize("l_max", L_MAX)
def test_rotation_reflection_translation(cluster, l_max, reflect, dtype):
    """Each atom's energy minus its species shift is unchanged under x -> xQ^T + t within 1e-10 kJ/mol
    (float64; 1e-4 float32), and F(xQ^T + t) = F(x) Q^T within ||dF||/||F|| <= 1e-10 (float64) / 1e-5
    (float32; float32 rounding of the moved positions alone gives ~4e-6), for 3 random Q and t (|t| ~ 1 nm)."""
    model = model_for(l_max, dtype)
    rng = np.random.default_rng(100 + l_max)
    e0, f0 = ef(model, cluster)
    a0 = atom_energies(model, cluster)
    tol_e, tol_f = (TOL64, TOL64) if dtype == torch.float64 else (TOL_E32, TOL_F32)
    assert np.linalg.norm(f0) > 1.0  # the test would be empty with vanishing forces
    for _ in range(3):
        q = random_orthogonal(rng, reflect)
        x = cluster @ q.T + rng.normal(scale=0.5, size=3)
        e1, f1 = ef(model, x)
        assert np.abs(atom_energies(model, x) - a0).max() <= tol_e
        assert abs(e1 - e0) / N_ATOMS <= tol_e
        assert rel(f1, f0 @ q.T) <= tol_f


@pytest.mark.parametrize("l_max", L_MAX)
def test_permutation_of_same_species_atoms(cluster, l_max):
    """Swapping the positions of atoms of the same species permutes the forces and keeps the energy:
    |dE| <= 1e-10 kJ/mol per atom, ||dF||/||F|| <= 1e-10 (float64)."""
    model = model_for(l_max)
    types = np.asarray(model.topology.bead_types)
    rng = np.random.default_rng(7)
    perm = np.arange(N_ATOMS)
    for t in ("CH2", "CH3"):
        idx = np.flatnonzero(types == t)
        perm[idx] = rng.permutation(idx)
    e0, f0 = ef(model, cluster)
    e1, f1 = ef(model, cluster[perm])
    assert abs(e1 - e0) / N_ATOMS <= TOL64
    assert rel(f1, f0[perm]) <= TOL64


@pytest.mark.parametrize("neighbor_list", ["dense", "vesin"])
@pytest.mark.parametrize("l_max", L_MAX)
def test_periodic_images_and_batches(periodic, l_max, neighbor_list):
    """Moving atoms by whole box vectors changes nothing, and a batch of frames equals the single frames:
    |dE| <= 1e-10 kJ/mol per atom, ||dF||/||F|| <= 1e-10 (float64)."""
    model = model_for(l_max, neighbor_list=neighbor_list)
    rng = np.random.default_rng(3)
    shifted = periodic + rng.integers(-2, 3, size=(N_ATOMS, 3)) @ BOX
    e0, f0 = ef(model, periodic, BOX)
    e1, f1 = ef(model, shifted, BOX)
    assert abs(e1 - e0) / N_ATOMS <= TOL64
    assert rel(f1, f0) <= TOL64
    other = random_positions(N_ATOMS, rng, box=BOX)
    eb, fb = ef(model, np.stack([shifted, other]), BOX)
    e2, f2 = ef(model, other, BOX)
    assert abs(eb[0] - e0) / N_ATOMS <= TOL64 and abs(eb[1] - e2) / N_ATOMS <= TOL64
    assert rel(fb[0], f0) <= TOL64 and rel(fb[1], f2) <= TOL64


@pytest.mark.parametrize("l_max", L_MAX)
def test_forces_are_central_differences(periodic, l_max):
    """Autograd forces equal -(E(x + h) - E(x - h)) / 2h, h = 1e-5 nm, on all 90 coordinates of the periodic
    system: ||dF||/||F|| <= 1e-6 (float64; truncation ~h^2, rounding ~1e-16 E / h)."""
    model = model_for(l_max)
    _, f = ef(model, periodic, BOX)
    h = 1e-5
    steps = np.eye(N_ATOMS * 3).reshape(N_ATOMS * 3, N_ATOMS, 3) * h
    with torch.no_grad():
        x = torch.as_tensor(np.concatenate([periodic + steps, periodic - steps]))
        b = torch.as_tensor(np.broadcast_to(BOX, (x.shape[0], 3, 3)).copy())
        e = model.batch_energy(x, b).numpy()
    fd = -(e[:N_ATOMS * 3] - e[N_ATOMS * 3:]) / (2 * h)
    assert rel(fd.reshape(N_ATOMS, 3), f) <= 1e-6


# ---------------------------------------------------------------------------------------------- implementations
@pytest.mark.parametrize("l_max, dtype", [(0, torch.float64), (1, torch.float64), (2, torch.float64),
                                          (1, torch.float32)], ids=["0-f64", "1-f64", "2-f64", "1-f32"])
@pytest.mark.parametrize("neighbor_list", ["dense", "vesin"])
def test_scripted_equals_eager(periodic, cluster, l_max, neighbor_list, dtype):
    """torch.jit.script(model) gives the eager energy and forces, periodic and not: |dE| per atom and
    ||dF||/||F|| <= 1e-10 (float64), <= 1e-4 / 1e-5 (float32)."""
    model = model_for(l_max, dtype, neighbor_list)
    scripted = torch.jit.script(model)
    tol_e, tol_f = (TOL64, TOL64) if dtype == torch.float64 else (TOL_E32, TOL_F32)
    for pos, box in ((periodic, BOX), (cluster, None)):
        x = torch.as_tensor(pos, dtype=dtype).requires_grad_(True)
        b = None if box is None else torch.as_tensor(box, dtype=dtype)
        e_s = scripted(x, b)
        (g_s,) = torch.autograd.grad(e_s, x)
        e, f = energy_and_forces(model, pos, box)
        assert abs(float(e_s.detach()) - e) / N_ATOMS <= tol_e
        assert rel(-g_s.double().numpy(), f) <= tol_f


@pytest.mark.parametrize("l_max", L_MAX)
def test_dense_and_vesin_neighbour_lists_agree(periodic, cluster, l_max):
    """The all-pairs list and vesin's cell list give the same energy and forces, periodic and not:
    |dE| <= 1e-10 kJ/mol per atom, ||dF||/||F|| <= 1e-10 (float64)."""
    dense = model_for(l_max, neighbor_list="dense")
    vesin = model_for(l_max, neighbor_list="vesin")
    vesin.load_state_dict(dense.state_dict())
    for pos, box in ((periodic, BOX), (cluster, None)):
        e0, f0 = ef(dense, pos, box)
        e1, f1 = ef(vesin, pos, box)
        assert abs(e1 - e0) / N_ATOMS <= TOL64
        assert rel(f1, f0) <= TOL64


def test_virial_is_the_strain_derivative(periodic, cluster):
    """Virial W = -dE/d eps (kJ/mol). Isolated cluster: W = sum_i x_i (x) F_i, ||dW||/||W|| <= 1e-10.
    Periodic: each component equals the central difference of E under the strain x -> x(1 + eps),
    box -> box(1 + eps), h = 1e-6: ||dW||/||W|| <= 1e-6 (float64)."""
    model = model_for(1)
    w = model.virial(torch.as_tensor(cluster), None).detach().numpy()
    _, f = ef(model, cluster)
    assert rel(w, cluster.T @ f) <= TOL64

    w = model.virial(torch.as_tensor(periodic), torch.as_tensor(BOX)).detach().numpy()
    h = 1e-6
    fd = np.zeros((3, 3))
    with torch.no_grad():
        for a in range(3):
            for c in range(3):
                e = []
                for sign in (1, -1):
                    strain = np.eye(3)
                    strain[a, c] += sign * h
                    e.append(float(model(torch.as_tensor(periodic @ strain), torch.as_tensor(BOX @ strain))))
                fd[a, c] = -(e[0] - e[1]) / (2 * h)
    assert rel(w, fd) <= 1e-6


def test_smooth_cutoff():
    """Two atoms: beyond the cutoff (0.5 nm) force 0 and energy that of separated atoms (|dE| <= 1e-12 kJ/mol);
    just inside (r = rc - 1e-3 nm) the force is O((rc - r)^2) small: |F| <= 1e-3 kJ/mol/nm, while at
    r = 0.3 nm it is > 1e-2 kJ/mol/nm."""
    model = EquivariantModel(make_topology(2), l_max=1, n_layers=2, mul=8, seed=4).double()
    e_far, f_far = ef(model, [[0.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    e_out, f_out = ef(model, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.5 + 1e-9]])
    e_in, f_in = ef(model, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.5 - 1e-3]])
    _, f_mid = ef(model, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.3]])
    assert abs(e_out - e_far) <= 1e-12 and np.all(f_out == 0.0)
    assert np.abs(f_in).max() <= 1e-3
    assert np.abs(f_mid).max() > 1e-2


# ---------------------------------------------------------------------------------------------- config and files
def test_registry_and_save_load_round_trip(tmp_path, periodic):
    """create_model("equivariant") builds the model; save_model/load_model restore weights and shifts:
    energy and forces identical to 1e-12 (relative), dtype kept."""
    model = create_model("equivariant", make_topology(N_ATOMS), l_max=2, n_layers=1, mul=4, seed=3).double()
    with torch.no_grad():
        model.species_energy.copy_(torch.tensor(SHIFTS))
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, EquivariantModel) and dtype_of(loaded) == torch.float64
    assert loaded.config == model.config
    e0, f0 = ef(model, periodic, BOX)
    e1, f1 = ef(loaded, periodic, BOX)
    assert abs(e1 - e0) <= 1e-12 * abs(e0) and rel(f1, f0) <= 1e-12


@pytest.mark.parametrize("field, value", [("l_max", 4), ("n_layers", 0), ("mul", 0), ("cutoff", -1.0),
                                          ("neighbor_list", "cells")])
def test_bad_config_is_a_user_error(field, value):
    with pytest.raises(EnpcgError, match=field):
        EquivariantModel(make_topology(4), **{field: value})


def test_neighbour_list_default_and_dense_box_check():
    """Default list: dense up to 2000 atoms, vesin above. A dense model in a box narrower than twice the
    cutoff raises EnpcgError (its minimum image would miss neighbours); vesin handles that box."""
    assert EquivariantModel(make_topology(10)).config["neighbor_list"] == "dense"
    assert EquivariantModel(make_topology(2001), n_layers=1, mul=2).config["neighbor_list"] == "vesin"
    small = np.eye(3) * 0.8
    pos = random_positions(6, np.random.default_rng(0), box=small, min_dist=0.2)
    with pytest.raises(EnpcgError, match="half the smallest box width"):
        ef(model_for(0, n=6), pos, small)
    e, f = ef(model_for(0, neighbor_list="vesin", n=6), pos, small)
    assert np.isfinite(e) and np.all(np.isfinite(f))


# ---------------------------------------------------------------------------------------------- OpenMM
def openmm_forces(forces, positions, box, platform):
    """Energy (kJ/mol) and forces ((n, 3) kJ/mol/nm) of OpenMM forces on a System of the test atoms."""
    system = mm.System()
    for _ in range(len(positions)):
        system.addParticle(14.0)
    system.setDefaultPeriodicBoxVectors(*[mm.Vec3(*row) for row in box])
    for f in forces:
        system.addForce(f)
    ctx = mm.Context(system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName(platform))
    ctx.setPositions(positions)
    st = ctx.getState(getEnergy=True, getForces=True)
    return (st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("platform", ["Reference", "CPU"])
@pytest.mark.parametrize("backend", ["torch", "python"])
def test_export_matches_python_model(periodic, backend, platform, dtype, tol):
    """export_forces(model, backend) in an OpenMM Context gives the Python model's forces and energy:
    ||dF||/||F|| and |dE|/|E| <= 1e-6 (float64 model), 1e-4 (float32 model)."""
    model = model_for(1, dtype)
    e_ref, f_ref = energy_and_forces(model, periodic, BOX)
    e, f = openmm_forces(export_forces(model, backend), periodic, BOX, platform)
    assert rel(f, f_ref) <= tol
    assert abs(e - e_ref) <= tol * abs(e_ref)


def test_nve_energy_conservation():
    """200 atoms (two species) in a 1.6 nm periodic box, tiny float64 model (l_max=1, 1 layer; rms force
    ~15 kJ/mol/nm) through the TorchForce, Verlet 1 fs on the Reference platform, 300 steps from 300 K: the
    slope of a linear fit of the total energy against time is at most 0.01 kT per atom per 10 ps (kT at
    300 K; measured ~0.002 kJ/mol/ps against the limit 0.5)."""
    n, side = 200, 1.6
    box = np.eye(3) * side
    top = make_topology(n)
    model = EquivariantModel(top, l_max=1, n_layers=1, mul=4, radial_hidden=8, energy_scale=40.0, seed=5).double()
    pos = random_positions(n, np.random.default_rng(5), box=box, min_dist=0.22)
    system = mm.System()
    for m in top.masses:
        system.addParticle(float(m))
    system.setDefaultPeriodicBoxVectors(*[mm.Vec3(*row) for row in box])
    for f in export_forces(model, "torch"):
        system.addForce(f)
    dt = 0.001  # ps
    ctx = mm.Context(system, mm.VerletIntegrator(dt), mm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(pos)
    ctx.setVelocitiesToTemperature(300.0, 5)
    f0 = ctx.getState(getForces=True).getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    assert np.sqrt(np.mean(f0 ** 2)) > 5.0  # forces large enough that a non-conservative bug would show
    times, energies = [], []
    t0 = time.perf_counter()
    integrator = ctx.getIntegrator()
    for k in range(31):
        st = ctx.getState(getEnergy=True)
        times.append(k * 10 * dt)
        energies.append((st.getPotentialEnergy() + st.getKineticEnergy()).value_in_unit(unit.kilojoule_per_mole))
        if k < 30:
            integrator.step(10)
    elapsed = time.perf_counter() - t0
    kt = (unit.MOLAR_GAS_CONSTANT_R * 300.0 * unit.kelvin).value_in_unit(unit.kilojoule_per_mole)
    slope = np.polyfit(times, energies, 1)[0]  # kJ/mol/ps
    limit = 0.01 * kt * n / 10.0  # kJ/mol/ps
    assert abs(slope) <= limit, (slope, limit, elapsed)
