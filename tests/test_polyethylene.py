"""TraPPE-UA polyethylene: force-field terms, atom order, save/load, and the bundled melt's physics."""
import json
import math

import numpy as np
import openmm as mm
import pytest
from openmm import app, unit

from enpcg.errors import EnpcgError
from systems.polyethylene import (ANGLE_THETA0, BOND_K, DEFAULT_PREFIX, KB, _box_array, _place, build_melt,
                                  create_system, default_melt, density_g_cm3, dihedral, load_melt, load_reference,
                                  pack_chains, reference_paths, save_melt)

REF = "Reference"
KJ = unit.kilojoule_per_mole


def energies_by_force(system, positions, box=None, platform=REF):
    """Potential energy (kJ/mol) of each force of ``system`` at ``positions`` (nm)."""
    system = mm.XmlSerializer.deserialize(mm.XmlSerializer.serialize(system))
    for i, f in enumerate(system.getForces()):
        f.setForceGroup(i)
    ctx = mm.Context(system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName(platform))
    if box is not None:
        ctx.setPeriodicBoxVectors(*[mm.Vec3(*b) for b in box])
    ctx.setPositions(positions)
    return {type(f).__name__: ctx.getState(getEnergy=True, groups={i}).getPotentialEnergy().value_in_unit(KJ)
            for i, f in enumerate(system.getForces())}


def four_sites(phi, r=0.154, theta=ANGLE_THETA0):
    """Four sites with bond lengths r (nm), both angles theta and dihedral phi (rad), shifted off the origin."""
    b, c = np.zeros(3), np.array([r, 0.0, 0.0])
    a = b + r * np.array([math.cos(theta), math.sin(theta), 0.0])
    d = _place(a, b, c, r, theta, phi)
    return np.array([a, b, c, d]) + 1.0


def test_torsion_is_trappe_with_trans_minimum():
    system, _ = create_system(1, 4, 3.0)
    c1, c2, c3 = 355.03, -68.19, 791.32
    phis = np.radians(np.arange(-180, 180, 15.0))
    e = []
    for phi in phis:
        pos = four_sites(phi)
        assert abs(dihedral(*pos) - phi) < 1e-9 or abs(abs(phi) - math.pi) < 1e-9
        e.append(energies_by_force(system, pos)["PeriodicTorsionForce"])
        expected = KB * (c1 * (1 + math.cos(phi)) + c2 * (1 - math.cos(2 * phi)) + c3 * (1 + math.cos(3 * phi)))
        assert abs(e[-1] - expected) < 1e-9  # kJ/mol, OPLS form with TraPPE constants
    e = np.array(e)
    assert np.argmin(e) == 0 and abs(e[0]) < 1e-9  # phi = -180 deg (trans): the global minimum, E = 0
    assert abs(e[list(np.degrees(phis)).index(0.0)] - 2 * KB * (c1 + c3)) < 1e-9  # cis = 2 (c1 + c3)


def test_bond_angle_and_lj_parameters():
    system, top = create_system(2, 3, 3.0)
    # bond: E = k/2 (r - r0)^2 at r = r0 + 0.01 nm; angle: E = k/2 (dtheta)^2, k = 62500 K * R
    pos = np.zeros((6, 3))
    pos[:3] = four_sites(math.pi, r=0.164, theta=ANGLE_THETA0 + 0.1)[:3]
    pos[3:] = pos[:3] + np.array([1.5, 1.5, 1.5])  # second chain out of LJ range (cutoff 1.0 nm)
    e = energies_by_force(system, pos, box=np.eye(3) * 3.0)
    assert abs(e["HarmonicBondForce"] - 4 * 0.5 * BOND_K * 0.01**2) < 1e-9  # 4 bonds
    assert abs(e["HarmonicAngleForce"] - 2 * 0.5 * 62500.0 * KB * 0.1**2) < 1e-9  # 2 angles
    assert 2.0e5 <= BOND_K <= 2.5e5
    # LJ between the chains (CH3-CH2-CH3 each) with Lorentz-Berthelot mixing; intra-chain pairs are excluded
    far = energies_by_force(system, pos, box=np.eye(3) * 3.0)["NonbondedForce"]  # dispersion correction only
    pos2 = pos.copy()
    pos2[3:] = pos[:3] + (pos[1] + np.array([0.0, 0.0, 0.45]) - pos[0])  # site 3 (CH3) 0.45 nm above site 1
    params = {0: (0.375, 98.0), 1: (0.395, 46.0), 2: (0.375, 98.0)}
    expected = 0.0
    for i in range(3):
        for j in range(3, 6):
            (s_i, e_i), (s_j, e_j) = params[i], params[j - 3]
            sig, eps = (s_i + s_j) / 2, KB * math.sqrt(e_i * e_j)
            d = np.linalg.norm(pos2[j] - pos2[i])
            expected += 4 * eps * ((sig / d) ** 12 - (sig / d) ** 6) if d < 1.0 else 0.0
    e2 = energies_by_force(system, pos2, box=np.eye(3) * 3.0)["NonbondedForce"]
    assert np.linalg.norm(pos2[3] - pos2[1]) == pytest.approx(0.45)
    assert abs(expected) > 0.5 and abs((e2 - far) - expected) < 1e-9  # kJ/mol


def test_topology_order_exclusions_and_no_constraints():
    n_chains, n = 3, 10
    system, top = create_system(n_chains, n, 3.0)
    assert system.getNumConstraints() == 0 and system.getNumParticles() == n_chains * n
    chains = list(top.chains())
    assert len(chains) == n_chains
    for ic, ch in enumerate(chains):
        (res,) = list(ch.residues())
        assert res.name == "PE"
        atoms = list(res.atoms())
        assert [a.name for a in atoms] == [f"C{k + 1}" for k in range(n)]
        assert [a.index for a in atoms] == list(range(ic * n, (ic + 1) * n))  # chain-major
        assert all(a.element.symbol == "C" for a in atoms)
    masses = [system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(n)]
    assert masses[0] == masses[-1] == 15.035 and set(masses[1:-1]) == {14.027}
    nb = next(f for f in system.getForces() if isinstance(f, mm.NonbondedForce))
    assert nb.getUseDispersionCorrection() and nb.getCutoffDistance().value_in_unit(unit.nanometer) == 1.0
    pairs = set()
    for k in range(nb.getNumExceptions()):
        i, j, q, s, eps = nb.getExceptionParameters(k)
        assert eps.value_in_unit(KJ) == 0.0 and q.value_in_unit(unit.elementary_charge**2) == 0.0
        pairs.add((min(i, j), max(i, j)))
    expected = {(i, i + d) for c in range(n_chains) for i in range(c * n, (c + 1) * n) for d in (1, 2, 3)
                if i + d < (c + 1) * n}
    assert pairs == expected  # exactly 1-2, 1-3 and 1-4 pairs are excluded


def test_packing_has_no_overlaps_and_right_geometry():
    L = 2.5
    pos = pack_chains(5, 20, L, seed=3)
    bonds = np.linalg.norm(np.diff(pos.reshape(5, 20, 3), axis=1), axis=-1)
    np.testing.assert_allclose(bonds, 0.154, rtol=1e-12)
    d = pos[:, None] - pos[None]
    d -= L * np.round(d / L)
    r = np.linalg.norm(d, axis=-1)
    same = np.arange(100)[:, None] // 20 == np.arange(100)[None] // 20
    close = np.abs(np.arange(100)[:, None] - np.arange(100)[None]) <= 3
    assert r[~(same & close)].min() > 0.25  # nm, no overlaps beyond the bonded neighbourhood


def test_tiny_melt_short_run_is_stable(tmp_path):
    melt = build_melt(4, 12, density=0.76, cutoff=0.55, nvt_steps=1000, platform=REF)
    assert melt.density() == pytest.approx(0.76, rel=1e-9)
    # friction 10/ps: the kinetic energy decorrelates in ~0.05 ps, so the 20 samples 0.1 ps apart are nearly
    # independent; per-sample sd 450 sqrt(2/141) = 54 K, standard error ~12 K, and the 60 K limit is ~5 of them.
    integrator = mm.LangevinMiddleIntegrator(450, 10, 0.002)
    integrator.setRandomNumberSeed(7)
    sim = app.Simulation(melt.topology, melt.system, integrator, mm.Platform.getPlatformByName(REF))
    sim.context.setPositions(melt.positions)
    sim.context.setVelocitiesToTemperature(450, 1)
    bond_lengths, kin = [], []
    for _ in range(20):
        sim.step(50)
        st = sim.context.getState(getPositions=True, getEnergy=True)
        p = st.getPositions(asNumpy=True).value_in_unit(unit.nanometer).reshape(4, 12, 3)
        bond_lengths.append(np.linalg.norm(np.diff(p, axis=1), axis=-1))
        assert math.isfinite(st.getPotentialEnergy().value_in_unit(KJ))
        kin.append(st.getKineticEnergy().value_in_unit(KJ))
    b = np.array(bond_lengths)
    assert abs(b.mean() - 0.154) < 0.002 and b.min() > 0.13 and b.max() < 0.18  # nm, flexible bonds stay sane
    t = 2 * np.mean(kin) / ((3 * 48 - 3) * KB)
    assert abs(t - 450) < 60  # K, 48 sites: large fluctuations, but the thermostat holds

    # save / load round trip: the loaded System gives the same forces at the same positions
    paths = save_melt(melt, tmp_path / "tiny")
    assert all(p.exists() for p in paths)
    back = load_melt(tmp_path / "tiny")
    assert np.abs(back.positions - melt.positions).max() < 6e-5  # PDB holds 1e-4 nm
    assert np.array_equal(back.masses, melt.masses) and np.allclose(back.box, melt.box, atol=0)
    f = []
    for s in (melt.system, back.system):
        ctx = mm.Context(s, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName(REF))
        ctx.setPeriodicBoxVectors(*[mm.Vec3(*r) for r in melt.box])
        ctx.setPositions(back.positions)
        f.append(ctx.getState(getForces=True).getForces(asNumpy=True)._value)
    assert np.linalg.norm(f[0] - f[1]) / np.linalg.norm(f[0]) < 1e-12
    assert json.loads(paths[2].read_text())["n_chains"] == 4


def test_npt_path_removes_barostat():
    """density=None: NPT at 1 bar, then NVT at the mean NPT volume with the barostat removed."""
    melt = build_melt(8, 12, cutoff=0.6, npt_steps=1000, nvt_steps=100, platform=REF)
    assert not any(isinstance(f, mm.MonteCarloBarostat) for f in melt.system.getForces())
    m = melt.metadata
    assert m["pressure_bar"] == 1.0 and m["npt_steps"] == 1000
    assert melt.density() == pytest.approx(m["npt_density_mean_g_cm3"], rel=1e-9)  # box = mean NPT volume
    box = _box_array(melt.system.getDefaultPeriodicBoxVectors())
    assert np.allclose(box, melt.box, rtol=0, atol=1e-12)
    assert 0.4 < melt.density() < 1.0 and math.isfinite(m["potential_energy_kJ_mol"])


def test_load_reference_errors(tmp_path):
    with pytest.raises(EnpcgError, match="reference files not found: .*nope.system.xml"):
        load_melt(tmp_path / "nope")
    small = build_melt(2, 12, density=0.3, cutoff=0.5, nvt_steps=10, platform=REF)
    big = build_melt(3, 12, density=0.3, cutoff=0.5, nvt_steps=10, platform=REF)
    xs, ps, _ = save_melt(small, tmp_path / "small")
    xb, pb, _ = save_melt(big, tmp_path / "big")
    with pytest.raises(EnpcgError) as e:
        load_reference(xb, ps)
    assert f"{xb} has 36 particles but {ps} has 24 atoms" in str(e.value)
    integ = tmp_path / "integrator.xml"
    integ.write_text(mm.XmlSerializer.serialize(mm.VerletIntegrator(0.001)))
    with pytest.raises(EnpcgError, match="holds a serialized VerletIntegrator, not a System"):
        load_reference(integ, ps)
    assert load_reference(xs, ps).n_particles == 24


def test_bundled_melt():
    """The bundled melt: 21 x 48 sites, density from 2 ns NPT at 450 K and 1 bar, and it runs stably."""
    melt = default_melt()
    assert melt.n_particles == 1008 and melt.topology.getNumChains() == 21
    assert sum(p.stat().st_size for p in reference_paths(DEFAULT_PREFIX)) < 2_000_000  # bytes
    # density of the bundled melt: 0.7456 g/cm^3 (NPT mean at 450 K, 1 bar; instantaneous std 0.013)
    assert melt.density() == pytest.approx(0.7456, abs=0.0005)
    assert 0.70 < melt.density() < 0.80  # near the experimental PE melt density at 450 K (0.76)
    assert melt.metadata["temperature_K"] == 450.0 and melt.metadata["pressure_bar"] == 1.0
    assert abs(melt.metadata["end_to_end_autocorrelation"]) < 0.2  # chain conformations decorrelated
    assert density_g_cm3(melt.masses, melt.box) == pytest.approx(melt.metadata["density_g_cm3"], rel=1e-3)
    assert np.allclose(melt.box, np.diag(np.diag(melt.box))) and melt.box[0, 0] > 2.0  # cutoff 1.0 fits
    p = melt.positions.reshape(21, 48, 3)
    b = np.linalg.norm(np.diff(p, axis=1), axis=-1)
    assert abs(b.mean() - 0.154) < 0.002 and b.max() < 0.18  # chains are whole in the PDB
    sim = app.Simulation(melt.topology, melt.system, mm.LangevinMiddleIntegrator(450, 1, 0.002),
                         mm.Platform.getPlatformByName("CPU"))
    sim.context.setPositions(melt.positions)
    sim.context.setVelocitiesToTemperature(450, 2)
    e0 = sim.context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(KJ)
    sim.step(300)
    st = sim.context.getState(getPositions=True, getEnergy=True)
    e1 = st.getPotentialEnergy().value_in_unit(KJ)
    assert math.isfinite(e1) and abs(e1 - e0) < 0.05 * 1008 * 3 * KB * 450  # equilibrated: no big drift
    b = np.linalg.norm(np.diff(st.getPositions(asNumpy=True)._value.reshape(21, 48, 3), axis=1), axis=-1)
    assert abs(b.mean() - 0.154) < 0.002 and b.max() < 0.18
