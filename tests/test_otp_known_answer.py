"""Known answer 2: the rigid Lewis–Wahnström ortho-terphenyl (OTP) liquid, one oriented bead (a full frame) per
molecule, is represented EXACTLY by a ``rigid_sites`` CG model; force-and-torque matching from perturbed
parameters recovers it.

Units: nm, ps, kJ/mol, amu, K; forces kJ/mol/nm; torques kJ/mol. Force and torque sets are compared as
relative RMS errors ||d|| / ||ref|| over all beads and frames (:func:`enpcg.oriented.fit.oriented_errors`).

Data: 64 molecules at 346 K and 1.09 g/cm^3 (:func:`systems.otp.build_liquid`, 10 ps of equilibration), then
40 frames, 200 steps of 5 fs apart, sampled with OpenMM's Reference platform (double precision; the CPU
platform's single-precision forces leave ~5e-6 relative noise in the mapped forces), mapped with
``systems/mappings/otp_frame.yaml`` (frame [0, 2, 1]) to bead forces and torques about the centre of mass.

Constraints: each molecule is held rigid by three distance constraints, and OpenMM's ``getForces`` leaves the
constraint forces out (hence ``allow_constraints=True``). For a whole rigid molecule mapped to one bead this
loses nothing: the constraint forces are internal, equal and opposite along the site-site lines, so they
cancel in the bead's net force and in its net torque about the centre of mass. The mapped forces and
torques are therefore the exact net LJ force and torque on each molecule, i.e. exact gradients of a
rigid-site energy; :func:`test_mapped_data_are_the_site_site_lj_sums` checks that against an independent
numpy sum.

Periodic images: the box (2.82 nm) is narrower than 2 (r_c + 2 a) = 3.68 nm (a = 0.32 nm, the largest site
arm), so two molecules whose centres are at the minimum image can have a site pair that interacts through
a different image. OpenMM takes the minimum image per site pair; an exact site model must do the same
(a model that images only the centre-centre vector misses ~1% of the force in this liquid).
"""
import numpy as np
import pytest

from enpcg.h5md import read_h5md
from enpcg.mapping import load_mapping, map_trajectory
from enpcg.models import create_model, load_model, save_model
from enpcg.oriented.data import read_oriented
from enpcg.oriented.fit import fit_oriented, mean_body_coordinates, oriented_errors
from openmm_plugin.sampling import sample
from systems import otp

N_MOLECULES = 64
TEMPERATURE = 346.0  # K
N_FRAMES = 40
N_TRAIN = 30          # frames 0..29 fit, frames 30..39 held out
SEED = 3
SITE_MODEL = dict(cutoff=otp.CUTOFF, switch_distance=otp.SWITCH_DISTANCE, periodic=True)


@pytest.fixture(scope="module")
def otp_run(tmp_path_factory):
    """Atomistic frames and their mapped oriented CG data (sampled once for the module)."""
    d = tmp_path_factory.mktemp("otp_known_answer")
    liq = otp.build_liquid(N_MOLECULES, temperature=TEMPERATURE, density=1.09, seed=SEED, equilibration_ps=10.0)
    aa = sample(liq.system, liq.topology, liq.positions, d / "aa.h5", n_frames=N_FRAMES, interval_steps=200,
                temperature=TEMPERATURE, timestep=0.005, friction=1.0, seed=SEED, equilibration_steps=0,
                progress=False, box=liq.box, allow_constraints=True, platform="Reference")
    mapping = load_mapping(otp.MAPPING, n_atoms=3 * N_MOLECULES, masses=liq.masses)
    cg = map_trajectory(mapping, aa, d / "cg.h5", progress=False)
    frames = read_h5md(aa)
    data = read_oriented(cg)
    sites = mean_body_coordinates(mapping, frames.positions, frames.box)
    return {"dir": d, "frames": frames, "data": data, "sites": sites, "mapping": mapping}


def _lj_site_forces(x, box_length):
    """Per-site switched-LJ forces (n_sites, 3) kJ/mol/nm of one frame, intermolecular pairs only, minimum
    image per SITE pair (numpy, independent of enpcg). Also returns how many interacting site pairs use an
    image other than the minimum image of their molecules' centres."""
    n = len(x)
    mol = np.arange(n) // 3
    com = x.reshape(-1, 3, 3).mean(axis=1)  # equal site masses
    f = np.zeros_like(x)
    cross_image = 0
    for i in range(n):
        d = x - x[i]
        img = np.round(d / box_length)
        d = d - box_length * img
        dc = com - com[mol[i]]
        img_c = np.round(dc / box_length)[mol]
        r = np.linalg.norm(d, axis=1)
        m = (mol != mol[i]) & (r < otp.CUTOFF)
        cross_image += int(np.sum(np.any(img[m] != img_c[m], axis=1)))
        rr = r[m]
        s6 = (otp.SIGMA / rr) ** 6
        e = 4 * otp.EPSILON * (s6 * s6 - s6)
        de = 4 * otp.EPSILON * (-12 * s6 * s6 + 6 * s6) / rr
        t = np.clip((rr - otp.SWITCH_DISTANCE) / (otp.CUTOFF - otp.SWITCH_DISTANCE), 0.0, 1.0)
        s = 1 - 6 * t**5 + 15 * t**4 - 10 * t**3
        ds = (-30 * t**4 + 60 * t**3 - 30 * t**2) / (otp.CUTOFF - otp.SWITCH_DISTANCE)
        f[i] = np.sum(((de * s + e * ds) / rr)[:, None] * d[m], axis=0)
    return f, cross_image // 2


def test_mapped_data_are_the_site_site_lj_sums(otp_run):
    """The mapped bead forces and torques of two frames equal the net switched-LJ force and torque about the
    centre of mass from a numpy site-site sum (no constraint forces): relative error <= 1e-10 (observed
    ~2e-15, double precision throughout). The frames contain site pairs that interact through another image
    than their molecules' centres (the case a centre-imaged site model gets wrong)."""
    frames, data = otp_run["frames"], otp_run["data"]
    L = frames.box[0, 0, 0]
    np.testing.assert_allclose(frames.box[0], L * np.eye(3), atol=0)
    assert otp.CUTOFF <= 0.5 * L < otp.CUTOFF + 2 * np.linalg.norm(otp.site_coordinates(), axis=1).max()
    n_cross = 0
    for k in (0, N_FRAMES - 1):
        x = frames.positions[k]
        f, c = _lj_site_forces(x, L)
        n_cross += c
        xm = x.reshape(N_MOLECULES, 3, 3)
        fm = f.reshape(N_MOLECULES, 3, 3)
        com = xm.mean(axis=1)
        force = fm.sum(axis=1)
        torque = np.cross(xm - com[:, None], fm).sum(axis=1)
        assert np.linalg.norm(force - data.forces[k]) <= 1e-10 * np.linalg.norm(data.forces[k])
        assert np.linalg.norm(torque - data.torques[k]) <= 1e-10 * np.linalg.norm(data.torques[k])
        np.testing.assert_allclose(data.positions[k], com, atol=1e-12)  # bead = molecule centre of mass
    assert n_cross >= 20  # observed ~120 such site pairs per frame


def test_true_rigid_site_model_reproduces_mapped_forces_and_torques(otp_run):
    """rigid_sites with the true parameters (sigma, epsilon, cutoff, switch of systems.otp and the mapped
    mean site offsets) reproduces all 40 frames: force, torque and energy-fluctuation relative errors
    <= 1e-6 (observed 6e-8 with float64 parameters). The residual is the non-rigidity allowed by the
    integrator's constraint tolerance (side lengths 0.483 nm + 1e-8 nm): the model's sites are one fixed
    set of body offsets."""
    data, sites = otp_run["data"], otp_run["sites"]
    # the mapped body frame is the frame of site_coordinates(); offsets agree to the constraint tolerance
    assert np.abs(sites - otp.site_coordinates()).max() < 1e-7  # nm
    model = create_model("rigid_sites", data.topology, sites=sites, sigma=otp.SIGMA, epsilon=otp.EPSILON,
                         fit=(), **SITE_MODEL)
    err = oriented_errors(model, data)
    assert err["force"] <= 1e-6, err
    assert err["torque"] <= 1e-6, err
    assert data.energies is not None and err["energy"] <= 1e-6, err
    # every parameter in float64 (enpcg's default dtype): float32 log sigma / log epsilon round sigma by
    # 1e-8 nm (2.5e-7 relative force error instead of 6e-8), and save_model then records the model as
    # float32, so load_model rounds the site offsets too
    assert {k: str(v.dtype) for k, v in model.state_dict().items()} == dict.fromkeys(model.state_dict(),
                                                                                     "torch.float64")
    # the data are far from trivial: typical bead force ~390 kJ/mol/nm and torque ~100 kJ/mol
    assert np.sqrt(np.mean(np.sum(data.forces**2, -1))) > 100.0
    assert np.sqrt(np.mean(np.sum(data.torques**2, -1))) > 30.0


def test_fit_from_perturbed_parameters_recovers_the_known_answer(otp_run, tmp_path):
    """Start: sigma +8%, epsilon -25%, site offsets x0.9 (held-out force and torque errors ~1.6 and ~1.4).
    Fit sites, sigma and epsilon by force-and-torque matching on frames 0..29 with fit_oriented's full-batch
    L-BFGS (4 epochs of up to 20 iterations; converged after 3). On the held-out frames 30..39 the forces
    and torques agree within 1e-5 relative RMS, sigma and epsilon within 1e-5 relative and the site
    offsets within 1e-6 nm of the truth (the task asks for 2%). Observed over 8 independently sampled
    liquids: forces and torques <= 4e-8 with float64 parameters (below the true model's 6e-8: the fit
    absorbs the systematic 1e-8 nm constraint offset of the sides), <= 2.7e-7 with float32 log sigma and
    log epsilon; sigma and epsilon within 4e-7, sites within 5e-9 nm; 15-35 s.

    Why L-BFGS, not Adam: the liquid samples mostly the repulsive wall, so the forces fix roughly
    epsilon * sigma^16 tightly and epsilon alone weakly; the weakest direction of the force/torque Jacobian
    is (log sigma, log epsilon) = (0.062, -0.998), its singular value 100x below the next. Adam at lr 1e-2
    (one step size for all parameters) reaches that valley in ~8 epochs (forces 4%, sites within 4e-4 nm,
    but sigma +2.2% and epsilon -29%) and then creeps along it (~1200 steps to reach epsilon -12%);
    alternating Adam runs on (sigma, epsilon) and on everything get within 1% in ~1500 frame evaluations,
    about what L-BFGS needs for an exact answer. The fitted model survives save_model/load_model."""
    data, sites = otp_run["data"], otp_run["sites"]
    train, test = data.select(np.arange(N_TRAIN)), data.select(np.arange(N_TRAIN, N_FRAMES))
    model = create_model("rigid_sites", data.topology, sites=0.9 * sites, sigma=1.08 * otp.SIGMA,
                         epsilon=0.75 * otp.EPSILON, fit=("sites", "sigma", "epsilon"), **SITE_MODEL)
    err0 = oriented_errors(model, test)
    assert err0["force"] > 1.0 and err0["torque"] > 1.0, err0  # the start is far off
    history = fit_oriented(model, train, epochs=4, batch_size=10, val_fraction=0.0, seed=0, optimizer="lbfgs",
                           device="cpu")
    assert history["train_loss"][0] > 1e5 and history["train_loss"][-1] < 1e-4  # (kJ/mol/nm)^2
    err = oriented_errors(model, test)
    params = model.physical_parameters()
    assert err["force"] <= 1e-5, err
    assert err["torque"] <= 1e-5, err
    assert abs(params["sigma"] / otp.SIGMA - 1) <= 1e-5, params["sigma"]
    assert abs(params["epsilon"] / otp.EPSILON - 1) <= 1e-5, params["epsilon"]
    assert np.abs(np.asarray(params["sites"]) - sites).max() <= 1e-6  # nm

    save_model(model, tmp_path / "otp_sites")
    loaded = load_model(tmp_path / "otp_sites")
    assert loaded.physical_parameters() == params
    again = oriented_errors(loaded, test)
    assert abs(again["force"] - err["force"]) <= 1e-12 and abs(again["torque"] - err["torque"]) <= 1e-12
    otp_run["fitted"] = tmp_path / "otp_sites"


def test_fitted_model_runs_in_openmm_and_reports_torques(otp_run, tmp_path):
    """The end of the OTP pipeline: the fitted oriented-bead model (or the true one if the fit test was
    deselected) runs in OpenMM as 3 rigid massive sites per molecule (planar: OTP is flat) with a virtual
    centre, Langevin 5 fs at 346 K from the last mapped frame; the reporter's bead forces and torques equal the
    atomistic mapped ones at the start (the model is exact: 1e-5, the CPU platform's precision) and the model's
    own on the saved frames (1e-6, float64); the bead centres stay whole molecules (virtual site = centre of
    the sites)."""
    import openmm
    from openmm import app

    from enpcg.oriented import forces_and_torques
    from openmm_plugin.oriented import OrientedForceReporter, create_oriented_system

    data = otp_run["data"]
    if "fitted" in otp_run:
        model = load_model(otp_run["fitted"])
    else:
        model = create_model("rigid_sites", data.topology, sites=otp_run["sites"], sigma=otp.SIGMA,
                             epsilon=otp.EPSILON, **SITE_MODEL).double()
    last = data.select([N_FRAMES - 1])
    osys = create_oriented_system(model, last.positions[0], last.axes[0], last.box[0])
    assert osys.layouts["OTP"].kind == "planar"
    integ = openmm.LangevinMiddleIntegrator(TEMPERATURE, 1.0, 0.005)
    integ.setRandomNumberSeed(1)
    sim = app.Simulation(osys.topology, osys.system, integ, openmm.Platform.getPlatformByName("CPU"),
                         {"Threads": "1"})
    sim.context.setPositions(osys.positions)
    sim.context.computeVirtualSites()
    sim.context.setVelocitiesToTemperature(TEMPERATURE, 1)
    rep = OrientedForceReporter(tmp_path / "cg_run.h5", 50, osys)
    rep.report(sim, None)                         # step 0: compare with the atomistic mapped frame
    sim.reporters.append(rep)
    sim.step(200)
    rep.close()
    run = read_oriented(tmp_path / "cg_run.h5")
    assert run.n_frames == 5
    assert np.linalg.norm(run.forces[0] - last.forces[0]) / np.linalg.norm(last.forces[0]) < 1e-5
    assert np.linalg.norm(run.torques[0] - last.torques[0]) / np.linalg.norm(last.torques[0]) < 1e-5
    _, f, t = forces_and_torques(model, run.positions, run.axes, run.box)
    assert np.linalg.norm(run.torques - t) / np.linalg.norm(t) < 1e-6
    assert np.linalg.norm(run.forces - f) / np.linalg.norm(f) < 1e-6
    assert np.all(np.isfinite(run.energies))
