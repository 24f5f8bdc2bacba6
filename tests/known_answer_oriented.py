"""Known-answer data of oriented beads: uniaxial Gay–Berne ellipsoids sampled with OpenMM's own
``GayBerneForce`` (an implementation independent of :mod:`enpcg.oriented.gay_berne`).

Units: nm, ps, kJ/mol, amu, K; forces kJ/mol/nm; torques kJ/mol.

Each ellipsoid is two OpenMM particles: its centre (mass ``CENTRE_MASS``), which carries the Gay–Berne
parameters, and an axis particle (mass ``AXIS_MASS``) at ``AXIS_DISTANCE`` from it, held there by a
constraint, that sets the ellipsoid's x (symmetry) axis (``GayBerneForce.addParticle(sigma, epsilon,
xparticle, yparticle=-1, sx, sy, sz, ex, ey, ez)``; yparticle = -1 is allowed because sy = sz, ey = ez).
The axis particle is added with epsilon = 0, which OpenMM skips in every pair, so it has no interactions
of its own. The CG bead is the centre; its mass in the topology is the total CENTRE_MASS + AXIS_MASS.

Exact CG quantities per ellipsoid (kJ/mol/nm and kJ/mol):

* force F = f_centre + f_axis from a double-precision Reference context. This is the exact translational
  force: OpenMM turns its torque into equal and opposite forces on the axis particle and the centre, so
  they cancel in the sum.
* torque tau = -dE/dtheta from fourth-order central finite differences of OpenMM's (Reference) energy:
  the axis particle is rotated about the centre by +-h and +-2h (h = ``FD_STEP`` rad) about the two body
  axes perpendicular to the symmetry axis. The component along the symmetry axis is zero for a uniaxial
  body. We do NOT use (r_axis - r_centre) x f_axis: OpenMM 8.6.1's analytic GayBerneForce torque (Reference
  and CPU platforms) is not the gradient of its own energy when e_par != e_perp. Its chi-term torque lacks
  the factor 2 sqrt(chi_12) that comes from d(chi)/dq = 2 sqrt(chi) d(2 r^T B^-1 r)/dq; this is checked in
  tests/test_gay_berne.py. (Constraint forces, which act along the centre–axis line, would not change the
  torque anyway, and OpenMM's forces leave them out.)

Sampling: Langevin MD (LangevinMiddleIntegrator, 8 fs, friction 1/ps; Reference platform, which is faster
than CPU for 128 particles) driven by OpenMM's GayBerneForce forces.
Because of the torque defect above, these dynamics are not exactly conservative when e_par != e_perp. The
frames therefore come from a steady state close to, but not exactly, Boltzmann at ``temperature``. The
returned forces and torques are still exact gradients at every frame, so force/torque matching recovers
``params`` exactly in the noise-free limit. Do not use these frames for tests that need exact Boltzmann
statistics. Start: spheres (s_par = s_perp) on a cubic lattice, grown to the target s_par in stages
(``updateParametersInContext``), so the ellipsoids never overlap badly.
"""
from __future__ import annotations

import functools

import numpy as np

from enpcg.oriented.frames import director_frame, rotation_about
from enpcg.topology import CGTopology


GB_DEFAULTS = {"sigma": 0.4, "epsilon": 3.0, "s_par": 1.2, "s_perp": 0.4, "e_par": 0.2, "e_perp": 1.0,
               "cutoff": 1.4, "switch_distance": 1.2, "periodic": True}
CENTRE_MASS = 60.0   # amu
AXIS_MASS = 40.0     # amu
AXIS_DISTANCE = 0.3  # nm, centre - axis particle constraint length
FD_STEP = 2e-4       # rad, finite-difference rotation step for the exact torques


def _gay_berne_system(n: int, p: dict, box: np.ndarray | None):
    """OpenMM System of n ellipsoids: particles 2k (centre) and 2k + 1 (axis particle); GayBerneForce is
    force 0."""
    import openmm

    system = openmm.System()
    gb = openmm.GayBerneForce()
    if p["periodic"]:
        gb.setNonbondedMethod(openmm.GayBerneForce.CutoffPeriodic)
    elif p["cutoff"] is not None:
        gb.setNonbondedMethod(openmm.GayBerneForce.CutoffNonPeriodic)
    else:
        gb.setNonbondedMethod(openmm.GayBerneForce.NoCutoff)
    if p["cutoff"] is not None:
        gb.setCutoffDistance(p["cutoff"])
    if p["switch_distance"] is not None:
        gb.setUseSwitchingFunction(True)
        gb.setSwitchingDistance(p["switch_distance"])
    for k in range(n):
        system.addParticle(CENTRE_MASS)
        system.addParticle(AXIS_MASS)
        gb.addParticle(p["sigma"], p["epsilon"], 2 * k + 1, -1, p["s_par"], p["s_perp"], p["s_perp"],
                       p["e_par"], p["e_perp"], p["e_perp"])
        gb.addParticle(1.0, 0.0, -1, -1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)  # epsilon 0: no interactions
        system.addConstraint(2 * k, 2 * k + 1, AXIS_DISTANCE)
    system.addForce(gb)
    if box is not None:
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in np.asarray(box, float)])
    return system


def openmm_gay_berne_reference(centres, axis_points, params: dict, box=None, torques: bool = True):
    """Energy (kJ/mol), CG forces (n, 3) kJ/mol/nm, exact torques (n, 3) kJ/mol by finite differences and
    OpenMM's analytic torques (r_axis - r_centre) x f_axis (n, 3) kJ/mol of one configuration, all from
    OpenMM's GayBerneForce on the double-precision Reference platform.

    centres, axis_points : (n, 3) nm (axis point = centre + AXIS_DISTANCE * u is typical, any distance
    works); params : config names of :data:`GB_DEFAULTS`; box : (3, 3) nm rows or None. With
    ``torques=False`` the exact torques are None (they cost 8 energy evaluations per ellipsoid).
    """
    import openmm

    centres = np.asarray(centres, dtype=np.float64)
    axis_points = np.asarray(axis_points, dtype=np.float64)
    n = len(centres)
    p = {**GB_DEFAULTS, **params}
    system = _gay_berne_system(n, p, box if p["periodic"] else None)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    if p["periodic"]:
        ctx.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in np.asarray(box, float)])
    pos = np.empty((2 * n, 3))
    pos[0::2] = centres
    pos[1::2] = axis_points
    ctx.setPositions(pos)
    st = ctx.getState(getEnergy=True, getForces=True)
    energy = st.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
    f = st.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer)
    forces = f[0::2] + f[1::2]
    analytic_torques = np.cross(axis_points - centres, f[1::2])
    exact = _fd_torques(ctx, pos, centres, axis_points) if torques else None
    return energy, forces, exact, analytic_torques


def _fd_torques(ctx, pos, centres, axis_points) -> np.ndarray:
    """tau_k = -dE/dtheta_k (kJ/mol): rotate axis particle k about its centre; 5-point stencil."""
    import openmm

    def energy(x):
        ctx.setPositions(x)
        return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)

    frames = director_frame(centres, axis_points)
    h = FD_STEP
    out = np.zeros((len(centres), 3))
    for k in range(len(centres)):
        arm = axis_points[k] - centres[k]
        for b in (1, 2):
            n_axis = frames[k][:, b]
            e = {}
            for m in (-2, -1, 1, 2):
                x = pos.copy()
                x[2 * k + 1] = centres[k] + rotation_about(n_axis, m * h) @ arm
                e[m] = energy(x)
            dedtheta = (e[-2] - 8.0 * e[-1] + 8.0 * e[1] - e[2]) / (12.0 * h)
            out[k] -= dedtheta * n_axis
    ctx.setPositions(pos)
    return out


def gay_berne_data(n_beads: int = 64, n_frames: int = 40, params: dict | None = None, temperature: float = 300.0,
                   density: float = 2.9, noise: float = 0.1, seed: int = 0, interval_steps: int = 400) -> dict:
    """Gay–Berne known-answer data sampled with OpenMM's GayBerneForce (see the module docstring).

    n_beads : ellipsoids; n_frames : frames; params : overrides of :data:`GB_DEFAULTS` (our model's config
    names: sigma, s_par, s_perp, cutoff, switch_distance nm; epsilon kJ/mol; e_par, e_perp dimensionless;
    periodic must be True); temperature : K; density : ellipsoids per nm^3 (cubic box, its edge must be at
    least twice the cutoff); noise : Gaussian noise standard deviation, in units of the RMS exact
    component, added separately to forces and torques; interval_steps : MD steps (8 fs) between frames
    (400 steps = 3.2 ps; the orientational P2 correlation of successive frames is about 0.2 by default).

    Defaults: aspect ratio s_par/s_perp = 3, e_par/e_perp = 0.2 (side-by-side 5x stronger than
    end-to-end), 300 K, 2.9 ellipsoids/nm^3 (packing fraction 0.29; cubic box 2.80 nm), cutoff 1.4 nm with
    OpenMM switching from 1.2 nm.

    Returns a dict: positions (F, n, 3) nm (centres, unwrapped); axes (F, n, 3, 3) (director frames, e_x
    along the symmetry axis, columns); forces_exact (F, n, 3) kJ/mol/nm; torques_exact (F, n, 3) kJ/mol;
    forces, torques (noisy); noise_sigma_forces (kJ/mol/nm), noise_sigma_torques (kJ/mol); energies (F,)
    kJ/mol; box (F, 3, 3) nm; topology (CGTopology: n beads of type "GB", one molecule each, orientations
    "director", masses amu); params (true parameters, our config names); temperature (K). Arrays are
    read-only; the data are cached per argument set.
    """
    key = tuple(sorted((params or {}).items()))
    out = dict(_gay_berne_data(int(n_beads), int(n_frames), key, float(temperature), float(density),
                                float(noise), int(seed), int(interval_steps)))
    out["params"] = dict(out["params"])
    return out


@functools.lru_cache(maxsize=4)
def _gay_berne_data(n, n_frames, params_key, temperature, density, noise, seed, interval_steps):
    import openmm

    p = {**GB_DEFAULTS, **dict(params_key)}
    unknown = set(p) - set(GB_DEFAULTS)
    if unknown:
        raise ValueError(f"gay_berne_data: unknown params {sorted(unknown)}; allowed: {sorted(GB_DEFAULTS)}")
    if not p["periodic"]:
        raise ValueError("gay_berne_data samples a periodic fluid; periodic must be True")
    edge = (n / density) ** (1.0 / 3.0)
    if edge < 2.0 * p["cutoff"]:
        raise ValueError(f"gay_berne_data: box edge {edge:.3f} nm (n={n}, density={density}/nm^3) is below twice "
                         f"the cutoff {p['cutoff']} nm; use more beads, a lower density or a shorter cutoff")
    box = np.eye(3) * edge
    rng = np.random.default_rng(seed)

    # Start: a simple cubic lattice of spheres (s_par = s_perp) with random axes; then grow s_par.
    m = int(np.ceil(n ** (1.0 / 3.0)))
    grid = (np.arange(m) + 0.5) * edge / m
    sites = np.array(np.meshgrid(grid, grid, grid, indexing="ij")).reshape(3, -1).T[:n]
    u = rng.normal(size=(n, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    pos = np.empty((2 * n, 3))
    pos[0::2] = sites
    pos[1::2] = sites + AXIS_DISTANCE * u

    system = _gay_berne_system(n, {**p, "s_par": p["s_perp"]}, box)  # spheres first (no overlaps)
    gb = system.getForce(0)
    timestep = 0.008  # ps
    integrator = openmm.LangevinMiddleIntegrator(temperature, 1.0, timestep)
    integrator.setRandomNumberSeed(seed + 1)
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(pos)
    ctx.setVelocitiesToTemperature(temperature, seed + 2)
    n_stages = 16
    for stage in range(n_stages + 1):
        s_par = p["s_perp"] + (p["s_par"] - p["s_perp"]) * stage / n_stages
        for k in range(n):
            gb.setParticleParameters(2 * k, p["sigma"], p["epsilon"], 2 * k + 1, -1, s_par, p["s_perp"],
                                     p["s_perp"], p["e_par"], p["e_perp"], p["e_perp"])
        gb.updateParametersInContext(ctx)
        integrator.step(100)
    integrator.step(2000)

    xs = np.zeros((n_frames, 2 * n, 3))
    for f in range(n_frames):
        integrator.step(interval_steps)
        xs[f] = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(openmm.unit.nanometer)

    centres = xs[:, 0::2]
    axis_points = xs[:, 1::2]
    energies = np.zeros(n_frames)
    forces = np.zeros((n_frames, n, 3))
    torques = np.zeros((n_frames, n, 3))
    for f in range(n_frames):
        energies[f], forces[f], torques[f], _ = openmm_gay_berne_reference(centres[f], axis_points[f], p, box)
    axes = director_frame(centres, axis_points)

    sig_f = noise * float(np.sqrt(np.mean(forces ** 2)))
    sig_t = noise * float(np.sqrt(np.mean(torques ** 2)))
    noisy_f = forces + sig_f * rng.normal(size=forces.shape)
    noisy_t = torques + sig_t * rng.normal(size=torques.shape)
    boxes = np.broadcast_to(box, (n_frames, 3, 3)).copy()
    top = CGTopology(bead_names=[f"E{k}" for k in range(n)], bead_types=["GB"] * n,
                     masses=[CENTRE_MASS + AXIS_MASS] * n, molecule_index=list(range(n)),
                     residue_names=["GB"] * n, orientations=["director"] * n)
    out = {"positions": centres, "axes": axes, "forces_exact": forces, "torques_exact": torques,
           "forces": noisy_f, "torques": noisy_t, "noise_sigma_forces": sig_f, "noise_sigma_torques": sig_t,
           "energies": energies, "box": boxes}
    for arr in out.values():
        if isinstance(arr, np.ndarray):
            arr.setflags(write=False)
    out.update(topology=top, params=dict(p), temperature=temperature)
    return out
