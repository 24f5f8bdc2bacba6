"""Tests of systems.bead_spring: the Kremer-Grest melt and the bead-spring polymer glass former.

Reduced LJ units map to OpenMM with sigma = 1 nm, epsilon = 1 kJ/mol, m = 1 amu (tau = 1 ps), so lengths in
nm and energies in kJ/mol are the reduced numbers. Dynamics: LangevinMiddleIntegrator, 0.005 tau step,
friction 0.5 / tau, CPU platform with 1 thread; known-answer potential and force checks on the Reference
platform (double precision).
"""
import dataclasses

import numpy as np
import openmm as mm
import pytest
from openmm import unit

from enpcg.errors import EnpcgError
from systems import bead_spring as bs

# LAMMPS Chain benchmark (lammps/lammps, bench/in.chain + bench/data.chain; logs bench/log.1Oct06.chain.lmp.fixed.
# linux.1, bench/log.15Jul25.chain.fixed.g++.1, bench/POTENTIALS/log.9Oct20.fene.1): 32000 atoms, 31680 bonds
# (320 chains of 100), box 33.592^3 (number density 0.8442), bond_style fene 30.0 1.5 1.0 1.0 (FENE + WCA cut at
# 2^(1/6), src/MOLECULE/bond_fene.cpp), special_bonds 0 1 1, pair lj/cut 1.12 shifted, Langevin T = 1, damp 10,
# dt 0.012. Thermo line at step 0: E_mol = 20.494523 per atom (thermo_modify norm is on for lj units; check:
# TotEng 22.394765 = 1.5 T (N-1)/N + E_pair + E_mol). Per bond: 20.494523 x 32000 / 31680 = 20.70154.
LAMMPS_E_MOL_PER_ATOM = 20.494523
LAMMPS_ENERGY_PER_BOND = LAMMPS_E_MOL_PER_ATOM * 32000 / 31680


def _context(system, positions, platform="Reference"):
    props = {"Threads": "1"} if platform == "CPU" else {}
    ctx = mm.Context(system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName(platform), props)
    ctx.setPositions(np.asarray(positions, dtype=np.float64))
    return ctx


def _energy(ctx, groups=-1):
    return ctx.getState(getEnergy=True, groups=groups).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def _forces(ctx):
    return ctx.getState(getForces=True).getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)


def _pair_energies(model, distances, box=8.0):
    """Energy (kJ/mol) and force on bead 1 along x (kJ/mol/nm) of two free beads at ``distances`` nm."""
    system, _, _ = bs.create_system(2, 1, box, model=model)
    ctx = _context(system, np.zeros((2, 3)))
    out = []
    for r in distances:
        ctx.setPositions(np.array([[1.0, 1.0, 1.0], [1.0 + r, 1.0, 1.0]]))
        out.append((_energy(ctx), _forces(ctx)[1, 0]))
    return np.array(out)


@pytest.fixture(scope="module")
def kg_melt():
    """Kremer-Grest melt, 20 chains of 25 beads (500 beads) at number density 0.85, after the soft push-off."""
    return bs.create_kremer_grest(20, 25, density=0.85, seed=1)


def test_reduced_unit_mapping():
    """sigma = 1 nm, epsilon = 1 kJ/mol, m = 1 amu give tau = 1 ps exactly (to 1e-12), T* = 1 is
    1 / 0.0083144626 K = 120.27236 K (R from openmm.unit, to 1e-8 relative) and P* = 1 is 16.60539 bar (to 1e-6
    relative); the conversions round-trip to 1e-12."""
    tau = (1 * unit.nanometer * unit.sqrt(1 * unit.amu / (1 * unit.kilojoule_per_mole))).value_in_unit(unit.picosecond)
    assert tau == pytest.approx(1.0, abs=1e-12)
    assert bs.temperature_kelvin(1.0) == pytest.approx(1.0 / 0.0083144626, rel=1e-8)
    assert bs.temperature_kelvin(1.0) == pytest.approx(120.27236, rel=1e-6)
    assert bs.pressure_bar(1.0) == pytest.approx(16.60539, rel=1e-6)
    assert bs.temperature_reduced(bs.temperature_kelvin(0.45)) == pytest.approx(0.45, rel=1e-12)
    assert bs.pressure_reduced(bs.pressure_bar(2.5)) == pytest.approx(2.5, rel=1e-12)


def test_wca_known_values_and_zero_beyond_cutoff():
    """Kremer-Grest pair force in OpenMM (Reference, double): 4(r^-12 - r^-6) + 1 below 2^(1/6) nm to 1e-12
    relative (E(1) = 1 exactly as 4(1 - 1) + 1), energy and force exactly 0 at and beyond 2^(1/6) = 1.122462 nm,
    and the +epsilon shift makes the energy vanish continuously at the cutoff (|E(rc - 1e-7)| < 1e-12)."""
    rc = 2.0 ** (1.0 / 6.0)
    inside = np.array([0.85, 0.9, 1.0, 1.05, 1.1, 1.12])
    e_in = _pair_energies("kremer-grest", inside)
    np.testing.assert_allclose(e_in[:, 0], 4 * (inside ** -12 - inside ** -6) + 1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(e_in[:, 1], 4 * (12 * inside ** -13 - 6 * inside ** -7), rtol=1e-10)
    assert e_in[2, 0] == pytest.approx(1.0, abs=1e-12)
    beyond = _pair_energies("kremer-grest", [rc + 1e-9, 1.2, 1.5, 2.0, 3.9])
    assert np.all(beyond == 0.0), f"WCA energy/force beyond 2^(1/6) nm must be exactly zero: {beyond}"
    assert abs(_pair_energies("kremer-grest", [rc - 1e-7])[0, 0]) < 1e-12


def test_lj_shift_makes_energy_continuous_at_cutoff():
    """Glass-former pair force: LJ cut at 2.5 nm and shifted by -U_LJ(2.5) = +0.016316891 kJ/mol, so
    E(2^(1/6)) = -0.983683109 (to 1e-10) and the energy is continuous at the cutoff: |E(2.5 - 1e-6) - E(2.5 +
    1e-6)| < 1e-7 kJ/mol (the unshifted LJ would jump by 0.0163); beyond 2.5 nm energy and force are 0."""
    rc = bs.LJ_CUTOFF
    e = _pair_energies("polymer-glass", [2.0 ** (1.0 / 6.0), 1.5, rc - 1e-6, rc + 1e-6, 3.0])
    assert e[0, 0] == pytest.approx(-0.983683108864, abs=1e-10)
    assert e[1, 0] == pytest.approx(4 * (1.5 ** -12 - 1.5 ** -6) + 0.016316891136, abs=1e-10)
    assert abs(e[2, 0] - e[3, 0]) < 1e-7, f"energy jump at the cutoff {e[2, 0] - e[3, 0]}"
    assert np.all(e[3:] == 0.0)
    assert bs.LJ_SHIFT == pytest.approx(0.016316891136, rel=1e-10)


def test_bond_is_fene_plus_wca_and_bonded_pairs_have_no_pair_force():
    """One chain in OpenMM (Reference): a bond's energy is FENE + WCA, e.g. at 0.97 nm
    -0.5 30 1.5^2 ln(1 - (0.97/1.5)^2) + 4(0.97^-12 - 0.97^-6) + 1 = 18.2786739 + 1.9629161 = 20.2415900 kJ/mol
    (to 1e-10 relative), and equal to numpy's bond_energy at 0.6-1.45 nm (1e-12 relative). Bonded pairs get no
    pair force (glass former: pair energy of a dimer 0), while beads i, i+2 interact by the LJ (3 beads in a
    line 0.97 nm apart: pair energy = U_LJ(1.94), 1e-12)."""
    system, top, bonds = bs.create_system(1, 2, 6.0, model="polymer-glass")
    assert top.getNumChains() == 1 and len(list(top.bonds())) == 1 and bonds.tolist() == [[0, 1]]
    ctx = _context(system, np.zeros((2, 3)))
    for r in (0.6, 0.8, 0.97, 1.2, 1.45):
        ctx.setPositions(np.array([[1.0, 1.0, 1.0], [1.0, 1.0 + r, 1.0]]))
        assert _energy(ctx, {bs.BOND_GROUP}) == pytest.approx(float(bs.bond_energy(r)), rel=1e-12)
        assert _energy(ctx, {bs.PAIR_GROUP}) == 0.0
    ctx.setPositions(np.array([[1.0, 1.0, 1.0], [1.97, 1.0, 1.0]]))
    assert _energy(ctx) == pytest.approx(20.24159000795, rel=1e-10)
    system3, _, _ = bs.create_system(1, 3, 6.0, model="polymer-glass")
    ctx3 = _context(system3, np.array([[1.0, 1.0, 1.0], [1.97, 1.0, 1.0], [2.94, 1.0, 1.0]]))
    assert _energy(ctx3, {bs.PAIR_GROUP}) == pytest.approx(float(bs.lj_energy(1.94)), rel=1e-12)
    assert _energy(ctx3, {bs.BOND_GROUP}) == pytest.approx(2 * 20.24159000795, rel=1e-10)


@pytest.mark.parametrize("model, n_chains, chain_length",
                         [("kremer-grest", 4, 10), ("polymer-glass", 6, 20)])
def test_forces_match_finite_differences(model, n_chains, chain_length):
    """Forces of the full System (FENE + WCA bonds, pair force) on the Reference platform (double precision)
    against central differences of its energy (h = 1e-5 nm) at push-off positions perturbed by 0.02 nm
    (Gaussian), for the coordinates of 40 beads (all of the 4 x 10 Kremer-Grest chains; 40 random beads of the
    6 x 20 glass former, the smallest that holds twice its 2.5 nm cutoff at 0.85 sigma^-3):
    ||F_openmm - F_fd|| / ||F_openmm|| < 1e-5 over those coordinates (measured 3.0e-9 and 3.2e-9)."""
    create = bs.create_kremer_grest if model == "kremer-grest" else bs.create_polymer_glass
    m = create(n_chains, chain_length, seed=4, push_off_steps=1000, warmup_steps=200)
    pos = m.positions + np.random.default_rng(0).normal(scale=0.02, size=m.positions.shape)
    ctx = _context(m.system, pos)
    beads = np.sort(np.random.default_rng(1).choice(pos.shape[0], size=40, replace=False))
    f = _forces(ctx)[beads]
    h = 1e-5
    fd = np.empty_like(f)
    for row, i in enumerate(beads):
        for k in range(3):
            p = pos.copy()
            p[i, k] += h
            ctx.setPositions(p)
            e_plus = _energy(ctx)
            p[i, k] -= 2 * h
            ctx.setPositions(p)
            fd[row, k] = -(e_plus - _energy(ctx)) / (2 * h)
    rel = np.linalg.norm(f - fd) / np.linalg.norm(f)
    assert rel < 1e-5, f"{model}: ||dF||/||F|| = {rel:.2e}"


def test_push_off_gives_overlap_free_start(kg_melt):
    """The Kremer-Grest start (20 x 25 beads, 0.85 sigma^-3): one OpenMM chain per polymer; number density 0.85
    (1e-12); no non-bonded pair closer than 0.8 sigma (WCA energy there 44 epsilon; measured ~0.92) and no bond
    longer than 1.2 sigma (measured ~1.1); every bead mass 1 amu."""
    m = kg_melt
    assert m.topology.getNumChains() == 20
    assert [len(list(c.atoms())) for c in m.topology.chains()] == [25] * 20
    assert m.system.getNumParticles() == 500 and len(m.bonds) == 20 * 24
    assert m.number_density() == pytest.approx(0.85, rel=1e-12)
    assert bs.min_nonbonded_distance(m.positions, m.bonds, m.box) > 0.8
    assert bs.bond_lengths(m.positions, m.bonds, m.box).max() < 1.2
    assert np.all(m.masses == 1.0)
    assert all(m.system.getParticleMass(i).value_in_unit(unit.dalton) == 1.0 for i in range(500))


def test_kremer_grest_matches_lammps_chain_benchmark(kg_melt):
    """Kremer-Grest melt, 500 beads (20 x 25) at 0.85 sigma^-3 and T* = 1 (Langevin, dt 0.005 tau, friction
    0.5/tau; 10 tau equilibration, 40 tau sampled every 0.5 tau):

    * mean bond length 0.97 sigma within 0.01 (Kremer & Grest, J. Chem. Phys. 92, 5057 (1990); LAMMPS
      bond_fene.cpp equilibrium_distance 0.97 sigma). Measured 0.9647 (0.9646-0.9648 over 5 seeds).
    * FENE + WCA energy per bond within 0.5% of the LAMMPS Chain benchmark, E_mol 20.494523 per atom x 32000
      atoms / 31680 bonds = 20.7015 epsilon (lammps/lammps bench/log.1Oct06.chain.lmp.fixed.linux.1 and
      bench/log.15Jul25.chain.fixed.g++.1, step 0; step 100 gives 20.7067 and 20.7148). Measured 20.6967
      (-0.02%); 20.692-20.707 over 5 seeds.
      The benchmark is 100-bead chains at 0.8442 sigma^-3; the bond energy is local: measured (40 tau, 1000
      beads) 20.6953 (N = 25), 20.6981 (N = 50), 20.7010 (N = 100) at 0.85, all +-0.002.
    * OpenMM's bond-group energy equals the numpy FENE + WCA of the same frames (1e-9 relative), and the
      kinetic temperature is T* = 1 within 3% (standard error of the 80-sample mean ~0.7%; measured 0.987-1.009
      over 5 seeds).
    """
    r = bs.equilibrate(kg_melt, 8000, equilibration_steps=2000, sample_every=100, keep_positions=True, seed=2)
    s = r.samples
    assert len(s["time_ps"]) == 80
    stats = bs.bond_statistics(s["positions"], kg_melt.bonds, kg_melt.box)
    assert stats["bond_energy_per_bond"] == pytest.approx(s["bond_energy_per_bond"].mean(), rel=1e-9)
    assert stats["mean_bond_length"] == pytest.approx(s["mean_bond_length"].mean(), rel=1e-12)
    assert abs(stats["mean_bond_length"] - 0.97) < 0.01, stats
    rel = stats["bond_energy_per_bond"] / LAMMPS_ENERGY_PER_BOND - 1.0
    assert abs(rel) < 0.005, f"energy per bond {stats['bond_energy_per_bond']:.4f} vs LAMMPS " \
                             f"{LAMMPS_ENERGY_PER_BOND:.4f} ({100 * rel:+.3f}%)"
    assert abs(r.report["kinetic_temperature_reduced"] - 1.0) < 0.03, r.report
    assert r.report["max_bond_length_nm"] < bs.FENE_R0


def test_fene_beyond_r0_raises():
    """A bond stretched past R0 = 1.5 sigma in the start positions, or a run that tears a bond (T* = 50 with
    dt = 0.01 tau), raises EnpcgError naming the bond/R0 and the fix, instead of a NaN trajectory."""
    small = bs.create_kremer_grest(4, 10, seed=0, push_off_steps=500, warmup_steps=100)
    pos = small.positions.copy()
    d = pos[9] - pos[8]
    pos[9] = pos[8] + 1.55 * d / np.linalg.norm(d)
    with pytest.raises(EnpcgError, match=r"bond 8-9 is 1\.5500 nm.*R0 = 1\.5 nm.*Fix"):
        bs.equilibrate(dataclasses.replace(small, positions=pos), 100)
    with pytest.raises(EnpcgError, match=r"R0 = 1\.5 nm.*Fix: use a smaller timestep"):
        bs.equilibrate(small, 2000, temperature=bs.temperature_kelvin(50.0), timestep=0.01)
    with pytest.raises(EnpcgError, match="n_chains"):
        bs.create_kremer_grest(0, 10)
    with pytest.raises(EnpcgError, match="twice the 2.5000 nm pair cutoff"):
        bs.create_polymer_glass(4, 10)
    with pytest.raises(EnpcgError, match="model must be one of"):
        bs.create_system(2, 2, 10.0, model="fene")


def test_polymer_glass_npt_barostat_and_quench():
    """Glass former (10 x 25 beads, start 0.85 sigma^-3) with a MonteCarloBarostat: at T* = 1, P* = 1 (16.6 bar)
    the time average of OpenMM's instantaneous pressure (computeCurrentPressure; its documentation says it
    should equal the applied pressure in equilibrium) is 1 within 0.3 P* (about 3 standard errors; measured
    0.935 here, 0.90-1.15 over 5 seeds), the box changes, and the model's own System stays without a barostat. Quenching
    to T* = 0.3 at P* = 1 densifies the melt by more than 0.08 sigma^-3 (measured 0.926 -> 1.069 sigma^-3 after
    20 tau), and the thermostat holds T* = 0.3 within 0.03 once the heat released by the densification is
    removed (20 tau after the quench; it peaks at T* ~ 0.45). The result's model carries the final box (its
    System's default box, and a 0-step continuation keeps it exactly)."""
    m = bs.create_polymer_glass(10, 25, seed=2, push_off_steps=2000, warmup_steps=300)
    p_bar = bs.pressure_bar(1.0)
    hot = bs.equilibrate(m, 6000, equilibration_steps=4000, sample_every=50, pressure=p_bar, seed=3)
    assert not any(isinstance(m.system.getForce(i), mm.MonteCarloBarostat) for i in range(m.system.getNumForces()))
    p_mean = hot.samples["pressure_bar"].mean() / bs.BAR_PER_REDUCED_PRESSURE
    assert abs(p_mean - 1.0) < 0.3, f"<P*> = {p_mean:.3f}, set 1"
    assert hot.model.box[0, 0] != m.box[0, 0]
    default_box = np.array([v.value_in_unit(unit.nanometer) for v in hot.model.system.getDefaultPeriodicBoxVectors()])
    np.testing.assert_array_equal(default_box, hot.model.box)  # a continued run starts in the final box
    np.testing.assert_array_equal(bs.equilibrate(hot.model, 0, pressure=p_bar).model.box, hot.model.box)
    rho_hot = hot.samples["number_density"].mean()
    cold = bs.equilibrate(hot.model, 2000, equilibration_steps=4000, sample_every=50, pressure=p_bar,
                          temperature=bs.temperature_kelvin(0.3), seed=4)
    rho_cold = cold.samples["number_density"].mean()
    assert rho_cold - rho_hot > 0.08, f"rho {rho_hot:.3f} (T* = 1) -> {rho_cold:.3f} (T* = 0.3)"
    assert abs(cold.report["kinetic_temperature_reduced"] - 0.3) < 0.03
