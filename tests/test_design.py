"""Inverse design (enpcg.properties.design): rigid-body projection, conservation of the centre of mass and of
the angular momentum, a differentiable lowest vibrational frequency, and the example reaching its targets.

Units: nm, amu, kJ/mol; omega in rad/ps. Tolerances, stated again in each test: momenta of a projected step
<= 1e-12 relative to the unprojected step's scale (float64 projection round-off is ~1e-16); centre-of-mass
change <= 1e-12 x the cluster's radius of gyration; the projected Hessian's lowest omega^2 equal to an
independent numpy evaluation to 1e-12 of the largest eigenvalue, its autograd gradient equal to central
differences to 1e-6.
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from enpcg.errors import EnpcgError
from enpcg.properties import TorchPotential
from enpcg.properties.crystals import lj_energy_fn
from enpcg.properties.design import (centre_of_mass, design, lowest_frequency, plot_design_history,
                                     potential_energy, projected_gradient, radius_of_gyration, remove_rigid_motion,
                                     step_momenta)
from enpcg.properties.normal_modes import mass_weighted_hessian, normal_modes, rigid_body_basis

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
ROUND_OFF = 1e-12


def load_example():
    spec = importlib.util.spec_from_file_location("inverse_design", ROOT / "examples" / "inverse_design.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture(scope="module")
def cluster(example):
    """The example's relaxed 8-atom LJ isotope cluster (Ar-36 / Ar-40 masses): potential, positions."""
    return example.relaxed_cluster()


def field_property(masses):
    """A property that is NOT invariant under rigid motions: the radius of gyration plus a uniform field on
    the first three particles and a twist about z (kJ/mol-like units; only its gradient matters here)."""
    rg = radius_of_gyration(masses)
    n = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)

    def prop(x):
        return rg(x) + (x[:3] @ n).sum() + 0.7 * (x[:, 0] * x[:, 1]).sum()

    return prop


def random_cluster(seed=0, n=10):
    rng = np.random.default_rng(seed)
    return rng.normal(scale=0.4, size=(n, 3)) + 2.0, rng.uniform(10.0, 100.0, n)


def test_projected_step_has_no_linear_or_angular_momentum():
    """A step along the projected direction of a property with a large rigid-body part (unequal masses
    10-100 amu, 10 particles): its momentum sum m dx and angular momentum sum m (x - X_com) x dx are <= 1e-12 of
    the unprojected (raw gradient) step's scales sum m |dx| and sum m |r| |dx|, whose own relative momentum is
    >= 0.1 (the negative control); the centre of mass after the step moves <= 1e-12 x R_g. The projection is
    idempotent (1e-12 relative), removes a rigid translation plus an infinitesimal rotation (left <= 1e-12 of
    it), and gradient . direction >= 0 (a descent direction)."""
    x, m = random_cluster()
    pg = projected_gradient(field_property(m), x, m)
    assert pg.n_rigid == 6 and pg.rigid_fraction > 0.1
    lr = 1e-3
    raw, step = -lr * pg.gradient, -lr * pg.direction
    mom_raw = step_momenta(x, m, raw)
    mom = step_momenta(x, m, step)
    assert mom_raw["relative_momentum"] >= 0.1
    assert np.linalg.norm(mom["momentum"]) <= ROUND_OFF * mom_raw["momentum_scale"]
    assert np.linalg.norm(mom["angular_momentum"]) <= ROUND_OFF * mom_raw["angular_momentum_scale"]
    rg = float(radius_of_gyration(m)(torch.tensor(x)))
    assert np.linalg.norm(centre_of_mass(x + step, m) - centre_of_mass(x, m)) <= ROUND_OFF * rg
    assert float(np.sum(pg.gradient * pg.direction)) >= 0

    again = remove_rigid_motion(step, x, m)
    assert np.linalg.norm(again - step) <= ROUND_OFF * np.linalg.norm(step)
    r = x - centre_of_mass(x, m)
    rigid = np.array([0.01, -0.02, 0.005]) + np.cross(np.array([0.02, 0.01, -0.03]), r)
    assert np.linalg.norm(remove_rigid_motion(rigid, x, m)) <= ROUND_OFF * np.linalg.norm(rigid)
    # a periodic cell removes translations only: the rotation survives
    assert np.linalg.norm(remove_rigid_motion(rigid, x, m, periodic=True)) > 0.1 * np.linalg.norm(rigid)


def test_invariant_property_needs_the_mass_metric(cluster, example):
    """For the LJ energy (invariant: sum_i g_i = 0 to round-off) of the isotope cluster, the raw gradient step
    still moves the centre of mass (masses differ: relative momentum >= 1e-3), while the projected direction
    differs from M^-1 g m_mean only by round-off (rigid_fraction <= 1e-12) and carries no momentum (<= 1e-12)."""
    pot, x = cluster
    m = example.MASSES
    xs = x + np.random.default_rng(1).normal(scale=0.01, size=x.shape)  # off the minimum: forces non-zero
    pg = projected_gradient(potential_energy(pot), xs, m)
    assert pg.rigid_fraction <= ROUND_OFF
    assert step_momenta(xs, m, pg.gradient)["relative_momentum"] >= 1e-3
    assert step_momenta(xs, m, pg.direction)["relative_momentum"] <= ROUND_OFF
    natural = m.mean() * pg.gradient / m[:, None]
    assert np.linalg.norm(pg.direction - natural) <= ROUND_OFF * np.linalg.norm(natural)


@pytest.mark.parametrize("method", ["lbfgs", "gd"])
def test_design_keeps_centre_of_mass_and_angular_momentum(method):
    """Designing the non-invariant property to 0.9 of its value (10 particles, masses 10-100 amu, projected
    L-BFGS and gradient descent): the target is reached within 1e-8; every accepted step has relative linear and
    angular momentum <= 1e-12; the centre of mass stays within 1e-12 x R_g of the start through the whole run
    (a cluster that starts with zero momentum and angular momentum keeps them)."""
    x, m = random_cluster(seed=2)
    prop = field_property(m)
    v0 = float(prop(torch.tensor(x)))
    res = design(prop, 0.9 * v0, x, m, steps=200, lr=0.05, method=method, tolerance=1e-8, max_step=0.05)
    assert res.converged and abs(res.value - 0.9 * v0) <= 1e-8, res.message
    assert res.n_steps >= 1 and len(res.history["step"]) == res.n_steps + 1
    rg = float(radius_of_gyration(m)(torch.tensor(x)))
    h = res.history
    assert np.max(h["relative_momentum"]) <= ROUND_OFF
    assert np.max(h["relative_angular_momentum"]) <= ROUND_OFF
    assert np.max(h["com_shift"]) <= ROUND_OFF * rg
    assert np.linalg.norm(centre_of_mass(res.positions, m) - centre_of_mass(x, m)) <= ROUND_OFF * rg
    assert np.max(h["max_displacement"]) <= 0.05 + 1e-15


def numpy_lowest_frequency(pot, x, m, largest=False):
    """Independent route: the autograd Hessian of TorchPotential, mass-weighted, projected with the analytic
    rigid-body basis of normal_modes (principal axes, not a QR), lowest internal eigenvalue by numpy; with
    ``largest`` also the largest eigenvalue (1/ps^2), the scale of the spectrum's round-off."""
    hm = mass_weighted_hessian(pot.hessian(x), m)
    u = rigid_body_basis(x, m)
    p = np.eye(len(hm)) - u @ u.T
    lam = np.linalg.eigvalsh(p @ hm @ p)
    internal = np.linalg.eigvalsh(p @ hm @ p + (1.0 + 2.0 * np.max(np.abs(lam))) * u @ u.T)[0]
    w = np.sign(internal) * np.sqrt(abs(internal))
    return (w, float(np.max(np.abs(lam)))) if largest else w


def test_lowest_frequency_is_exact_and_differentiable(cluster, example):
    """omega_min of the LJ isotope cluster: at the minimum it equals normal_modes' lowest internal omega
    (1e-6 relative: the minimum's residual force 1e-10 kJ/mol/nm enters only the rigid modes); at a configuration
    displaced by 0.003 nm its omega^2 equals the independent numpy projection's to 1e-12 of the largest
    eigenvalue (float64 eigensolver round-off); its autograd gradient
    (a third derivative of the energy) equals central differences (h = 1e-5 nm) along two internal directions to
    1e-6 relative."""
    pot, x = cluster
    m = example.MASSES
    om = lowest_frequency(pot, m)
    w = float(om(torch.tensor(x)).detach())
    assert abs(w - normal_modes(pot, x).internal_omega[0]) <= 1e-6 * w
    xs = x + np.random.default_rng(3).normal(scale=0.003, size=x.shape)
    pg = projected_gradient(om, xs, m)
    w_np, lam_max = numpy_lowest_frequency(pot, xs, m, largest=True)
    assert pg.value > 0.5 * w  # still a real mode: sqrt is smooth here
    assert abs(pg.value ** 2 - w_np ** 2) <= 1e-12 * lam_max
    assert pg.rigid_fraction <= 1e-10  # omega is invariant under rigid motions
    h = 1e-5
    for seed in (4, 5):
        d = remove_rigid_motion(np.random.default_rng(seed).normal(size=x.shape), xs, m)
        d /= np.linalg.norm(d)
        fd = (float(om(torch.tensor(xs + h * d)).detach()) - float(om(torch.tensor(xs - h * d)).detach())) / (2 * h)
        ad = float(np.sum(pg.gradient * d))
        assert abs(fd - ad) <= 1e-6 * np.linalg.norm(pg.gradient), (fd, ad)


def test_example_reaches_its_targets(example, tmp_path):
    """The example (examples/inverse_design.py, full tolerance): omega_min raised by 20 % and R_g lowered by
    5 %, each within its stated tolerance (1e-6 relative), with every step's relative momenta <= 1e-12 and the
    centre of mass fixed to 1e-12 x R_g; the final omega_min^2 agrees with the numpy projection's to 1e-12 of
    the largest eigenvalue; the
    history plot is written."""
    results = example.run(quick=False, out=tmp_path)
    pot, x = example.relaxed_cluster()
    m = example.MASSES
    rg0 = float(radius_of_gyration(m)(torch.tensor(x)))
    for name, factor in (("omega_min (rad/ps)", example.FREQUENCY_FACTOR), ("R_g (nm)", example.RG_FACTOR)):
        r = results[name]
        assert r.converged, (name, r.message)
        assert abs(r.value - factor * r.initial_value) <= example.TOLERANCE * abs(r.initial_value)
        s = r.summary()
        assert s["max_relative_momentum"] <= ROUND_OFF and s["max_relative_angular_momentum"] <= ROUND_OFF
        assert s["max_com_shift_nm"] <= ROUND_OFF * rg0
    r = results["omega_min (rad/ps)"]
    w_np, lam_max = numpy_lowest_frequency(pot, r.positions, m, largest=True)
    assert abs(w_np ** 2 - r.value ** 2) <= 1e-12 * lam_max
    assert (tmp_path / "design.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    single = plot_design_history(r, tmp_path / "one.png", unit="rad/ps")
    assert single.exists()


def test_bad_input_is_reported():
    """Clear EnpcgErrors: unknown method, non-scalar property, property without an autograd graph, bad masses,
    non-finite target, a linear molecule for the frequency, an OpenMM-less energy missing."""
    x, m = random_cluster(n=5)
    rg = radius_of_gyration(m)
    with pytest.raises(EnpcgError, match="method must be one of"):
        design(rg, 0.1, x, m, method="newton")
    with pytest.raises(EnpcgError, match="scalar torch tensor"):
        projected_gradient(lambda z: z.sum(0), x, m)
    with pytest.raises(EnpcgError, match="does not depend on the positions"):
        projected_gradient(lambda z: torch.tensor(1.0, dtype=torch.float64), x, m)
    with pytest.raises(EnpcgError, match="masses must"):
        projected_gradient(rg, x, -m)
    with pytest.raises(EnpcgError, match="target must be finite"):
        design(rg, float("nan"), x, m)
    with pytest.raises(EnpcgError, match="steps must be an integer"):
        design(rg, 0.1, x, m, steps=-1)
    line = np.zeros((4, 3))
    line[:, 0] = 0.38 * np.arange(4)
    om = lowest_frequency(TorchPotential(lj_energy_fn(0.34, 0.996, 1.5), np.full(4, 40.0)), np.full(4, 40.0))
    with pytest.raises(EnpcgError, match="linear"):
        projected_gradient(om, line, np.full(4, 40.0))
    with pytest.raises(EnpcgError, match="TorchPotential or a torch energy"):
        potential_energy(42)
