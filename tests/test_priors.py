"""Prior model (harmonic bonds/angles, periodic dihedrals, r^-12 repulsion) and Boltzmann inversion.

Tolerances: torch vs native OpenMM forces ||dF||/||F|| <= 1e-6 (float64, Reference) and <= 1e-4 (CPU
platform, single precision); finite differences 1e-6 relative (float64, step 1e-6 nm); invariances 1e-10
relative (float64). Boltzmann inversion of exactly sampled ideal chains: k within 3 % and r0 within
0.05 sqrt(kT/k) (100k bond samples: the statistical error of k is about 0.5 %).
"""
import io

import numpy as np
import pytest
import torch

from enpcg.errors import EnpcgError
from enpcg.models import create_model, energy_and_forces, load_model, save_model

from known_answer import TRICLINIC_BOX, make_known_answer_data, random_chains



def prior_config(top, periodic=True):
    return dict(
        periodic=periodic, cutoff=0.9,
        bonds={"A-B": {"k": 3000.0, "r0": 0.41}},
        angles={"A-B-A": {"k": 40.0, "theta0": 2.0}, "B-A-B": {"k": 25.0, "theta0": 1.9}},
        dihedrals={"A-B-A-B": {"k": [1.0, 0.5, 0.2], "delta": [0.1, 3.0, 0.0]}},
        repulsion={"A-A": {"epsilon": 2.0, "sigma": 0.36}, "A-B": {"epsilon": 1.0, "sigma": 0.4},
                   "B-B": {"epsilon": 3.0, "sigma": 0.33}})


@pytest.fixture(scope="module")
def system():
    top, pos = random_chains(n_chains=8, seed=1)
    return top, pos


def openmm_forces(model, pos, box, platform):
    import openmm

    s = openmm.System()
    for _ in range(len(pos)):
        s.addParticle(50.0)
    if box is not None:
        s.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*b) for b in box])
    for f in model.native_forces():
        s.addForce(f)
    s = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(s))
    ctx = openmm.Context(s, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    ctx.setPositions(pos)
    st = ctx.getState(getEnergy=True, getForces=True)
    return st.getPotentialEnergy()._value, st.getForces(asNumpy=True)._value


@pytest.mark.parametrize("platform,tol", [("Reference", 1e-6), ("CPU", 1e-4)])
@pytest.mark.parametrize("periodic", [True, False])
def test_native_export_matches_torch(system, platform, tol, periodic):
    top, pos = system
    box = TRICLINIC_BOX if periodic else None
    model = create_model("priors", top, **prior_config(top, periodic)).double()
    e, f = energy_and_forces(model, pos, box)
    e_mm, f_mm = openmm_forces(model, pos, box, platform)
    assert np.linalg.norm(f_mm - f) / np.linalg.norm(f) <= tol
    assert abs(e_mm - e) <= tol * max(abs(e), 1.0)
    names = [type(x).__name__ for x in model.native_forces()]
    assert names == ["HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce", "CustomNonbondedForce"]
    assert all(x.usesPeriodicBoundaryConditions() == periodic for x in model.native_forces())


def test_repulsion_is_shifted_and_cut():
    from enpcg.topology import CGTopology

    top = CGTopology(["A1", "A2"], ["A", "A"], [50.0, 50.0], [0, 1])
    model = create_model("priors", top, periodic=False, cutoff=0.9,
                         repulsion={"A-A": {"epsilon": 2.0, "sigma": 0.36}}).double()
    for r in (0.3, 0.5, 0.8999, 0.9001, 1.5):
        e, f = energy_and_forces(model, np.array([[0.0, 0, 0], [r, 0, 0]]), None)
        expected = 2.0 * ((0.36 / r) ** 12 - (0.36 / 0.9) ** 12) if r < 0.9 else 0.0
        force = 12 * 2.0 * 0.36 ** 12 / r ** 13 if r < 0.9 else 0.0
        assert e == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert f[1, 0] == pytest.approx(force, rel=1e-12, abs=1e-15)


def test_finite_differences_and_dtypes(system):
    top, pos = system
    model = create_model("priors", top, **prior_config(top)).double()
    _, f = energy_and_forces(model, pos, TRICLINIC_BOX)
    rng = np.random.default_rng(0)
    h = 1e-6

    def energy(p):
        return energy_and_forces(model, p, TRICLINIC_BOX)[0]

    for _ in range(6):
        i, d = rng.integers(top.n_beads), rng.integers(3)
        p1, p2 = pos.copy(), pos.copy()
        p1[i, d] += h
        p2[i, d] -= h
        fd = -(energy(p1) - energy(p2)) / (2 * h)
        assert abs(fd - f[i, d]) <= 1e-6 * np.abs(f).max()
    e64 = energy_and_forces(model, pos, TRICLINIC_BOX)[0]
    e32, f32 = energy_and_forces(create_model("priors", top, **prior_config(top)).float(), pos, TRICLINIC_BOX)
    assert abs(e32 - e64) <= 1e-5 * abs(e64)
    assert np.linalg.norm(f32 - f) / np.linalg.norm(f) <= 1e-4


def test_invariances(system):
    top, pos = system
    rng = np.random.default_rng(3)
    model = create_model("priors", top, **prior_config(top, periodic=False)).double()
    e0, f0 = energy_and_forces(model, pos, None)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    e1, f1 = energy_and_forces(model, pos @ q.T + [1.0, -2.0, 0.5], None)
    assert abs(e1 - e0) <= 1e-10 * abs(e0)
    assert np.linalg.norm(f1 - f0 @ q.T) <= 1e-10 * np.linalg.norm(f0)
    periodic = create_model("priors", top, **prior_config(top)).double()
    e0, f0 = energy_and_forces(periodic, pos, TRICLINIC_BOX)
    shifted = pos + rng.integers(-2, 3, size=(top.n_beads, 3)) @ TRICLINIC_BOX
    e1, f1 = energy_and_forces(periodic, shifted, TRICLINIC_BOX)
    assert abs(e1 - e0) <= 1e-10 * abs(e0)
    assert np.linalg.norm(f1 - f0) <= 1e-10 * np.linalg.norm(f0)


def test_torchscript_and_files(system, tmp_path):
    top, pos = system
    model = create_model("priors", top, **prior_config(top)).double()
    scripted = torch.jit.script(model)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x, b = torch.tensor(pos), torch.tensor(TRICLINIC_BOX)
    assert abs(float(loaded(x, b)) - float(model(x, b))) <= 1e-12 * abs(float(model(x, b)))
    batch = loaded.batch_energy(torch.stack([x, x + 0.1]), torch.stack([b, b]))
    assert torch.allclose(batch, torch.stack([model(x, b), model(x + 0.1, b)]), rtol=1e-12)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.config == model.config
    assert abs(energy_and_forces(again, pos, TRICLINIC_BOX)[0] - energy_and_forces(model, pos, TRICLINIC_BOX)[0]) \
        <= 1e-12 * abs(energy_and_forces(model, pos, TRICLINIC_BOX)[0])


def test_missing_parameters_are_named(system):
    top, _ = system
    cfg = prior_config(top)
    cfg["angles"] = {"A-B-A": cfg["angles"]["A-B-A"]}
    with pytest.raises(EnpcgError, match="B-A-B"):
        create_model("priors", top, **cfg)
    cfg = prior_config(top)
    cfg["repulsion"] = {"A-A": cfg["repulsion"]["A-A"]}
    with pytest.raises(EnpcgError, match="A-B"):
        create_model("priors", top, **cfg)


def test_boltzmann_inversion_recovers_known_parameters():
    from enpcg.fitting import fit_priors

    data = make_known_answer_data("ideal_chains", n_frames=500, noise=0.0, seed=0, platform="Reference")
    p, kT = data.params, data.kT
    model = fit_priors(data.positions, data.box, data.topology, data.temperature)
    bond = model.config["bonds"]["C-C"]
    assert abs(bond["k"] / p["bond_k"] - 1) < 0.03
    assert abs(bond["r0"] - p["bond_r0"]) < 0.05 * np.sqrt(kT / p["bond_k"])
    angle = model.config["angles"]["C-C-C"]
    assert abs(angle["k"] / p["angle_k"] - 1) < 0.05
    assert abs(angle["theta0"] - p["theta0"]) < 0.05 * np.sqrt(kT / p["angle_k"])
    # Dihedral PMF: compare the fitted Fourier series with the true one (up to a constant) over the circle.
    phi = np.linspace(-np.pi, np.pi, 361)
    dih = model.config["dihedrals"]["C-C-C-C"]

    def series(k, d):
        return sum(k[n] * (1 + np.cos((n + 1) * phi - d[n])) for n in range(3))

    diff = series(dih["k"], dih["delta"]) - series(p["torsion_k"], p["torsion_delta"])
    assert np.ptp(diff) < 0.3 * kT
    assert model.config["repulsion"]["C-C"]["epsilon"] == pytest.approx(kT)
    assert model.config["periodic"] is False
