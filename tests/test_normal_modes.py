"""Normal modes (enpcg.properties.normal_modes): known answers, rigid-body modes, units, plots, bad input.

Units: nm, amu, kJ/mol; omega in rad/ps (1 kJ/mol/nm^2/amu = 1/ps^2), wavenumbers in cm^-1.
Tolerances, stated again in each test: analytic frequencies 1e-8 relative (the Hessian is autograd-exact, the
eigensolver is ~1e-13 relative in omega^2); zero modes |omega^2| <= 1e-12 max omega^2 (round-off of a float64
eigensolver: ~1e-14); OpenMM finite-difference modes against autograd 1e-6 relative; HCl wavenumber 0.1 %.
"""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from enpcg.errors import EnpcgError
from enpcg.properties import OpenMMPotential, TorchPotential
from enpcg.properties.crystals import lj_energy_fn, openmm_lj_system
from enpcg.properties.normal_modes import (CM_PER_RAD_PS, density_of_states, mass_weighted_hessian, normal_modes,
                                           plot_mode_spectrum, rigid_body_basis)

ZERO = 1e-12  # |omega^2| / max omega^2 counted as zero


def ring_energy(n, a, k):
    """Harmonic springs (stiffness k kJ/mol/nm^2, rest length a nm) between neighbours of a periodic ring,
    minimum image in an orthorhombic box."""

    def energy(x, box):
        d = torch.roll(x, -1, 0) - x
        edges = torch.diagonal(box)
        d = d - torch.round(d / edges) * edges
        return 0.5 * k * ((torch.linalg.norm(d, dim=1) - a) ** 2).sum()

    return energy


def test_harmonic_ring_matches_chain_dispersion():
    """A periodic ring of N = 16 beads (m = 12 amu, a = 0.15 nm, K = 500 kJ/mol/nm^2) along x: the N longitudinal
    modes are omega(k) = 2 sqrt(K/m) |sin(k a / 2)|, k = 2 pi j / (N a), within 1e-8 relative (k = 0 is the
    x translation). Central springs at rest length give no transverse stiffness: the 2N transverse modes
    (y, z only) are zero (|omega^2| <= 1e-12 max omega^2); two of them and the x translation are the three
    rigid-body modes of a periodic cell (overlap with the analytic translations >= 1 - 1e-10)."""
    n, a, k, m = 16, 0.15, 500.0, 12.0
    pos = np.zeros((n, 3))
    pos[:, 0] = a * np.arange(n)
    box = np.diag([n * a, 5.0, 5.0])
    modes = normal_modes(TorchPotential(ring_energy(n, a, k), np.full(n, m)), pos, box)

    lam_max = np.max(np.abs(modes.eigenvalues))
    assert modes.n_rigid == 3 and modes.rigid_body.sum() == 3
    assert np.all(modes.rigid_body_overlap[modes.rigid_body] >= 1 - 1e-10)
    assert np.all(np.abs(modes.eigenvalues[modes.rigid_body]) <= ZERO * lam_max)

    v = modes.vectors.reshape(n, 3, -1)
    x_weight = np.sum(v[:, 0, :] ** 2, axis=0)
    longitudinal = x_weight > 0.5
    assert longitudinal.sum() == n
    # each mode is purely longitudinal or purely transverse (the two do not mix)
    assert np.all((x_weight > 1 - 1e-10) | (x_weight < 1e-10))
    j = np.arange(n)
    expected = np.sort(2 * np.sqrt(k / m) * np.abs(np.sin(np.pi * j / n)))
    got = np.sort(modes.omega[longitudinal & ~modes.rigid_body])
    assert np.max(np.abs(got - expected[1:]) / expected[1:]) <= 1e-8
    transverse = ~longitudinal
    assert transverse.sum() == 2 * n
    assert np.all(np.abs(modes.eigenvalues[transverse]) <= ZERO * lam_max)
    summary = modes.summary()
    assert summary["n_zero_internal"] == 2 * n - 2 and summary["n_imaginary_internal"] == 0


def triatomic_energy(k, bonds):
    def energy(x, box):
        return sum(0.5 * k * (torch.linalg.norm(x[j] - x[i]) - r0) ** 2 for i, j, r0 in bonds)

    return energy


def test_linear_triatomic_stretches_and_five_rigid_modes():
    """Linear O-C-O (m_O = 15.999, m_C = 12.011 amu) with two central springs (k = 1e5 kJ/mol/nm^2, 0.116 nm):
    symmetric stretch sqrt(k / m_O), antisymmetric stretch sqrt(k (m_C + 2 m_O) / (m_O m_C)) within 1e-8
    relative; 5 rigid-body modes (3 translations, 2 rotations: linear molecule) with omega^2 <= 1e-12 max;
    the 2 bends are zero (no angle term)."""
    mo, mc, k, r0 = 15.999, 12.011, 1e5, 0.116
    pos = np.array([[-r0, 0, 0], [0, 0, 0], [r0, 0, 0]]) @ np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    pot = TorchPotential(triatomic_energy(k, [(0, 1, r0), (1, 2, r0)]), [mo, mc, mo])
    modes = normal_modes(pot, pos)
    assert modes.n_rigid == 5
    lam_max = modes.eigenvalues.max()
    assert np.all(np.abs(modes.eigenvalues[modes.rigid_body]) <= ZERO * lam_max)
    internal = modes.internal_omega
    assert np.all(np.abs(internal[:2]) ** 2 <= ZERO * lam_max)  # bends
    expected = [np.sqrt(k / mo), np.sqrt(k * (mc + 2 * mo) / (mo * mc))]
    assert np.allclose(internal[2:], expected, rtol=1e-8, atol=0)


def test_hcl_wavenumber_units():
    """HCl: k = 516 N/m = 3.1074e5 kJ/mol/nm^2, masses 1.008 and 34.969 amu: harmonic wavenumber 2990.9 cm^-1
    (NIST omega_e of H35Cl) within 0.1 %; checks 1 rad/ps = 5.308837 cm^-1 (= 1 / (2 pi c), c in cm/ps)."""
    assert CM_PER_RAD_PS == pytest.approx(1 / (2 * np.pi * 2.99792458e-2), rel=1e-15)
    assert CM_PER_RAD_PS == pytest.approx(5.308837, rel=1e-6)
    k = 516.0 * 6.02214076e23 * 1e-18 / 1e3  # N/m = J/m^2 per molecule -> kJ/mol/nm^2
    pot = TorchPotential(triatomic_energy(k, [(0, 1, 0.1275)]), [1.008, 34.969])
    modes = normal_modes(pot, [[0, 0, 0], [0.1275, 0, 0]])
    assert modes.n_rigid == 5 and len(modes.internal_omega) == 1
    assert modes.wavenumber_cm[-1] == pytest.approx(2990.9, rel=1e-3)
    assert modes.frequency_thz[-1] == pytest.approx(modes.omega[-1] / (2 * np.pi), rel=1e-15)


@pytest.fixture(scope="module")
def lj_cluster():
    """A relaxed 7-atom argon-like LJ cluster (sigma 0.34 nm, epsilon 0.996 kJ/mol, cutoff 2 nm: no pair cut),
    forces below 1e-9 kJ/mol/nm."""
    fn = lj_energy_fn(0.34, 0.996, 2.0, shift=True)
    pot = TorchPotential(fn, np.full(7, 39.948))
    rng = np.random.default_rng(3)
    x0 = rng.uniform(-0.3, 0.3, size=(7, 3))
    res = minimize(lambda v: pot.energy_and_forces(v.reshape(-1, 3))[0], x0.reshape(-1),
                   jac=lambda v: -pot.energy_and_forces(v.reshape(-1, 3))[1].reshape(-1), method="L-BFGS-B",
                   options={"gtol": 1e-12, "ftol": 1e-16, "maxiter": 5000})
    x = res.x.reshape(-1, 3)
    # polish with Newton steps on the autograd Hessian (pseudo-inverse: the 6 rigid-body modes are singular)
    for _ in range(3):
        f = pot.forces(x).reshape(-1)
        x = x + (np.linalg.pinv(pot.hessian(x), rcond=1e-10) @ f).reshape(-1, 3)
    assert np.abs(pot.forces(x)).max() < 1e-9
    return pot, x


def test_cluster_rigid_modes_and_openmm_cross_check(lj_cluster):
    """Relaxed LJ7 cluster: 6 rigid-body modes (overlap >= 1 - 1e-8) with |omega^2| <= 1e-12 max omega^2, all 15
    internal modes real; OpenMM's finite-difference Hessian (Reference, CutoffNonPeriodic) gives the same
    internal frequencies within 1e-6 relative and rigid-body residuals below 1e-3 of the highest omega."""
    pot, x = lj_cluster
    modes = normal_modes(pot, x)
    lam_max = modes.eigenvalues.max()
    assert modes.n_rigid == 6
    assert np.all(modes.rigid_body_overlap[modes.rigid_body] >= 1 - 1e-8)
    assert np.all(np.abs(modes.eigenvalues[modes.rigid_body]) <= ZERO * lam_max)
    assert np.all(modes.internal_omega > 0) and len(modes.internal_omega) == 15

    omm = OpenMMPotential(openmm_lj_system(7, None, 0.34, 0.996, 2.0, 39.948))
    ref = normal_modes(omm, x)
    assert ref.n_rigid == 6
    assert np.max(np.abs(ref.internal_omega - modes.internal_omega) / modes.internal_omega) <= 1e-6
    assert np.max(np.abs(ref.rigid_body_residual)) <= 1e-3 * ref.omega[-1]


def test_mass_weighting_and_rigid_basis():
    """mass_weighted_hessian divides by sqrt(m_i m_j) exactly; the rigid basis is orthonormal (to 1e-12) with
    6 columns for a triangle, 5 for a line, 3 for one atom or a periodic cell."""
    h = np.arange(36.0).reshape(6, 6)
    h = h + h.T
    m = np.array([2.0, 8.0])
    w = np.repeat(1 / np.sqrt(m), 3)
    assert np.allclose(mass_weighted_hessian(h, m), h * w[:, None] * w[None, :], rtol=1e-15, atol=0)
    tri = np.array([[0, 0, 0], [0.1, 0, 0], [0, 0.2, 0.05]])
    basis = rigid_body_basis(tri, [1.0, 2.0, 3.0])
    assert basis.shape == (9, 6) and np.allclose(basis.T @ basis, np.eye(6), atol=1e-12)
    assert rigid_body_basis(tri * [1, 0, 0], [1.0, 2.0, 3.0]).shape[1] == 5
    assert rigid_body_basis(tri[:1], [1.0]).shape[1] == 3
    assert rigid_body_basis(tri, [1.0, 2.0, 3.0], periodic=True).shape[1] == 3


def test_spectrum_plot_and_density(tmp_path, lj_cluster):
    """density_of_states integrates to 1 (normalised, to 1e-12) and to the number of modes otherwise; the mode
    spectrum plot is a PNG file."""
    pot, x = lj_cluster
    modes = normal_modes(pot, x)
    centres, dens, edges = density_of_states(modes.internal_omega, bins=10, unit="cm-1")
    assert np.sum(dens * np.diff(edges)) == pytest.approx(1.0, abs=1e-12)
    _, counts, edges = density_of_states(modes.internal_omega, bins=10, normalize=False)
    assert np.sum(counts * np.diff(edges)) == pytest.approx(15.0, abs=1e-9)
    out = plot_mode_spectrum(modes, tmp_path / "spectrum.png", bins=10)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_reported():
    """Wrong Hessian shape, non-positive masses, mismatched positions and unknown units raise EnpcgError."""
    with pytest.raises(EnpcgError, match="square"):
        mass_weighted_hessian(np.zeros((6, 5)), [1.0, 1.0])
    with pytest.raises(EnpcgError, match="positive"):
        mass_weighted_hessian(np.eye(6), [1.0, 0.0])
    pot = TorchPotential(triatomic_energy(1.0, [(0, 1, 0.1)]), [1.0, 1.0])
    with pytest.raises(EnpcgError, match="particles"):
        normal_modes(pot, np.zeros((3, 3)))
    with pytest.raises(EnpcgError, match="unit"):
        density_of_states([1.0, 2.0], unit="Hz")
