"""Reference systems for oriented beads: Lewis-Wahnstrom OTP (rigid) and TraPPE-UA 3-methylpentane (flexible).

Real OpenMM contexts; energies against independent numpy sums. Units: nm, ps, kJ/mol, amu, K.
"""
import math

import numpy as np
import openmm as mm
import pytest
from openmm import unit

from enpcg.errors import EnpcgError
from enpcg.mapping import load_mapping
from systems import methylpentane as mp
from systems import otp
from systems.polyethylene import BOND_K, KB, dihedral

KJ = unit.kilojoule_per_mole


def reference_energy(system, positions, box):
    """Total potential energy (kJ/mol) on the Reference platform (double precision)."""
    ctx = mm.Context(system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("Reference"))
    ctx.setPeriodicBoxVectors(*[mm.Vec3(*b) for b in box])
    ctx.setPositions(positions)
    return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(KJ)


def lj(r, sigma, eps):
    return 4.0 * eps * ((sigma / r) ** 12 - (sigma / r) ** 6)


@pytest.fixture(scope="module")
def otp_liquid():
    return otp.build_liquid(64, seed=1, equilibration_ps=2.0)


@pytest.fixture(scope="module")
def mp_liquid():
    # 48 molecules, not 27: 27 at 0.75 g/cm^3 give a 1.73 nm box, less than twice the 1.0 nm cutoff
    return mp.build_liquid(48, seed=2, equilibration_ps=2.0)


# --------------------------------------------------------------------------------------------- OTP
def test_otp_site_coordinates_body_frame():
    x = otp.site_coordinates()
    assert x.shape == (3, 3)
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-15)  # equal masses: centre of mass at the origin
    ex = (x[2] - x[0]) / np.linalg.norm(x[2] - x[0])
    np.testing.assert_allclose(ex, [1.0, 0.0, 0.0], atol=1e-15)   # e_x from site 0 to site 2
    assert x[1, 1] > 0 and abs(x[1, 0]) < 1e-15                   # apex on +e_y, above the base midpoint
    np.testing.assert_allclose(x[:, 2], 0.0, atol=1e-15)          # planar, in the xy plane
    d01, d12, d02 = (np.linalg.norm(x[i] - x[j]) for i, j in ((0, 1), (1, 2), (0, 2)))
    assert abs(d01 - 0.483) < 1e-12 and abs(d12 - 0.483) < 1e-12
    assert abs(d02 - 2 * 0.483 * math.sin(math.radians(37.5))) < 1e-12  # nm
    cos_apex = np.dot(x[0] - x[1], x[2] - x[1]) / (d01 * d12)
    assert abs(math.degrees(math.acos(cos_apex)) - 75.0) < 1e-10  # deg


def test_otp_system_settings_and_errors():
    system, top = otp.create_system(2, 6.0)
    assert system.getNumParticles() == 6 and system.getNumConstraints() == 6
    assert [r.name for r in top.residues()] == ["OTP", "OTP"] and top.getNumChains() == 2
    nb = next(f for f in system.getForces() if isinstance(f, mm.NonbondedForce))
    assert nb.getNonbondedMethod() == mm.NonbondedForce.CutoffPeriodic
    assert nb.getCutoffDistance().value_in_unit(unit.nanometer) == otp.CUTOFF == 1.2
    assert nb.getUseSwitchingFunction() and nb.getSwitchingDistance().value_in_unit(unit.nanometer) == 1.1
    assert not nb.getUseDispersionCorrection()
    assert nb.getNumExceptions() == 6  # the three intramolecular pairs of each molecule
    for i in range(6):
        assert system.getParticleMass(i).value_in_unit(unit.dalton) == 76.768
    with pytest.raises(EnpcgError, match="twice the 1.2 nm cutoff"):
        otp.create_system(2, 2.0)
    with pytest.raises(EnpcgError, match="at least 40 molecules"):
        otp.build_liquid(27, equilibration_ps=0.0)
    with pytest.raises(EnpcgError, match="n_molecules"):
        otp.create_system(0, 6.0)


def test_otp_pair_energy_matches_switched_lj():
    system, _ = otp.create_system(2, 6.0)
    body = otp.site_coordinates()
    c, s = math.cos(0.7), math.sin(0.7)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.array([[1, 0, 0], [0, 0.6, -0.8], [0, 0.8, 0.6]])
    pos = np.concatenate([body + 3.0, body @ rot.T + 3.0 + np.array([1.05, 0.35, 0.2])])
    r = np.linalg.norm(pos[:3, None] - pos[None, 3:], axis=-1).ravel()
    x = np.clip((r - 1.1) / 0.1, 0.0, 1.0)
    switch = 1 - 6 * x**5 + 15 * x**4 - 10 * x**3
    expected = float(np.sum(np.where(r < 1.2, lj(r, 0.483, 5.276) * switch, 0.0)))
    assert np.sum((r > 1.1) & (r < 1.2)) >= 1  # at least one pair in the switching region
    assert np.sum(r < 1.1) >= 1 and abs(expected) > 1.0  # kJ/mol: a real interaction, not just the tail
    e = reference_energy(system, pos, 6.0 * np.eye(3))
    assert abs(e - expected) <= 1e-6 * abs(expected)


def test_otp_liquid_is_rigid_whole_and_maps_to_proper_frames(otp_liquid):
    liq = otp_liquid
    n = 64
    x = liq.positions.reshape(n, 3, 3)
    sides = {(0, 1): 0.483, (1, 2): 0.483, (0, 2): 2 * 0.483 * math.sin(math.radians(37.5))}
    for (i, j), length in sides.items():
        assert np.max(np.abs(np.linalg.norm(x[:, i] - x[:, j], axis=-1) - length)) < 1e-5  # nm
    L = (64 * 230.304 * 1.66053906660e-3 / 1.09) ** (1 / 3)  # nm, 64 x 230.304 amu at 1.09 g/cm^3: 2.8212
    np.testing.assert_allclose(liq.box, np.eye(3) * liq.box[0, 0], atol=0)
    assert abs(liq.box[0, 0] - L) < 1e-12 and abs(liq.density() - 1.09) < 1e-9  # g/cm^3
    com = x.mean(axis=1)
    assert np.all(com >= 0) and np.all(com < liq.box[0, 0])  # molecules whole, centres in the box
    assert np.all(np.isfinite(liq.positions))
    assert liq.metadata["timestep_ps"] == 0.005 and liq.metadata["n_molecules"] == n
    np.testing.assert_array_equal(liq.masses, 76.768)

    mapping = load_mapping(otp.MAPPING, n_atoms=3 * n, masses=liq.masses)
    assert mapping.n_beads == n
    assert mapping.topology.orientations == ["frame"] * n
    axes = mapping.map_axes(liq.positions, liq.box)
    assert axes.shape == (n, 3, 3)
    assert np.max(np.abs(np.linalg.det(axes) - 1.0)) < 1e-10
    assert np.max(np.abs(np.einsum("bji,bjk->bik", axes, axes) - np.eye(3))) < 1e-10
    # the bead frame is the body frame of site_coordinates(): every site is R x_body + centre of mass
    rebuilt = mapping.map_positions(liq.positions, liq.box)[:, None] + np.einsum("bij,kj->bki", axes,
                                                                                    otp.site_coordinates())
    assert np.max(np.abs(rebuilt - x)) < 1e-5  # nm


# --------------------------------------------------------------------------------------------- 3-methylpentane
def numpy_methylpentane_energy(x, box_volume):
    """Bonds + angles + torsions (c0 dropped) + C1-C5 LJ + dispersion correction (kJ/mol) of one molecule."""
    e = sum(0.5 * BOND_K * (np.linalg.norm(x[i] - x[j]) - 0.154) ** 2 for i, j in mp.BONDS)
    theta0 = {(0, 1, 2): 114, (2, 3, 4): 114, (1, 2, 3): 112, (1, 2, 5): 112, (3, 2, 5): 112}
    for (i, j, k), t0 in theta0.items():
        u, v = x[i] - x[j], x[k] - x[j]
        theta = math.acos(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
        e += 0.5 * 62500.0 * KB * (theta - math.radians(t0)) ** 2
    c1, c2, c3 = (ck * KB for ck in (428.73, -111.85, 441.27))
    for i, j, k, l in ((0, 1, 2, 3), (0, 1, 2, 5), (4, 3, 2, 1), (4, 3, 2, 5)):
        phi = dihedral(x[i], x[j], x[k], x[l])
        e += c1 * (1 + math.cos(phi)) + c2 * (1 - math.cos(2 * phi)) + c3 * (1 + math.cos(3 * phi))
    e += lj(np.linalg.norm(x[0] - x[4]), 0.375, 98.0 * KB)  # C1-C5, both CH3
    # OpenMM's dispersion correction: 8 pi N^2 / V (<eps sig^12> / (9 rc^9) - <eps sig^6> / (3 rc^3)), the
    # averages over all unordered pairs of particles including self pairs, Lorentz-Berthelot mixed
    sig = np.array([0.375, 0.395, 0.468, 0.395, 0.375, 0.375])
    eps = KB * np.array([98.0, 46.0, 10.0, 46.0, 98.0, 98.0])
    iu = np.triu_indices(6)
    s = (0.5 * (sig[:, None] + sig[None]))[iu]
    ep = np.sqrt(eps[:, None] * eps[None])[iu]
    rc = 1.0
    e += 8 * math.pi * 36 / box_volume * (np.mean(ep * s**12) / (9 * rc**9) - np.mean(ep * s**6) / (3 * rc**3))
    return e


def test_methylpentane_single_molecule_energy():
    system, top = mp.create_system(1, 5.0)
    assert system.getNumConstraints() == 0
    assert [a.name for a in top.atoms()] == ["C1", "C2", "C3", "C4", "C5", "C6"]
    masses = [system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(6)]
    assert masses == [15.035, 14.027, 13.019, 14.027, 15.035, 15.035]
    nb = next(f for f in system.getForces() if isinstance(f, mm.NonbondedForce))
    assert nb.getUseDispersionCorrection() and not nb.getUseSwitchingFunction()
    excluded = {tuple(sorted(nb.getExceptionParameters(k)[:2])) for k in range(nb.getNumExceptions())}
    assert excluded == {(i, j) for i in range(6) for j in range(i + 1, 6)} - {(0, 4)}  # only C1-C5 interacts
    rng = np.random.default_rng(5)
    # gauche-gauche backbone so C1-C5 is close (0.4 nm scale), then 0.01 nm noise to strain bonds and angles
    x = mp.molecule_coordinates(math.radians(65.0), math.radians(-70.0)) + 2.5 + 0.01 * rng.normal(size=(6, 3))
    assert np.linalg.norm(x[0] - x[4]) < 0.6
    expected = numpy_methylpentane_energy(x, 125.0)
    e = reference_energy(system, x, 5.0 * np.eye(3))
    assert abs(expected) > 1.0
    assert abs(e - expected) <= 1e-5 * abs(expected)  # kJ/mol, relative


def test_methylpentane_liquid_langevin_keeps_temperature(mp_liquid):
    liq = mp_liquid
    n = 48
    assert liq.system.getNumConstraints() == 0 and liq.positions.shape == (6 * n, 3)
    assert abs(liq.density() - 0.75) < 1e-9 and liq.metadata["timestep_ps"] == 0.002
    x = liq.positions.reshape(n, 6, 3)
    bonds = np.array([np.linalg.norm(x[:, i] - x[:, j], axis=-1) for i, j in mp.BONDS])
    assert np.all(np.abs(bonds - 0.154) < 0.03)  # molecules whole: no bond across the box
    com = np.average(x, axis=1, weights=liq.masses[:6])
    assert np.all(com >= 0) and np.all(com < liq.box[0, 0])
    integrator = mm.LangevinMiddleIntegrator(200.0, 1.0, 0.002)
    integrator.setRandomNumberSeed(11)
    ctx = mm.Context(liq.system, integrator, mm.Platform.getPlatformByName("CPU"))
    ctx.setPeriodicBoxVectors(*[mm.Vec3(*b) for b in liq.box])
    ctx.setPositions(liq.positions)
    ctx.setVelocitiesToTemperature(200.0, 12)
    dof = 3 * 6 * n - 3  # no constraints; the CMMotionRemover removes 3
    temps = []
    for _ in range(20):  # 2 ps
        integrator.step(50)
        st = ctx.getState(getEnergy=True, getPositions=True)
        assert np.all(np.isfinite(st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)))
        assert math.isfinite(st.getPotentialEnergy().value_in_unit(KJ))
        temps.append(2 * st.getKineticEnergy().value_in_unit(KJ) / (dof * KB))
    assert abs(np.mean(temps) / 200.0 - 1.0) < 0.15  # K, mean kinetic temperature within 15%


def test_methylpentane_mapping_and_errors(mp_liquid):
    liq = mp_liquid
    n = 48
    mapping = load_mapping(mp.MAPPING, n_atoms=6 * n, masses=liq.masses)
    assert mapping.n_beads == n and mapping.topology.orientations == ["frame"] * n
    axes = mapping.map_axes(liq.positions, liq.box)
    assert np.max(np.abs(np.linalg.det(axes) - 1.0)) < 1e-10
    # e_x runs from the C1/C2 centre to the C4/C5 centre
    x = liq.positions.reshape(n, 6, 3)
    d = x[:, 3:5].mean(axis=1) - x[:, 0:2].mean(axis=1)
    np.testing.assert_allclose(axes[:, :, 0], d / np.linalg.norm(d, axis=1, keepdims=True), atol=1e-12)
    with pytest.raises(EnpcgError, match="twice the 1.0 nm cutoff"):
        mp.create_system(27, 1.73)
    with pytest.raises(EnpcgError, match="at least 42 molecules"):
        mp.build_liquid(27, equilibration_ps=0.0)
    with pytest.raises(EnpcgError, match="density"):
        mp.build_liquid(64, density=-1.0)
