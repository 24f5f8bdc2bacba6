"""Elastic tensors (``enpcg.properties.elastic``): strain derivatives with the non-affine term against an
independent finite-difference stress-strain route, symmetries, stress conventions, and the Kob-Andersen glass.

Units: kJ/mol/nm^3 for stresses and elastic constants (1 kJ/mol/nm^3 = 1.66054e-3 GPa), nm, kJ/mol.
Systems:
* fcc Lennard-Jones "argon" (sigma = 0.34 nm, epsilon = 0.996 kJ/mol, cut at 2.5 sigma and energy-shifted,
  m = 39.948 amu), 4 x 4 x 4 conventional cells (256 atoms), static zero-pressure lattice constant
  a0 = 1.5496 sigma = 0.52687 nm (``crystals.lj_fcc_lattice_constant``). Measured: C11 = 2476.11, C12 = C44 =
  1409.63 kJ/mol/nm^3 (4.112, 2.341, 2.341 GPa; C12 = C44 is the Cauchy relation of central pair forces at
  zero stress); the finite-difference route (OpenMM System, Reference platform, OpenMM's minimiser at each of
  the +-1e-3 strained cells, finite-difference stresses) gives 2476.14, 1409.66, 1409.65: 1.2e-5 relative.
* Kob-Andersen glass: 8 inherent structures of N = 200 at density 1.2 (reduced units of
  ``systems.kob_andersen``), quenched from a T* = 1 liquid.
"""
import time

import numpy as np
import pytest

from enpcg.errors import EnpcgError
from enpcg.properties import (OpenMMPotential, TorchPotential, compare_model_elastic,
                              elastic_moduli, elastic_tensor, elastic_tensor_fd, isotropy, isotropy_statistics,
                              ka_energy_fn, ka_glass_samples, minimize, plot_elastic_comparison, symmetry_report,
                              to_voigt, young_modulus)
from enpcg.properties.crystals import fcc_lattice, lj_energy_fn, lj_fcc_lattice_constant, openmm_lj_system
from systems import kob_andersen as ka

SIGMA, EPSILON, MASS = 0.34, 0.996, 39.948  # nm, kJ/mol, amu
CUTOFF = 2.5 * SIGMA
A0 = lj_fcc_lattice_constant(SIGMA, EPSILON, CUTOFF)


def lj_pair(a, epsilon=EPSILON):
    """(positions, box, TorchPotential, OpenMMPotential) of the 256-atom LJ fcc crystal at lattice constant a."""
    x, box = fcc_lattice(a, 4)
    torch_pot = TorchPotential(lj_energy_fn(SIGMA, epsilon, CUTOFF), np.full(len(x), MASS))
    omm_pot = OpenMMPotential(openmm_lj_system(len(x), box, SIGMA, epsilon, CUTOFF, MASS))
    return x, box, torch_pot, omm_pot


@pytest.fixture(scope="module")
def fcc():
    x, box, tp, op = lj_pair(A0)
    analytic = elastic_tensor(tp, x, box)
    fd = elastic_tensor_fd(op, x, box, strain=1e-3)
    return x, box, tp, op, analytic, fd


def test_fcc_lj_analytic_matches_finite_difference_stress_strain(fcc):
    """fcc LJ argon at zero pressure: C11, C12, C44 from strain derivatives (autograd, TorchPotential) agree with
    the independent finite-difference stress-strain route (OpenMM System, OpenMM minimiser at each strained
    cell, finite-difference stresses) within 0.1 % (the issue asks 1 %; measured 1.2e-5); all 36 Voigt entries
    agree within 1e-3 of C11; the reference stress is zero within 1e-9 kJ/mol/nm^3."""
    *_, analytic, fd = fcc
    assert np.max(np.abs(analytic.stress)) < 1e-9
    ca, cf = analytic.cubic(), fd.cubic()
    for key in ("C11", "C12", "C44"):
        assert abs(cf[key] - ca[key]) / ca[key] < 1e-3, (key, ca[key], cf[key])
    assert np.max(np.abs(fd.voigt - analytic.voigt)) < 1e-3 * ca["C11"]
    # cubic crystal: the three axes are equivalent and shear-normal couplings vanish
    v = analytic.voigt
    assert np.allclose(np.diag(v)[:3], ca["C11"], rtol=1e-12)
    assert np.allclose(np.diag(v)[3:], ca["C44"], rtol=1e-12)
    assert np.max(np.abs(v[:3, 3:])) < 1e-9 * ca["C11"]
    # the numbers quoted in the module docstring (kJ/mol/nm^3)
    assert ca["C11"] == pytest.approx(2476.11, rel=1e-5)
    assert ca["C12"] == pytest.approx(1409.63, rel=1e-5)
    # Cauchy relation C12 = C44 for central pair forces at zero stress with every atom an inversion centre
    assert ca["C12"] == pytest.approx(ca["C44"], rel=1e-10)


def test_fcc_lj_tensor_symmetries(fcc):
    """Major (C_ijkl = C_klij) and minor (C_ijkl = C_jikl = C_ijlk) symmetries: exact to round-off (1e-12
    relative) for the analytic tensor, within the finite-difference error (1e-4 relative) for the
    stress-strain one, which does not impose them."""
    *_, analytic, fd = fcc
    sa, sf = analytic.symmetry(), fd.symmetry()
    for key in ("major", "minor_ab", "minor_cd", "lagrangian_major"):
        assert sa[key] < 1e-12, (key, sa[key])
    assert sf["major"] < 1e-4
    assert sf["minor_ab"] < 1e-12 and sf["minor_cd"] < 1e-12  # minor: symmetric stresses and strains


def test_fcc_nonaffine_term_is_zero_and_skipped_only_when_zero(fcc):
    """Every fcc atom is an inversion centre, so M = d2E/d eps dx vanishes and so does the non-affine term:
    computing it anyway (nonaffine=True, full 768 x 768 Hessian) changes no constant by more than 1e-12 of C11,
    and the Hessian without translations is positive definite."""
    x, box, tp, _, analytic, _ = fcc
    assert not analytic.info["nonaffine_computed"]
    forced = elastic_tensor(tp, x, box, nonaffine=True)
    assert forced.info["nonaffine_computed"]
    assert np.max(np.abs(forced.nonaffine)) < 1e-12 * analytic.cubic()["C11"]
    assert np.max(np.abs(forced.voigt - analytic.voigt)) < 1e-12 * analytic.cubic()["C11"]
    assert forced.min_eigenvalue > 0 and forced.n_zero_modes == 0


def test_stressed_fcc_reports_birch_coefficients():
    """At a stressed reference (lattice compressed by 1 %, hydrostatic pressure P = 60.05 kJ/mol/nm^3), the
    reported tensor is the stress-strain (Birch) B: it matches the finite-difference d sigma / d eps within
    0.1 % (measured 1.1e-5), while C^E = (1/V) d2E/d eps d eps differs from it by P (B11 = C^E11, B12 = C^E12
    + P, B44 = C^E44 - P/2, to 1e-10 relative); the Lagrangian C^L and, here, B keep the major symmetry; and the
    pair-potential Cauchy relation becomes B12 - B44 = 2P (1e-9 relative)."""
    x, box, tp, op = lj_pair(0.99 * A0)
    analytic = elastic_tensor(tp, x, box)
    fd = elastic_tensor_fd(op, x, box, strain=1e-3)
    p = -np.trace(analytic.stress) / 3
    assert p == pytest.approx(60.05, rel=1e-3)
    assert np.allclose(analytic.stress, -p * np.eye(3), atol=1e-9 * p)
    assert np.max(np.abs(fd.voigt - analytic.voigt)) < 1e-3 * analytic.voigt[0, 0]
    b, ce = analytic.voigt, to_voigt(analytic.energy_tensor)
    assert b[0, 0] == pytest.approx(ce[0, 0], rel=1e-10)
    assert b[0, 1] == pytest.approx(ce[0, 1] + p, rel=1e-10)
    assert b[3, 3] == pytest.approx(ce[3, 3] - p / 2, rel=1e-10)
    assert b[0, 1] - b[3, 3] == pytest.approx(2 * p, rel=1e-9)
    assert analytic.symmetry()["lagrangian_major"] < 1e-12 and analytic.symmetry()["major"] < 1e-12


def test_moduli_of_cubic_crystal(fcc):
    """Moduli of the cubic LJ crystal against closed forms (1e-12 relative): K = (C11 + 2 C12)/3 in all three
    averages; G_V = (C11 - C12 + 3 C44)/5; G_R = 5 (C11 - C12) C44 / (4 C44 + 3 (C11 - C12)); Young's modulus
    along [100] 1/S11 = (C11 - C12)(C11 + 2 C12)/(C11 + C12), and along [111] from
    1/E = S11 - 2 (S11 - S12 - S44/2) / 3 with S44 = 1/C44; Hill E = 9 K G / (3K + G)."""
    *_, analytic, _ = fcc
    c = analytic.cubic()
    c11, c12, c44 = c["C11"], c["C12"], c["C44"]
    m = elastic_moduli(analytic)
    k = (c11 + 2 * c12) / 3
    for key in ("K_V", "K_R", "K_H"):
        assert m[key] == pytest.approx(k, rel=1e-12)
    assert m["G_V"] == pytest.approx((c11 - c12 + 3 * c44) / 5, rel=1e-12)
    assert m["G_R"] == pytest.approx(5 * (c11 - c12) * c44 / (4 * c44 + 3 * (c11 - c12)), rel=1e-12)
    assert m["E_H"] == pytest.approx(9 * m["K_H"] * m["G_H"] / (3 * m["K_H"] + m["G_H"]), rel=1e-12)
    assert young_modulus(analytic, [1, 0, 0]) == pytest.approx((c11 - c12) * (c11 + 2 * c12) / (c11 + c12), rel=1e-12)
    s11 = (c11 + c12) / ((c11 - c12) * (c11 + 2 * c12))
    s12 = -c12 / ((c11 - c12) * (c11 + 2 * c12))
    e111 = 1 / (s11 - 2 * (s11 - s12 - 1 / (2 * c44)) / 3)
    assert young_modulus(analytic, [1, 1, 1]) == pytest.approx(e111, rel=1e-12)


def test_compare_model_with_mapped_reference_and_plot(tmp_path):
    """compare_model_elastic: a 'CG model' (torch LJ, epsilon x 1.05) against the reference (OpenMM LJ System,
    finite-difference route) through an identity mapping matrix. Elastic constants scale with epsilon at fixed
    geometry, so every constant and modulus differs by +5 % (within 1e-4: the finite-difference error) and
    Poisson's ratio by 0 (1e-4); the Markdown table and the heat-map plot are written."""
    x, box, _, op = lj_pair(A0)
    model = TorchPotential(lj_energy_fn(SIGMA, 1.05 * EPSILON, CUTOFF), np.full(len(x), MASS))
    comp, cg, ref = compare_model_elastic(model, op, x, box, mapping=np.eye(len(x)))
    assert cg.method == "analytic" and ref.method == "finite-difference"
    for name, a, b, diff, rel in comp.rows:
        if name == "nu_H":
            assert abs(diff) < 1e-4
        elif abs(b) > 1e-6:
            assert rel == pytest.approx(0.05, abs=1e-4), name
    table = comp.markdown()
    assert "| C44 |" in table and "GPa" in table
    path = tmp_path / "elastic.png"
    plot_elastic_comparison({"CG model": cg, "reference": ref}, path=path)
    assert path.stat().st_size > 10_000


def test_bad_inputs_raise_clear_errors():
    """Clear EnpcgErrors: unminimised positions (RMS force above force_tolerance) name the fix (minimise);
    an OpenMMPotential (no second derivatives) points to elastic_tensor_fd; a large strain; one sample for
    statistics; a wrong tensor shape."""
    x, box, tp, op = lj_pair(A0)
    rng = np.random.default_rng(0)
    with pytest.raises(EnpcgError, match="minimise"):
        elastic_tensor(tp, x + rng.normal(scale=0.01, size=x.shape), box)
    with pytest.raises(EnpcgError, match="elastic_tensor_fd"):
        elastic_tensor(op, x, box)
    with pytest.raises(EnpcgError, match="not small"):
        elastic_tensor_fd(op, x, box, strain=0.2)
    with pytest.raises(EnpcgError, match="at least 2"):
        isotropy_statistics([np.eye(6)])
    with pytest.raises(EnpcgError, match="Voigt"):
        symmetry_report(np.eye(5))


# ---------------------------------------------------------------------------------------------- Kob-Andersen
def test_ka_energy_fn_matches_openmm_system():
    """ka_energy_fn (torch, all pair types, per-pair cutoffs and shifts) reproduces the OpenMM System of
    systems.kob_andersen (Reference platform): energy within 1e-10 relative and forces within 1e-8 of the largest
    force, for a disordered configuration in a cubic box and in a sheared (triclinic, reduced-form) box."""
    n = 200
    built = ka.create_system(n)
    L = built.box_length
    rng = np.random.default_rng(3)
    x = ka.lattice_positions(n, seed=1) + rng.normal(scale=0.12, size=(n, 3))
    pot_t = TorchPotential(ka_energy_fn(built.types), np.ones(n))
    pot_o = OpenMMPotential(built.system)
    for box in (np.diag([L, L, L]), np.array([[L, 0, 0], [0.1 * L, L, 0], [-0.2 * L, 0.15 * L, L]])):
        et, ft = pot_t.energy_and_forces(x, box)
        eo, fo = pot_o.energy_and_forces(x, box)
        assert et == pytest.approx(eo, rel=1e-10)
        assert np.max(np.abs(ft - fo)) < 1e-8 * np.max(np.abs(fo))


@pytest.fixture(scope="module")
def ka_glass():
    t0 = time.perf_counter()
    samples = ka_glass_samples(8, 200, seed=0)
    results = [elastic_tensor(s.potential(), s.positions, s.box) for s in samples]
    return samples, results, time.perf_counter() - t0


def test_ka_glass_samples_are_inherent_structures(ka_glass):
    """The quenched samples are mechanically stable minima: RMS force below 1e-5 kJ/mol/nm, Hessian without
    translations positive definite; energies per particle in the inherent-structure range of KA at density 1.2
    quenched from T* = 1 (-7.6 < U/N < -7.4 eps_AA); the inherent-structure pressure (potential part) is
    negative and small (-1.5 < P* < 0; measured -0.3 to -0.8)."""
    samples, results, _ = ka_glass
    for s, r in zip(samples, results):
        assert s.rms_force < 1e-5
        assert r.min_eigenvalue > 0
        assert -7.6 < s.energy_per_particle < -7.4
        assert -1.5 < s.pressure < 0.0


def test_ka_glass_is_isotropic_within_statistical_error(ka_glass):
    """Isotropy C11 - C12 = 2 C44 of the ensemble: per sample, delta = C11 - C12 - 2 C44 with each constant
    averaged over the three cubic-cell axes (the only axes a periodic ensemble can single out); over the 8
    independent samples, |mean delta| <= 3 standard errors (SE = std / sqrt(8); measured -1.06 +- 1.94
    kJ/mol/nm^3 against 2 C44 = 35.8; the mean tensor's Zener ratio 2 C44 / (C11 - C12) is 1.03, within 0.15
    of 1). A single sample is not isotropic: its delta scatters by 5.5 kJ/mol/nm^3 (std), which is what sets
    the error bar."""
    _, results, _ = ka_glass
    stats = isotropy_statistics(results)
    assert abs(stats["delta_mean"]) <= 3 * stats["delta_se"], stats
    assert stats["delta_se"] < 0.15 * 2 * stats["C44"]  # the test has teeth: error below 15 % of 2 C44
    zener_mean = isotropy(np.mean([r.birch for r in results], axis=0))["zener"]
    assert abs(zener_mean - 1) < 0.15


def test_ka_glass_nonaffine_term_matters(ka_glass):
    """The non-affine (relaxation) term is essential: the affine-only (Born) Voigt shear modulus (measured
    44.7 +- 0.2 kJ/mol/nm^3) exceeds the relaxed one (17.7 +- 0.5) by more than 20 combined standard errors and
    by more than a factor 2; the non-affine tensor is positive semi-definite (it only softens: eigenvalues of
    its 6 x 6 Voigt matrix >= -1e-10 of its largest)."""
    _, results, _ = ka_glass
    stats = isotropy_statistics(results)
    diff = stats["G_affine"] - stats["G"]
    assert diff > 20 * np.hypot(stats["G_affine_se"], stats["G_se"]), stats
    assert stats["G_affine"] > 2 * stats["G"]
    for r in results:
        # with engineering shears the strain energy density is e^T C e / 2, so the Voigt matrix itself is
        # the quadratic form on strains
        w = np.linalg.eigvalsh(to_voigt(r.nonaffine))
        assert w.min() >= -1e-10 * w.max()


def test_ka_glass_nonaffine_tensor_matches_relaxed_finite_differences(ka_glass):
    """The relaxed tensor of one glass sample (analytic, with the non-affine term from the Hessian
    pseudo-inverse) matches the finite-difference stress-strain route on the OpenMM KA System (OpenMM's
    minimiser at each strained cell, no Hessian) within 2e-3 of max |C| for every Voigt entry and 0.5 % on the
    Voigt shear modulus (measured 3.6e-4 and 0.02 %), while the affine-only tensor is off by > 100 %. Strain
    h = 2e-5: at 1e-4 this N = 200 glass already shows plastic rearrangements (5 % errors with either
    minimiser), at 1e-5 the minimiser's residual forces (~3e-6 kJ/mol/nm) start to show."""
    samples, results, _ = ka_glass
    s, r = samples[0], results[0]
    fd = elastic_tensor_fd(OpenMMPotential(ka.create_system(200).system), s.positions, s.box, strain=2e-5,
                           tolerance=1e-7)
    scale = np.max(np.abs(r.voigt))
    assert np.max(np.abs(fd.voigt - r.voigt)) < 2e-3 * scale
    g, g_fd = elastic_moduli(r)["G_V"], elastic_moduli(fd)["G_V"]
    assert g_fd == pytest.approx(g, rel=5e-3)
    assert elastic_moduli(r.affine_birch)["G_V"] > 2 * g_fd


def test_minimize_both_methods_reach_the_same_minimum():
    """minimize: OpenMM's L-BFGS (OpenMMPotential) and scipy L-BFGS (TorchPotential) relax the same randomly
    displaced LJ crystal (0.01 nm) back to the perfect-crystal energy within 1e-9 relative; RMS forces below
    1e-5 kJ/mol/nm."""
    x, box, tp, op = lj_pair(A0)
    e0 = tp.energy(x, box)
    xp = x + np.random.default_rng(1).normal(scale=0.01, size=x.shape)
    for pot in (op, tp):
        res = minimize(pot, xp, box, tolerance=1e-6)
        assert res.rms_force < 1e-5
        assert res.energy == pytest.approx(e0, rel=1e-9)
