"""Tabulated spline model, its native OpenMM export, and MS-CG force matching against known answers.

Tolerances: spline tables vs scipy's natural/periodic CubicSpline 1e-12 (same interpolant); torch vs native
OpenMM forces ||dF||/||F|| <= 1e-6 (float64 model, Reference) and <= 1e-4 (float32 model, CPU platform);
finite differences 1e-6 relative; invariances 1e-10 relative. Known answer (LJ dimer fluid, 1000 frames x 378
beads, Gaussian noise of twice the RMS force on every component): harmonic k and LJ epsilon within 3 %, r0
within 0.1 sqrt(kT/k), sigma within 0.005 nm. Over repeated runs (new trajectory and noise each time) the
fitted epsilon scatters by about 0.75 % (k by 0.5 %, sigma by 0.0003 nm), so 3 % is 4 standard errors.
"""
import io

import numpy as np
import pytest
import torch
from scipy.interpolate import CubicSpline
from scipy.optimize import curve_fit

from enpcg.errors import EnpcgError
from enpcg.geometry import all_pairs, bond_lengths, norm, pair_vectors
from enpcg.models import batch_forces, create_model, energy_and_forces, load_model, save_model
from enpcg.models.tables import evaluate_tables, natural_spline_second_derivatives, \
    periodic_spline_second_derivatives

from known_answer import TRICLINIC_BOX, make_known_answer_data, random_chains


RC = 0.9


def lj(r, eps, sig):
    return 4 * eps * ((sig / r) ** 12 - (sig / r) ** 6)


def lj_force(r, eps, sig):
    return 24 * eps / r * (2 * (sig / r) ** 12 - (sig / r) ** 6)


def spline_config(periodic=True):
    """Tables from analytic functions for a two-type chain system (types A, B)."""
    r = np.linspace(0.0, RC, 181)

    def pair(eps, sig):
        v = np.minimum(lj(np.maximum(r, 0.25), eps, sig), 3000.0) - lj(RC, eps, sig)
        v[-1] = 0.0
        return {"min": 0.0, "max": RC, "values": v}

    rb = np.linspace(0.0, 1.0, 101)
    ta = np.linspace(0.0, np.pi, 91)
    td = np.linspace(-np.pi, np.pi, 73)
    dv = 1 + np.cos(td) + 0.5 * np.cos(3 * td - 0.3)
    dv[-1] = dv[0]
    return dict(periodic=periodic, cutoff=RC,
                pairs={"A-A": pair(1.0, 0.40), "A-B": pair(2.0, 0.42), "B-B": pair(1.5, 0.35)},
                bonds={"A-B": {"min": 0.0, "max": 1.0, "values": 1500 * (rb - 0.4) ** 2}},
                angles={"A-B-A": {"min": 0.0, "max": np.pi, "values": 20 * (ta - 2) ** 2},
                        "B-A-B": {"min": 0.0, "max": np.pi, "values": 10 * (ta - 1.9) ** 2}},
                dihedrals={"A-B-A-B": {"min": -np.pi, "max": np.pi, "values": dv}})


@pytest.fixture(scope="module")
def system():
    return random_chains(n_chains=8, seed=2)


def openmm_state(forces, pos, box, platform, round_trip=True):
    """Energy (kJ/mol) and forces (n, 3) kJ/mol/nm of ``forces`` in a System, after an XML round trip."""
    import openmm

    s = openmm.System()
    for _ in range(len(pos)):
        s.addParticle(50.0)
    if box is not None:
        s.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*b) for b in box])
    for f in forces:
        s.addForce(f)
    if round_trip:
        s = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(s))
    ctx = openmm.Context(s, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    ctx.setPositions(pos)
    st = ctx.getState(getEnergy=True, getForces=True)
    return st.getPotentialEnergy()._value, st.getForces(asNumpy=True)._value


# ------------------------------------------------------------------------------------------- tables
@pytest.mark.parametrize("periodic", [False, True])
def test_tables_match_scipy_cubic_spline(periodic):
    rng = np.random.default_rng(0)
    x = np.linspace(-1.0, 2.0, 31)
    y = rng.normal(size=31)
    if periodic:
        y[-1] = y[0]
        d2 = periodic_spline_second_derivatives(y, x[1] - x[0])
    else:
        d2 = natural_spline_second_derivatives(y, x[1] - x[0])
    ref = CubicSpline(x, y, bc_type="periodic" if periodic else "natural")
    assert np.allclose(d2, ref(x, 2), atol=1e-10)
    t = rng.uniform(-1.0, 2.0, 200)
    args = (torch.zeros(200, dtype=torch.int64), torch.tensor(y[None]), torch.tensor(d2[None]),
            torch.tensor([-1.0]), torch.tensor([x[1] - x[0]]), torch.tensor([31]), periodic)
    got = evaluate_tables(torch.tensor(t[None]), *args)[0].numpy()
    assert np.abs(got - ref(t)).max() < 1e-12
    out = evaluate_tables(torch.tensor([[-1.5, 2.5]]), torch.zeros(2, dtype=torch.int64), *args[1:])[0].numpy()
    if periodic:  # wrapped by the period 3
        assert np.allclose(out, ref(np.array([1.5, -0.5])), atol=1e-12)
    else:  # OpenMM tabulated functions are zero outside their range
        assert np.all(out == 0.0)


# ------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("platform,dtype,tol", [("Reference", torch.float64, 1e-6), ("CPU", torch.float32, 1e-4)])
def test_native_export_matches_torch(system, platform, dtype, tol):
    top, pos = system
    model = create_model("spline", top, **spline_config()).to(dtype)
    e, f = energy_and_forces(model, pos, TRICLINIC_BOX)
    e_mm, f_mm = openmm_state(model.native_forces(), pos, TRICLINIC_BOX, platform)
    assert np.linalg.norm(f_mm - f) / np.linalg.norm(f) <= tol
    assert abs(e_mm - e) <= tol * abs(e)


def test_torchforce_matches_torch(system):
    import openmmtorch

    top, pos = system
    model = create_model("spline", top, **spline_config()).double()
    e, f = energy_and_forces(model, pos, TRICLINIC_BOX)
    tf = openmmtorch.TorchForce(torch.jit.script(model))
    tf.setUsesPeriodicBoundaryConditions(True)
    # No XML round trip here: openmmtorch 1.5 cannot deserialize a TorchForce built from a module object.
    e_t, f_t = openmm_state([tf], pos, TRICLINIC_BOX, "Reference", round_trip=False)
    assert np.linalg.norm(f_t - f) / np.linalg.norm(f) <= 1e-10
    assert abs(e_t - e) <= 1e-10 * abs(e)


def test_nonperiodic_export(system):
    top, pos = system
    model = create_model("spline", top, **spline_config(periodic=False)).double()
    e, f = energy_and_forces(model, pos, None)
    e_mm, f_mm = openmm_state(model.native_forces(), pos, None, "Reference")
    assert np.linalg.norm(f_mm - f) / np.linalg.norm(f) <= 1e-6
    assert all(not x.usesPeriodicBoundaryConditions() for x in model.native_forces())


def test_finite_differences_and_invariances(system):
    top, pos = system
    model = create_model("spline", top, **spline_config()).double()
    e0, f0 = energy_and_forces(model, pos, TRICLINIC_BOX)
    rng = np.random.default_rng(1)
    h = 1e-6

    def energy(p):
        return energy_and_forces(model, p, TRICLINIC_BOX)[0]

    for _ in range(6):
        i, d = rng.integers(top.n_beads), rng.integers(3)
        p1, p2 = pos.copy(), pos.copy()
        p1[i, d] += h
        p2[i, d] -= h
        fd = -(energy(p1) - energy(p2)) / (2 * h)
        assert abs(fd - f0[i, d]) <= 1e-6 * np.abs(f0).max()
    shifted = pos + rng.integers(-2, 3, size=(top.n_beads, 3)) @ TRICLINIC_BOX
    e1, f1 = energy_and_forces(model, shifted, TRICLINIC_BOX)
    assert abs(e1 - e0) <= 1e-10 * abs(e0) and np.linalg.norm(f1 - f0) <= 1e-10 * np.linalg.norm(f0)
    free = create_model("spline", top, **spline_config(periodic=False)).double()
    e0, f0 = energy_and_forces(free, pos, None)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    e1, f1 = energy_and_forces(free, pos @ q.T + [0.3, 1.0, -2.0], None)
    assert abs(e1 - e0) <= 1e-10 * abs(e0) and np.linalg.norm(f1 - f0 @ q.T) <= 1e-10 * np.linalg.norm(f0)


def test_dihedral_damping_exports_and_straight_angle(system):
    """Damped dihedrals (dihedral_damping = 150 degrees, so some random-chain angles are in the damped range):
    native OpenMM export = torch model (||dF||/||F|| <= 1e-6, Reference, float64; energies 1e-6 relative),
    forces = finite differences (1e-6 of the largest force). At a nearly straight angle pi - eps of a 4-bead
    chain the undamped dihedral force grows as 1/eps (observed 8.4e2 and 8.4e4 kJ/mol/nm at eps = 1e-2 and
    1e-4) while the damped one vanishes as eps^2 (0.14 and 1.5e-5 kJ/mol/nm; asserted < 1e-3 and a 100-fold
    drop)."""
    from enpcg.topology import CGTopology

    top, pos = system
    cfg = {**spline_config(), "dihedral_damping": float(np.radians(150.0))}
    model = create_model("spline", top, **cfg).double()
    angles = np.degrees([np.arccos(np.clip(np.dot(pos[i] - pos[j], pos[k] - pos[j]) / np.linalg.norm(pos[i] - pos[j])
                                           / np.linalg.norm(pos[k] - pos[j]), -1, 1)) for i, j, k in top.angles])
    assert (angles > 150.0).any()  # (minimum image is not needed: bonded beads were placed next to each other)
    e, f = energy_and_forces(model, pos, TRICLINIC_BOX)
    e_mm, f_mm = openmm_state(model.native_forces(), pos, TRICLINIC_BOX, "Reference")
    assert np.linalg.norm(f_mm - f) / np.linalg.norm(f) <= 1e-6 and abs(e_mm - e) <= 1e-6 * abs(e)
    rng = np.random.default_rng(3)
    h = 1e-6
    for _ in range(6):
        i, d = rng.integers(top.n_beads), rng.integers(3)
        p1, p2 = pos.copy(), pos.copy()
        p1[i, d] += h
        p2[i, d] -= h
        fd = -(energy_and_forces(model, p1, TRICLINIC_BOX)[0] - energy_and_forces(model, p2, TRICLINIC_BOX)[0]) / (2 * h)
        assert abs(fd - f[i, d]) <= 1e-6 * np.abs(f).max()
    # One chain A-B-A-B, dihedral table only (phi-dependent), angle (p1, p2, p3) = pi - eps.
    chain = CGTopology(["A1", "B2", "A3", "B4"], ["A", "B", "A", "B"], np.full(4, 50.0), np.zeros(4, dtype=int),
                       [(0, 1), (1, 2), (2, 3)], [(0, 1, 2), (1, 2, 3)], [(0, 1, 2, 3)], exclusion_bonds=3)
    flat = {"min": 0.0, "max": np.pi, "values": np.zeros(91)}
    base = dict(periodic=False, cutoff=RC, pairs={}, bonds={"A-B": {"min": 0.0, "max": 1.0, "values": np.zeros(11)}},
                angles={"A-B-A": flat, "B-A-B": flat}, dihedrals=spline_config()["dihedrals"])
    peak = {}
    for damping in (None, float(np.radians(150.0))):
        m = create_model("spline", chain, **base, dihedral_damping=damping).double()
        for eps in (1e-2, 1e-4):
            x = np.array([[0.4 * np.sin(eps), -0.4 * np.cos(eps), 0.0], [0.0, 0.0, 0.0], [0.0, 0.4, 0.0],
                          [0.3, 0.6, 0.25]])
            peak[(damping, eps)] = np.abs(energy_and_forces(m, x, None)[1]).max()
    print("largest force at pi - eps (kJ/mol/nm)", peak)
    assert peak[(None, 1e-4)] > 1e3 and peak[(None, 1e-4)] > 50 * peak[(None, 1e-2)]
    damped = float(np.radians(150.0))
    assert peak[(damped, 1e-4)] < 1e-3 and peak[(damped, 1e-4)] < 1e-2 * peak[(damped, 1e-2)]


def test_pair_energy_is_zero_beyond_cutoff_and_files(system, tmp_path):
    top, pos = system
    model = create_model("spline", top, **spline_config()).double()
    f = model.table_function("pairs", "A-B")
    assert f(RC) == 0.0 and f(RC + 0.01) == 0.0
    r = np.linspace(0.3, 0.85, 50)
    assert np.abs(f(r) - (lj(r, 2.0, 0.42) - lj(RC, 2.0, 0.42))).max() < 1e-2
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m", dtype=torch.float32)
    e64 = energy_and_forces(model, pos, TRICLINIC_BOX)[0]
    assert abs(energy_and_forces(again, pos, TRICLINIC_BOX)[0] - e64) <= 1e-5 * abs(e64)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    assert abs(float(loaded(torch.tensor(pos), torch.tensor(TRICLINIC_BOX))) - e64) <= 1e-12 * abs(e64)


def test_bad_tables_are_named(system):
    top, _ = system
    cfg = spline_config()
    cfg["dihedrals"]["A-B-A-B"]["values"] = cfg["dihedrals"]["A-B-A-B"]["values"][:-1]
    with pytest.raises(EnpcgError, match="A-B-A-B"):
        create_model("spline", top, **cfg)
    cfg = spline_config()
    del cfg["angles"]["B-A-B"]
    with pytest.raises(EnpcgError, match="B-A-B"):
        create_model("spline", top, **cfg)


# ------------------------------------------------------------------------------------------- MS-CG
@pytest.fixture(scope="module")
def lj_dimers():
    return make_known_answer_data("lj_dimers", n_frames=1000, noise=2.0, seed=0, stride=10, equilibration=2000)


def sample_weights(data, family, x, frames=30):
    """Histogram of the sampled coordinate (bond length or non-excluded pair distance) at x (nm)."""
    pos = torch.tensor(data.positions[:frames])
    box = torch.tensor(data.box[:frames])
    if family == "bonds":
        r = bond_lengths(pos, torch.tensor(data.topology.bonds), box)
    else:
        pairs = all_pairs(data.topology.n_beads, torch.tensor(data.topology.excluded_pairs()))
        r = norm(pair_vectors(pos, pairs[:, 0], pairs[:, 1], box))
    r = r.numpy().ravel()
    counts, edges = np.histogram(r, bins=len(x) - 1, range=(x[0], x[-1]))
    return np.append(counts, counts[-1]).astype(float)


def test_mscg_recovers_known_potential_from_noisy_forces(lj_dimers):
    from enpcg.fitting import fit_spline

    data = lj_dimers
    p, kT = data.params, data.kT
    # Noise of twice the RMS force: a little more smoothing than the default ridge (its bias on epsilon is
    # below 0.2 % on noise-free data, and it halves the variance of the fitted curves).
    model = fit_spline(data.positions, data.forces, data.box, data.topology, cutoff=p["cutoff"], pair_knots=40,
                       ridge=1e-4, temperature=data.temperature, progress=False)
    info = model.fit_info["tables"]
    # Harmonic fit to the bond table over the sampled range, weighted by the sampled bond lengths.
    b = info["bonds:A-A"]
    rb = np.linspace(b["sampled_min"], b["sampled_max"], 101)
    w = sample_weights(data, "bonds", rb)
    ok = w > 0
    (k, r0, _), _ = curve_fit(lambda r, k, r0, c: 0.5 * k * (r - r0) ** 2 + c, rb[ok],
                              model.table_function("bonds", "A-A")(rb[ok]), p0=[1000.0, rb.mean(), 0.0],
                              sigma=1 / np.sqrt(w[ok]))
    assert abs(k / p["bond_k"] - 1) < 0.03
    assert abs(r0 - p["bond_r0"]) < 0.1 * np.sqrt(kT / p["bond_k"])
    # LJ force law fitted to the pair table's force over the sampled range, weighted by the pair counts; the
    # last 0.1 nm is left out because the spline's force goes to zero at the cutoff while the cut-and-shifted
    # LJ force jumps there (by 0.8 kJ/mol/nm).
    rp = np.linspace(info["pairs:A-A"]["sampled_min"], p["cutoff"] - 0.1, 201)
    w = sample_weights(data, "pairs", rp)
    ok = w > 0
    table = model.table_function("pairs", "A-A")
    force = -(table(rp[ok] + 1e-6) - table(rp[ok] - 1e-6)) / 2e-6
    (eps, sig), _ = curve_fit(lj_force, rp[ok], force, p0=[1.0, 0.3], sigma=1 / np.sqrt(w[ok]))
    assert abs(eps / p["epsilon"] - 1) < 0.03
    assert abs(sig - p["sigma"]) < 0.005
    # With noise of twice the RMS force, the residual against the noisy forces is close to 2/sqrt(5).
    assert model.fit_info["force_residual"] == pytest.approx(2 / np.sqrt(5), abs=0.02)


def test_mscg_reproduces_noise_free_forces(lj_dimers):
    from enpcg.fitting import fit_spline

    data = lj_dimers
    model = fit_spline(data.positions[:150], data.forces_exact[:150], data.box[:150], data.topology,
                       cutoff=data.params["cutoff"], pair_knots=40, progress=False)
    assert model.fit_info["force_residual"] < 0.02
    # The tabulated model (natural-spline interpolation of the fitted B-splines) on unseen frames.
    x = torch.tensor(data.positions[-10:])
    _, f = batch_forces(model, x, torch.tensor(data.box[-10:]))
    ref = data.forces_exact[-10:]
    assert np.linalg.norm(f.numpy() - ref) / np.linalg.norm(ref) < 0.02


def test_dense_and_cell_list_pair_search_agree(lj_dimers):
    from enpcg.fitting import fit_spline

    data = lj_dimers
    args = (data.positions[:20], data.forces[:20], data.box[:20], data.topology)
    fast = fit_spline(*args, cutoff=data.params["cutoff"], pair_search="vesin", progress=False)
    slow = fit_spline(*args, cutoff=data.params["cutoff"], pair_search="dense", progress=False)
    assert fast.fit_info["pair_search"] == "vesin" and slow.fit_info["pair_search"] == "dense"
    for name in ("pairs_values", "bonds_values"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert torch.allclose(a, b, rtol=0, atol=1e-9 * float(a.abs().max()))


def test_mscg_bonded_splines_on_ideal_chains():
    from enpcg.fitting import fit_spline

    data = make_known_answer_data("ideal_chains", n_frames=100, noise=0.0, seed=1, platform="Reference")
    p = data.params
    model = fit_spline(data.positions, data.forces_exact, None, data.topology, cutoff=1.0, progress=False,
                       temperature=data.temperature)
    assert model.fit_info["force_residual"] < 0.01
    info = model.fit_info["tables"]
    a = info["angles:C-C-C"]
    th = np.linspace(a["sampled_min"], a["sampled_max"], 50)
    diff = model.table_function("angles", "C-C-C")(th) - 0.5 * p["angle_k"] * (th - p["theta0"]) ** 2
    assert np.ptp(diff) < 0.02 * np.ptp(0.5 * p["angle_k"] * (th - p["theta0"]) ** 2)
    phi = np.linspace(-np.pi, np.pi, 73)
    true = sum(k * (1 + np.cos((n + 1) * phi - d)) for n, (k, d) in enumerate(zip(p["torsion_k"], p["torsion_delta"])))
    diff = model.table_function("dihedrals", "C-C-C-C")(phi) - true
    assert np.ptp(diff) < 0.02 * np.ptp(true)


def test_fit_spline_rejects_bad_input(lj_dimers):
    from enpcg.fitting import fit_spline

    data = lj_dimers
    with pytest.raises(EnpcgError, match="forces"):
        fit_spline(data.positions[:2], data.forces[:3], data.box[:2], data.topology, cutoff=0.8)
    with pytest.raises(EnpcgError, match="cutoff"):
        fit_spline(data.positions[:2], data.forces[:2], data.box[:2], data.topology, cutoff=5.0)
