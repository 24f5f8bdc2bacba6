"""Lewis-Wahnstrom ortho-terphenyl (OTP): a rigid three-site glass former, built as an OpenMM System.

Units: nm, ps, kJ/mol, amu, K, g/cm^3. Model (L. J. Lewis and G. Wahnstrom, Phys. Rev. E 50, 3865 (1994)):

* each molecule is three Lennard-Jones sites, one per phenyl ring: sigma = 0.483 nm, epsilon = 5.276 kJ/mol
  (eps/kB = 634.6 K), mass 76.768 amu each (a third of OTP's 230.30 amu);
* the sites form a rigid isosceles triangle: the two sides that meet at the apex (the middle ring) are
  0.483 nm long and the apex angle is 75 deg, so the base (ring A to ring C) is 2 x 0.483 sin(37.5 deg)
  = 0.5881 nm;
* only intermolecular site-site LJ, 4 eps ((sigma/r)^12 - (sigma/r)^6), is counted (the three intramolecular
  pairs are excluded), cut at 1.2 nm with OpenMM's switching function from 1.1 nm,
  S(x) = 1 - 6 x^5 + 15 x^4 - 10 x^3, x = (r - 1.1 nm) / (0.1 nm), multiplying the energy, and NO long-range
  dispersion correction. A CG site model can reproduce this truncation exactly, so the constants are
  exported (``SIGMA, EPSILON, SITE_MASS, SIDE, APEX_ANGLE, CUTOFF, SWITCH_DISTANCE``).

Rigidity: three distance constraints per molecule (0-1, 1-2, 0-2), which OpenMM solves with SETTLE (the
triangle is isosceles with equal masses at the base). OpenMM's ``getForces`` omits constraint forces, but the
CG bead is the whole rigid molecule: constraint forces are internal, equal and opposite along the site-site
lines, so they cancel in the mapped net force and in the net torque about the centre of mass. The mapped
forces and torques of the atomistic data stay exact.

Atom order: molecule-major; per molecule 0 = ring A, 1 = the middle ring (the apex), 2 = ring C (element
carbon, masses set explicitly on the System). Each molecule is one OpenMM chain holding one residue "OTP"
(chain ids cycle A..Z, AA..ZZ as in ``systems.polyethylene``; each chain is one molecule, as VOTCA-style
readers expect). The CG mapping (:data:`MAPPING`) makes each molecule one oriented bead whose body frame
is the frame of :func:`site_coordinates`.

Equilibration (:func:`build_liquid`): minimisation, then Langevin (``LangevinMiddleIntegrator``) at friction
1/ps with a 0.005 ps step (constraint tolerance 1e-8). The sites are heavy and soft (LJ time
sigma sqrt(m/eps) = 1.84 ps), so 0.005 ps is well inside the stable range. Measured in NVE (Verlet, CPU
platform, 64 molecules at 346 K and 1.09 g/cm^3, 10 ps): total-energy drift 2.4e-4 kT per molecule with
0.005 ps (1.3e-3 kT with 0.01 ps); the constrained side lengths hold to 1e-8 nm.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import openmm as mm
from openmm import app, unit

from enpcg.errors import EnpcgError, check_positive
from enpcg.oriented.frames import random_rotations
from systems.polyethylene import (AMU_NM3_TO_G_CM3, KB, PolymerSystem, _chain_id, density_g_cm3, lj_nonbonded,
                                  set_cubic_box,
                                  wrap_chains)

SIGMA = 0.483                       # nm, LJ sigma of every site
EPSILON = 5.276                     # kJ/mol, LJ epsilon of every site
SITE_MASS = 76.768                  # amu, mass of one site (a third of C18H14)
SIDE = 0.483                        # nm, the two sides meeting at the apex (sites 0-1 and 1-2)
APEX_ANGLE = math.radians(75.0)     # rad, angle 0-1-2 at the apex
BASE = 2.0 * SIDE * math.sin(0.5 * APEX_ANGLE)  # nm, side 0-2 (0.58808 nm)
CUTOFF = 1.2                        # nm, LJ cutoff
SWITCH_DISTANCE = 1.1               # nm, OpenMM's switching function acts from here to CUTOFF
TIMESTEP = 0.005                    # ps, Langevin step of build_liquid
FRICTION = 1.0                      # 1/ps
MOLECULE_MASS = 3 * SITE_MASS       # amu
SITES_PER_MOLECULE = 3

MAPPING = Path(__file__).parent / "mappings" / "otp_frame.yaml"


def site_coordinates() -> np.ndarray:
    """Body-frame coordinates (3, 3) nm of sites 0, 1, 2 (rows): origin at the centre of mass, e_x from
    site 0 to site 2, e_y towards the apex site 1, e_z = e_x x e_y (the molecule lies in the xy plane).

    This is the frame the mapping file's ``orientation: {frame: [0, 2, 1]}`` gives each bead, so a molecule's
    sites are ``R @ site_coordinates()[k] + centre of mass`` with R the bead's body axes (columns).
    """
    half_base = SIDE * math.sin(0.5 * APEX_ANGLE)
    height = SIDE * math.cos(0.5 * APEX_ANGLE)
    xyz = np.array([[-half_base, 0.0, 0.0], [0.0, height, 0.0], [half_base, 0.0, 0.0]])
    return xyz - xyz.mean(axis=0)  # equal masses: centre of mass = centroid


def _check_count(n_molecules):
    if isinstance(n_molecules, bool) or not isinstance(n_molecules, (int, np.integer)) or n_molecules < 1:
        raise EnpcgError(f"n_molecules must be a positive integer; you supplied {n_molecules!r}. Fix: pass e.g. 64")
    return int(n_molecules)


def box_length_for_density(n_molecules, density) -> float:
    """Cubic box edge in nm that holds ``n_molecules`` OTP molecules at ``density`` g/cm^3."""
    n = _check_count(n_molecules)
    rho = check_positive("density", density, "g/cm^3")
    return (n * MOLECULE_MASS * AMU_NM3_TO_G_CM3 / rho) ** (1.0 / 3.0)


def _check_box(box_length, cutoff, hint):
    """box_length (nm) > 0 and at least twice the cutoff (nm); ``hint`` says how many molecules that takes."""
    L = check_positive("box_length", box_length, "nm")
    if cutoff > 0.5 * L:
        raise EnpcgError(f"box_length {L:.4f} nm is less than twice the {cutoff} nm cutoff. Fix: use a box of at "
                         f"least {2 * cutoff} nm ({hint})")
    return L


def create_system(n_molecules, box_length):
    """Lewis-Wahnstrom OTP: ``n_molecules`` rigid molecules in a cubic periodic box of edge ``box_length`` nm.

    The box must be at least twice the 1.2 nm cutoff (2.4 nm; 40 molecules at 1.09 g/cm^3).
    Returns (openmm.System, openmm.app.Topology); the System has 3 constraints per molecule, a
    NonbondedForce (LJ only, switched 1.1 -> 1.2 nm, no dispersion correction) and a CMMotionRemover.
    """
    n = _check_count(n_molecules)
    L = _check_box(box_length, CUTOFF, "at least 40 molecules at 1.09 g/cm^3")
    system = mm.System()
    top = app.Topology()
    carbon = app.Element.getBySymbol("C")
    nb = lj_nonbonded(CUTOFF, switch_distance=SWITCH_DISTANCE, dispersion_correction=False)
    for m in range(n):
        chain = top.addChain(id=_chain_id(m))
        res = top.addResidue("OTP", chain, id=str(m + 1))
        first = system.getNumParticles()
        atoms = []
        for k, name in enumerate(("CA", "CB", "CC")):
            system.addParticle(SITE_MASS)
            nb.addParticle(0.0, SIGMA, EPSILON)
            atoms.append(top.addAtom(name, carbon, res))
        top.addBond(atoms[0], atoms[1])
        top.addBond(atoms[1], atoms[2])
        system.addConstraint(first, first + 1, SIDE)
        system.addConstraint(first + 1, first + 2, SIDE)
        system.addConstraint(first, first + 2, BASE)
        for i, j in ((0, 1), (1, 2), (0, 2)):
            nb.addException(first + i, first + j, 0.0, 1.0, 0.0)
    system.addForce(nb)
    system.addForce(mm.CMMotionRemover())
    set_cubic_box(system, top, L)
    return system, top


# --------------------------------------------------------------------------------------------- packing
def pack_on_lattice(templates, box_length, rng, *, tries=32) -> np.ndarray:
    """Molecules on a simple cubic lattice in a cubic periodic box, each randomly rotated.

    templates : list of (k, 3) nm site coordinates of each molecule about its own centre (one per molecule).
    box_length : nm. rng : numpy Generator. Each molecule takes the best of ``tries`` random rotations (the
    one whose closest site, minimum image, to the already placed sites is farthest), so minimisation starts
    without severe overlaps. Lattice points are filled in order (ceil(n^(1/3)) per edge, spacing L / that).
    Returns (sum k, 3) nm, molecules whole.
    """
    n = len(templates)
    L = float(box_length)
    per_edge = max(1, math.ceil(round(n ** (1.0 / 3.0), 9)))
    a = L / per_edge
    grid = (np.stack(np.meshgrid(*[np.arange(per_edge)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) * a
    placed = []
    for m, t in enumerate(templates):
        t = np.asarray(t, dtype=np.float64)
        rots = random_rotations(tries, rng)
        cand = grid[m] + np.einsum("rij,kj->rki", rots, t)  # (tries, k, 3)
        if placed:
            prev = np.concatenate(placed)
            d = cand[:, :, None, :] - prev[None, None]
            d -= L * np.round(d / L)
            best = int(np.argmax(np.min(np.einsum("rkpi,rkpi->rkp", d, d), axis=(1, 2))))
        else:
            best = 0
        placed.append(cand[best])
    return np.concatenate(placed)


# --------------------------------------------------------------------------------------------- MD
def _platform():
    """The CPU platform, or Reference where CPU is missing."""
    names = [mm.Platform.getPlatform(i).getName() for i in range(mm.Platform.getNumPlatforms())]
    return mm.Platform.getPlatformByName("CPU" if "CPU" in names else "Reference")


def equilibrate(system, topology, positions, *, temperature, timestep, friction, steps, seed, progress=False,
                desc="NVT"):
    """Minimise, then Langevin (LangevinMiddleIntegrator) for ``steps`` steps on the CPU platform (Reference
    where CPU is missing); shared by the OTP and 3-methylpentane builders.

    temperature : K. timestep : ps. friction : 1/ps. positions : (n, 3) nm. Returns (positions (n, 3) nm,
    molecules whole and each molecule's centre of mass wrapped into the box; box (3, 3) nm; dict of the
    potential energy kJ/mol, kinetic temperature K and platform name).
    """
    from openmm_plugin.sampling import openmm_seed

    integrator = mm.LangevinMiddleIntegrator(temperature, friction, timestep)
    integrator.setRandomNumberSeed(openmm_seed(seed))
    integrator.setConstraintTolerance(1e-8)
    platform = _platform()
    ctx = mm.Context(system, integrator, platform)
    ctx.setPositions(positions)
    if system.getNumConstraints():
        ctx.applyConstraints(1e-8)
    mm.LocalEnergyMinimizer.minimize(ctx, 10.0, 5000)
    ctx.setVelocitiesToTemperature(temperature, openmm_seed(seed + 1))
    from tqdm import tqdm

    block = 500
    with tqdm(total=steps, desc=desc, disable=not progress, unit="step") as bar:
        done = 0
        while done < steps:
            k = min(block, steps - done)
            integrator.step(k)
            done += k
            bar.update(k)
    st = ctx.getState(getPositions=True, getEnergy=True)
    pos = np.array(st.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    box = np.array(st.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))
    if not np.all(np.isfinite(pos)):
        raise EnpcgError(f"the {desc} run blew up (non-finite positions) with a {timestep} ps step; use a "
                         "smaller time step or a lower density")
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(system.getNumParticles())])
    mols = [[a.index for a in ch.atoms()] for ch in topology.chains()]
    pos = wrap_chains(pos, mols, masses, box)
    dof = 3 * system.getNumParticles() - system.getNumConstraints() - 3  # CMMotionRemover removes 3
    ke = st.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
    info = {"potential_energy_kJ_mol": st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            "kinetic_temperature_K": 2.0 * ke / (dof * KB), "platform": platform.getName()}
    return pos, box, info


def build_liquid(n_molecules=64, temperature=346.0, density=1.09, seed=0, *, equilibration_ps=20.0,
                 progress=False) -> PolymerSystem:
    """An equilibrated Lewis-Wahnstrom OTP liquid.

    n_molecules : molecules (at least 40 at 1.09 g/cm^3, so the box holds twice the 1.2 nm cutoff).
    temperature : K. density : g/cm^3 (default 346 K and 1.09 g/cm^3, a liquid state point of the model;
        the density is close to that of real OTP near its melting point). seed : int (lattice orientations and
    thermostat). equilibration_ps : ps of Langevin dynamics (0.005 ps step, friction 1/ps) after minimisation.
    Molecules start on a simple cubic lattice with random orientations (seeded numpy Generator).
    Returns a :class:`systems.polyethylene.PolymerSystem`: positions (n, 3) nm with molecules whole (each
    molecule's centre of mass in the box), box (3, 3) nm, masses (n,) amu, metadata (temperature K, density
    g/cm^3, time step ps, seed, n_molecules, ...).
    """
    t0 = time.time()
    n = _check_count(n_molecules)
    T = check_positive("temperature", temperature, "K")
    try:
        eq_ps = float(equilibration_ps)
    except (TypeError, ValueError):
        eq_ps = float("nan")
    if not math.isfinite(eq_ps) or eq_ps < 0:
        raise EnpcgError(f"equilibration_ps must be a non-negative number of ps; you supplied {equilibration_ps!r}")
    L = box_length_for_density(n, density)
    if CUTOFF > 0.5 * L:
        need = math.ceil((2 * CUTOFF) ** 3 * float(density) / (MOLECULE_MASS * AMU_NM3_TO_G_CM3))
        raise EnpcgError(f"{n} molecules at {density} g/cm^3 give a {L:.3f} nm box, less than twice the {CUTOFF} nm "
                         f"cutoff. Fix: use at least {need} molecules")
    system, top = create_system(n, L)
    rng = np.random.default_rng(seed)
    body = site_coordinates()
    positions = pack_on_lattice([body] * n, L, rng)
    steps = int(round(eq_ps / TIMESTEP))
    pos, box, info = equilibrate(system, top, positions, temperature=T, timestep=TIMESTEP, friction=FRICTION,
                                 steps=steps, seed=seed, progress=progress)
    masses = np.full(3 * n, SITE_MASS)
    meta = {
        "generator": "systems.otp.build_liquid",
        "force_field": f"Lewis-Wahnstrom OTP (PRE 50, 3865 (1994)): rigid 3-site LJ, sigma {SIGMA} nm, epsilon "
                       f"{EPSILON} kJ/mol, cutoff {CUTOFF} nm switched from {SWITCH_DISTANCE} nm, no dispersion "
                       "correction",
        "n_molecules": n, "temperature_K": T, "density_g_cm3": density_g_cm3(masses, box), "seed": seed,
        "timestep_ps": TIMESTEP, "friction_per_ps": FRICTION, "equilibration_ps": eq_ps, "nvt_steps": steps,
        **info, "openmm_version": mm.__version__, "wall_time_s": round(time.time() - t0, 1),
    }
    return PolymerSystem(system=system, topology=top, positions=pos, box=box, masses=masses, metadata=meta)
