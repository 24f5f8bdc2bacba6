"""Phonons (enpcg.properties.phonons) of fcc crystals: known-answer dispersion, LJ argon symmetry and sum
rule, cross-checks of autograd against OpenMM finite differences, plots, bad input.

Units: nm, amu, kJ/mol; omega in rad/ps; k in 1/nm. The LJ crystal is argon-like: sigma = 0.34 nm,
epsilon = 0.996 kJ/mol, m = 39.948 amu, cut at 2.5 sigma with the energy shifted, at its zero-pressure lattice
constant a = 1.5496 sigma.
Tolerances, stated again in each test: analytic spring-network dispersion 1e-10 relative; TA degeneracy along
[100] 1e-6 relative (measured ~1e-14); acoustic omega^2 at Gamma <= 1e-12 max omega^2 after the sum rule;
Hessian autograd vs OpenMM central differences (h = 1e-5 nm) 1e-5 relative (measured ~1e-8).
"""
import numpy as np
import pytest
import torch

from enpcg.errors import EnpcgError
from enpcg.properties import OpenMMPotential, TorchPotential
from enpcg.properties.crystals import (FCC_SPECIAL_POINTS, fcc_lattice, fcc_primitive_cell, lj_energy_fn,
                                       lj_fcc_lattice_constant, lj_pair_images, openmm_lj_system, supercell)
from enpcg.properties.normal_modes import plot_mode_spectrum
from enpcg.properties.phonons import (force_constants, phonon_dispersion, phonon_frequencies, phonon_mesh,
                                      plot_dispersion)

SIGMA, EPS, MASS = 0.34, 0.996, 39.948
RC = 2.5 * SIGMA
A_LJ = lj_fcc_lattice_constant(SIGMA, EPS, RC)
G, X = FCC_SPECIAL_POINTS["G"], FCC_SPECIAL_POINTS["X"]


def lj_potential(n_atoms):
    return TorchPotential(lj_energy_fn(SIGMA, EPS, RC), np.full(n_atoms, MASS))


def test_lj_lattice_constant_is_zero_pressure():
    """The zero-pressure lattice constant of the 2.5 sigma LJ fcc crystal is 1.5496 sigma (4 digits), and the
    autograd stress of the 4x4x4 crystal there vanishes (|sigma| <= 1e-9 kJ/mol/nm^3, vs ~10 per 1 % strain)."""
    assert A_LJ / SIGMA == pytest.approx(1.5496, abs=1e-4)
    pos, box = fcc_lattice(A_LJ, 4)
    assert np.abs(lj_potential(len(pos)).stress(pos, box)).max() <= 1e-9


def spring_network(pos, box, k, cutoff):
    """Harmonic springs (k kJ/mol/nm^2) at rest length between all pairs closer than ``cutoff`` (nm) in the
    reference crystal, as a torch energy with fixed (i, j, image) bonds."""
    i, j, s = lj_pair_images(torch.tensor(pos), torch.tensor(box), cutoff)
    r0 = torch.linalg.norm(torch.tensor(pos)[j] - torch.tensor(pos)[i] + s @ torch.tensor(box), dim=1)

    def energy(x, b):
        d = x[j] - x[i] + s @ b
        return 0.5 * k * ((torch.linalg.norm(d, dim=1) - r0) ** 2).sum()

    return energy


def test_nearest_neighbour_springs_match_analytic_dispersion(tmp_path):
    """fcc (a = 0.4 nm, m = 20 amu) with central springs K = 800 kJ/mol/nm^2 between nearest neighbours only,
    primitive cell, 4x4x4 supercell: along [100] (Gamma to X), omega_LA = 2 sqrt(2K/m) |sin(q a / 4)| and
    omega_TA = 2 sqrt(K/m) |sin(q a / 4)| (twice) within 1e-10 relative; the dispersion plot is a PNG."""
    a, k, m = 0.4, 800.0, 20.0
    cell_pos, cell = fcc_primitive_cell(a)
    pos, box, _ = supercell(cell_pos, cell, 4)
    pot = TorchPotential(spring_network(pos, box, k, 1.1 * a / np.sqrt(2)), np.full(len(pos), m))
    disp = phonon_dispersion(pot, cell_pos, cell, 4, path=[("G", G), ("X", X)], points=21)
    q = np.linalg.norm(disp.k, axis=1)  # k is along [100]: |k| = q
    assert np.allclose(disp.k[:, 1:], 0.0, atol=1e-12)
    assert q[-1] == pytest.approx(2 * np.pi / a, rel=1e-14)
    s = np.abs(np.sin(q * a / 4))
    ta, la = 2 * np.sqrt(k / m) * s, 2 * np.sqrt(2 * k / m) * s
    inner = q > 0
    for branch, ref in ((0, ta), (1, ta), (2, la)):
        assert np.max(np.abs(disp.omega[inner, branch] - ref[inner]) / ref[inner]) <= 1e-10
    out = plot_dispersion(disp, tmp_path / "springs.png",
                          reference={"analytic": (disp.distance, np.stack([ta, ta, la], axis=1))})
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def lj_dispersion():
    """LJ argon, primitive cell, 5x5x5 supercell (widths 1.52 nm: the 0.85 nm cutoff fits the minimum image of
    every pair, so the force constants are exact), path Gamma-X-W-K-Gamma-L."""
    cell_pos, cell = fcc_primitive_cell(A_LJ)
    path = [(name, FCC_SPECIAL_POINTS[name]) for name in ("G", "X", "W", "K", "G", "L")]
    return phonon_dispersion(lj_potential(125), cell_pos, cell, 5, path=path, points=80)


def test_lj_transverse_branches_degenerate_along_100(lj_dispersion, tmp_path):
    """LJ argon along Gamma-X ([100], a 4-fold axis): the two transverse acoustic branches are degenerate within
    1e-6 relative (cubic symmetry; measured ~1e-14) and below the longitudinal one; omega(X) = 8.548 (TA) and
    12.495 (LA) rad/ps (1.36 and 1.99 THz, as measured in argon: ~1.3 and ~2.0 THz). Plot written."""
    d = lj_dispersion
    gx = (d.distance > 0) & (d.distance <= d.ticks[1][0] + 1e-12)
    w = d.omega[gx]
    assert np.max(np.abs(w[:, 1] - w[:, 0]) / w[:, 1]) <= 1e-6
    assert np.all(w[:, 2] > 1.2 * w[:, 1])
    assert w[-1] == pytest.approx([8.548, 8.548, 12.495], abs=2e-3)
    assert d.force_constants.boundary_fraction == 0.0
    assert plot_dispersion(d, tmp_path / "lj.png").stat().st_size > 1000


def test_lj_acoustic_sum_rule_at_gamma(lj_dispersion):
    """Translation invariance: the autograd force constants violate the acoustic sum rule only by round-off
    (relative <= 1e-12; reported before correction); after the correction the three acoustic omega^2 at Gamma
    (first and fifth corner of the path) are <= 1e-12 max omega^2."""
    d = lj_dispersion
    fc = d.force_constants
    assert fc.asr_corrected and 0.0 <= fc.asr_violation <= 1e-12
    lam = d.omega * np.abs(d.omega)  # signed omega^2
    gamma = np.linalg.norm(d.k, axis=1) == 0.0
    assert gamma.sum() == 2
    assert np.all(np.abs(lam[gamma]) <= 1e-12 * lam.max())


@pytest.fixture(scope="module")
def conventional():
    """4x4x4 conventional LJ cells (256 atoms, box 2.11 nm: OpenMM's minimum image holds the 0.85 nm cutoff),
    atoms displaced randomly by 0.005 nm so that every Hessian block is generic."""
    pos, box = fcc_lattice(A_LJ, 4)
    pos = pos + np.random.default_rng(0).normal(scale=0.005, size=pos.shape)
    omm = OpenMMPotential(openmm_lj_system(len(pos), box, SIGMA, EPS, RC, MASS))
    return pos, box, lj_potential(len(pos)), omm


def test_lj_hessian_autograd_matches_openmm_finite_differences(conventional):
    """The 768 x 768 Hessian of the displaced 256-atom LJ crystal: torch autograd (TorchPotential) and central
    differences of OpenMM forces (CustomNonbondedForce, same cutoff and shift, Reference platform, h = 1e-5 nm)
    agree within 1e-5 relative (Frobenius; measured ~1e-8)."""
    pos, box, torch_pot, omm = conventional
    h_torch = torch_pot.hessian(pos, box)
    h_omm = omm.hessian(pos, box)
    assert np.linalg.norm(h_torch - h_omm) / np.linalg.norm(h_torch) <= 1e-5
    assert np.allclose(h_torch, h_torch.T, rtol=0, atol=1e-10 * np.abs(h_torch).max())


def test_conventional_cell_phonons_fold_primitive_ones(conventional, lj_dispersion):
    """Perfect crystal, 4-atom conventional cell, 4x4x4 supercell: the 12 branches at a generic k hold the 3
    primitive-cell branches at k (1e-8 relative); force constants from OpenMM finite differences give the same
    12 frequencies within 1e-6 relative; their acoustic-sum-rule violation before correction is reported
    (finite differences: <= 1e-6 relative), and after correction omega^2(Gamma) <= 1e-12 max."""
    _, _, torch_pot, omm = conventional
    cell_pos, _ = fcc_lattice(A_LJ, 1)
    cell = np.eye(3) * A_LJ
    fc_t = force_constants(torch_pot, cell_pos, cell, 4)
    fc_o = force_constants(omm, cell_pos, cell, 4)
    k = np.array([[0.31, 0.17, 0.05], [0.0, 0.0, 0.0]]) * 2 * np.pi / A_LJ
    w_t = phonon_frequencies(fc_t, k)
    w_o = phonon_frequencies(fc_o, k)
    w_p = phonon_frequencies(lj_dispersion.force_constants, k[:1])[0]
    assert np.all(np.min(np.abs(w_t[0][:, None] - w_p[None, :]), axis=0) <= 1e-8 * w_p)
    assert np.max(np.abs(w_o[0] - w_t[0]) / w_t[0]) <= 1e-6
    assert fc_o.asr_violation <= 1e-6
    lam = w_o[1] * np.abs(w_o[1])
    assert np.all(np.abs(lam[:3]) <= 1e-12 * w_o[0].max() ** 2)


def test_openmm_force_constants_in_a_rhombohedral_supercell():
    """Primitive cell, 6x6x6 supercell (rhombohedral, not in OpenMM's reduced form): force_constants rotates the
    crystal into reduced form for OpenMM's finite differences and the constants back; the frequencies at a
    generic k and at X agree with autograd's within 1e-6 relative."""
    cell_pos, cell = fcc_primitive_cell(A_LJ)
    pos, sbox, _ = supercell(cell_pos, cell, 6)
    q, r = np.linalg.qr(sbox.T)
    reduced = np.tril(sbox @ (q * np.sign(np.diag(r))))
    omm = OpenMMPotential(openmm_lj_system(len(pos), reduced, SIGMA, EPS, RC, MASS))
    fc_o = force_constants(omm, cell_pos, cell, 6)
    fc_t = force_constants(lj_potential(len(pos)), cell_pos, cell, 6)
    k = fc_t.to_cartesian([[0.1, 0.2, 0.33], X])
    w_o, w_t = phonon_frequencies(fc_o, k), phonon_frequencies(fc_t, k)
    assert np.max(np.abs(w_o - w_t) / w_t) <= 1e-6


def test_phonon_density_of_states(lj_dispersion, tmp_path):
    """A 6x6x6 Gamma-centred mesh gives 3 x 216 frequencies, all real except the acoustic zeros at Gamma
    (|omega| <= 1e-5 rad/ps), none above the dispersion maximum + 1 %; the DOS plot is a PNG."""
    fc = lj_dispersion.force_constants
    w = phonon_mesh(fc, 6)
    assert w.shape == (216, 3)
    assert np.all(w[1:] > 0) and np.all(np.abs(w[0]) <= 1e-5)
    assert w.max() <= 1.01 * lj_dispersion.omega.max()
    assert plot_mode_spectrum(w.reshape(-1), tmp_path / "dos.png", unit="THz").stat().st_size > 1000


def test_bad_input_is_reported():
    """A potential of the wrong size, a one-point path, a singular cell and a wrong Hessian raise EnpcgError."""
    cell_pos, cell = fcc_primitive_cell(A_LJ)
    with pytest.raises(EnpcgError, match="supercell"):
        force_constants(lj_potential(10), cell_pos, cell, 5)
    with pytest.raises(EnpcgError, match="non-singular"):
        force_constants(lj_potential(125), cell_pos, np.zeros((3, 3)), 5)
    with pytest.raises(EnpcgError, match="hessian"):
        force_constants(lj_potential(125), cell_pos, cell, 5, hessian=np.eye(3))
    with pytest.raises(EnpcgError, match="path"):
        phonon_dispersion(lj_potential(125), cell_pos, cell, 5, path=[("G", G)])
    with pytest.raises(EnpcgError, match="repetitions"):
        supercell(cell_pos, cell, (2, 0, 2))
