"""United-atom 3-methylpentane (TraPPE-UA, flexible bonds), a molecular glass former (Tg about 77 K), built
from scratch as an OpenMM System.

Units: nm, ps, kJ/mol, amu, K, g/cm^3. Force field: TraPPE-UA (Martin & Siepmann, J. Phys. Chem. B 102, 2569
(1998) for CH3 and CH2; J. Phys. Chem. B 103, 4508 (1999) for CH and the branched-alkane bends and torsions):

* sites: CH3 15.035 amu, eps/kB 98 K, sigma 0.375 nm; CH2 14.027 amu, eps/kB 46 K, sigma 0.395 nm;
  CH 13.019 amu, eps/kB 10 K, sigma 0.468 nm. Lorentz-Berthelot mixing (OpenMM's NonbondedForce), LJ cut at
  1.0 nm (truncated, not shifted or switched) with the analytic long-range dispersion correction, as in
  ``systems.polyethylene``.
* nonbonded exclusions: pairs within three bonds (1-2, 1-3, 1-4) are excluded; the only intramolecular pair
  left is C1-C5 (1-5 along the backbone), which interacts with the full LJ.
* bonds: TraPPE fixes them at 0.154 nm; here they are FLEXIBLE because OpenMM's ``getForces`` omits
  constraint forces, which would bias force matching. Harmonic E = k_b/2 (r - r0)^2, r0 = 0.154 nm,
  k_b = ``systems.polyethylene.BOND_K`` = 217,568 kJ/mol/nm^2 (OPLS-UA CH2-CH2 stretch, Jorgensen, Madura &
  Swenson, JACS 106, 6638 (1984)). The no-constraint System is what force matching needs.
* angles: E = k/2 (theta - theta0)^2, k/kB = 62,500 K/rad^2 (k = 519.65 kJ/mol/rad^2); theta0 = 114 deg for
  CHx-CH2-CHx (C1-C2-C3, C3-C4-C5) and 112 deg for CHx-CH-CHx (C2-C3-C4, C2-C3-C6, C4-C3-C6).
* torsions CHx-CH2-CH-CHy (OPLS form, phi IUPAC, trans = 180 deg):
  E = c0 + c1 (1 + cos phi) + c2 (1 - cos 2 phi) + c3 (1 + cos 3 phi), c0..c3 / kB = -251.06, 428.73,
  -111.85, 441.27 K, on C1-C2-C3-C4, C1-C2-C3-C6, C5-C4-C3-C2 and C5-C4-C3-C6. The constant c0 does not
  change forces and is dropped: the System's energy is 4 |c0| kB = 8.35 kJ/mol per molecule higher than the
  full OPLS sum (4 c0 = -1004.24 K x kB). As PeriodicTorsionForce terms
  k (1 + cos(n phi - phi0)): (n=1, k=c1, phi0=0), (n=2, k=c2, phi0=180 deg), (n=3, k=c3, phi0=0).

Atom order: molecule-major; per molecule 0 C1 (CH3), 1 C2 (CH2), 2 C3 (CH), 3 C4 (CH2), 4 C5 (CH3),
5 C6 (CH3, the methyl on C3); bonds C1-C2, C2-C3, C3-C4, C4-C5, C3-C6. Each molecule is one OpenMM chain with
one residue "MP" (element carbon; masses set explicitly on the System).

Liquid (:func:`build_liquid`): the default density 0.75 g/cm^3 at 200 K is the experimental liquid density
0.664 g/cm^3 at 298 K extrapolated linearly with d rho/dT = -0.9e-3 g/cm^3/K (the slope of liquid hexane
isomers near room temperature): 0.664 + 0.09 = 0.754, rounded. The model agrees: 150 ps of NPT (Monte Carlo
barostat, 1 bar, 200 K, 100 molecules, started from this builder) gave 0.751 +- 0.009 g/cm^3 (mean and
standard deviation of the second half). Langevin (LangevinMiddleIntegrator)
2 fs, friction 1/ps: the stiffest motion is the bond stretch (period about 36 fs for CH-CH3), about 18 steps
per period.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import openmm as mm
from openmm import app

from enpcg.errors import EnpcgError, check_positive
from systems.otp import _check_box, _check_count, equilibrate, pack_on_lattice
from systems.polyethylene import (AMU_NM3_TO_G_CM3, BOND_K, KB, PolymerSystem, _chain_id, _place,
                                  density_g_cm3, lj_nonbonded, set_cubic_box, trappe_bonded_forces)

SITES = {  # name: (mass amu, epsilon kJ/mol, sigma nm)
    "CH3": (15.035, 98.0 * KB, 0.375),
    "CH2": (14.027, 46.0 * KB, 0.395),
    "CH": (13.019, 10.0 * KB, 0.468),
}
SITE_TYPES = ("CH3", "CH2", "CH", "CH2", "CH3", "CH3")   # atoms 0..5 of a molecule
ATOM_NAMES = ("C1", "C2", "C3", "C4", "C5", "C6")
BONDS = ((0, 1), (1, 2), (2, 3), (3, 4), (2, 5))
BOND_LENGTH = 0.154                                      # nm
ANGLE_K = 62500.0 * KB                                   # kJ/mol/rad^2, E = k/2 (theta - theta0)^2
ANGLES = (  # (i, j, k, theta0 rad)
    (0, 1, 2, math.radians(114.0)), (2, 3, 4, math.radians(114.0)),
    (1, 2, 3, math.radians(112.0)), (1, 2, 5, math.radians(112.0)), (3, 2, 5, math.radians(112.0)),
)
TORSIONS = ((0, 1, 2, 3), (0, 1, 2, 5), (4, 3, 2, 1), (4, 3, 2, 5))
TORSION_C_K = (-251.06, 428.73, -111.85, 441.27)        # K, OPLS c0..c3 for CHx-CH2-CH-CHy
CUTOFF = 1.0                                             # nm
DEFAULT_DENSITY = 0.75                                   # g/cm^3 near 200 K (module docstring)
TIMESTEP = 0.002                                         # ps
FRICTION = 1.0                                           # 1/ps
MOLECULE_MASS = float(sum(SITES[t][0] for t in SITE_TYPES))  # amu, 86.178
SITES_PER_MOLECULE = 6

MAPPING = Path(__file__).parent / "mappings" / "methylpentane_frame.yaml"


def box_length_for_density(n_molecules, density) -> float:
    """Cubic box edge in nm that holds ``n_molecules`` molecules at ``density`` g/cm^3."""
    n = _check_count(n_molecules)
    rho = check_positive("density", density, "g/cm^3")
    return (n * MOLECULE_MASS * AMU_NM3_TO_G_CM3 / rho) ** (1.0 / 3.0)


def create_system(n_molecules, box_length):
    """TraPPE-UA 3-methylpentane with flexible bonds: ``n_molecules`` molecules in a cubic periodic box of
    edge ``box_length`` nm (at least twice the 1.0 nm cutoff: 42 molecules at 0.75 g/cm^3).

    Returns (openmm.System, openmm.app.Topology); the System has no constraints: HarmonicBondForce,
    HarmonicAngleForce, PeriodicTorsionForce, NonbondedForce (LJ, dispersion correction) and CMMotionRemover.
    """
    n = _check_count(n_molecules)
    L = _check_box(box_length, CUTOFF, f"at least 42 molecules at {DEFAULT_DENSITY} g/cm^3")
    system = mm.System()
    top = app.Topology()
    carbon = app.Element.getBySymbol("C")
    nb = lj_nonbonded(CUTOFF)  # TraPPE: plain truncation plus analytic tail correction
    bonds, angles, torsions, torsion_terms = trappe_bonded_forces(TORSION_C_K)
    bond_pairs = []
    for m in range(n):
        chain = top.addChain(id=_chain_id(m))
        res = top.addResidue("MP", chain, id=str(m + 1))
        first = system.getNumParticles()
        atoms = []
        for name, t in zip(ATOM_NAMES, SITE_TYPES):
            mass, eps, sigma = SITES[t]
            system.addParticle(mass)
            nb.addParticle(0.0, sigma, eps)
            atoms.append(top.addAtom(name, carbon, res))
        for i, j in BONDS:
            top.addBond(atoms[i], atoms[j])
            bonds.addBond(first + i, first + j, BOND_LENGTH, BOND_K)
            bond_pairs.append((first + i, first + j))
        for i, j, k, theta0 in ANGLES:
            angles.addAngle(first + i, first + j, first + k, theta0, ANGLE_K)
        for i, j, k, l in TORSIONS:
            for per, phase, kt in torsion_terms:
                torsions.addTorsion(first + i, first + j, first + k, first + l, per, phase, kt)
    # 1-2 and 1-3 excluded, 1-4 scaled by 0 (excluded); C1-C5 (1-5) keeps the full LJ
    nb.createExceptionsFromBonds(bond_pairs, 0.0, 0.0)
    for force in (nb, bonds, angles, torsions):
        system.addForce(force)
    system.addForce(mm.CMMotionRemover())
    set_cubic_box(system, top, L)
    return system, top


def molecule_coordinates(phi1=math.pi, phi2=math.pi) -> np.ndarray:
    """(6, 3) nm coordinates of one molecule at the force field's bond lengths and angles, centre of mass at
    the origin. phi1 : rad, dihedral C1-C2-C3-C4; phi2 : rad, dihedral C5-C4-C3-C2 (IUPAC, trans = pi)."""
    b = BOND_LENGTH
    t_ch = math.radians(112.0)
    t_ch2 = math.radians(114.0)
    x = np.zeros((6, 3))
    x[1] = [b, 0.0, 0.0]                                          # C2; C3 at the origin
    x[3] = [b * math.cos(t_ch), b * math.sin(t_ch), 0.0]          # C4, angle C2-C3-C4 = 112 deg
    u2, u4 = x[1] / b, x[3] / b
    cth = math.cos(t_ch)                                          # C6: 112 deg to both C2 and C4
    nrm = np.cross(u2, u4)
    nrm /= np.linalg.norm(nrm)
    x[5] = b * (cth / (1 + cth) * (u2 + u4) + math.sqrt(1 - 2 * cth**2 / (1 + cth)) * nrm)
    x[0] = _place(x[3], x[2], x[1], b, t_ch2, phi1)               # dihedral C4-C3-C2-C1 = phi1
    x[4] = _place(x[1], x[2], x[3], b, t_ch2, phi2)               # dihedral C2-C3-C4-C5 = phi2
    masses = np.array([SITES[t][0] for t in SITE_TYPES])
    return x - np.average(x, axis=0, weights=masses)


def build_liquid(n_molecules=100, temperature=200.0, density=None, seed=0, *, equilibration_ps=20.0,
                 progress=False) -> PolymerSystem:
    """An equilibrated 3-methylpentane liquid (NVT).

    n_molecules : molecules (at least 42 at 0.75 g/cm^3, so the box holds twice the 1.0 nm cutoff).
    temperature : K. density : g/cm^3, or None for :data:`DEFAULT_DENSITY` (0.75 g/cm^3, the experimental
    density extrapolated to about 200 K; see the module docstring). seed : int (conformations, orientations,
    thermostat). equilibration_ps : ps of Langevin dynamics (2 fs step, friction 1/ps) after minimisation.
    Molecules are built from internal coordinates with backbone dihedrals drawn from trans and gauche+-
    (10 deg noise) and placed on a simple cubic lattice with random orientations (seeded numpy Generator).
    Returns a :class:`systems.polyethylene.PolymerSystem`: positions (n, 3) nm with molecules whole (each
    molecule's centre of mass in the box), box (3, 3) nm, masses (n,) amu, metadata (temperature K, density
    g/cm^3, time step ps, seed, n_molecules, ...).
    """
    t0 = time.time()
    n = _check_count(n_molecules)
    T = check_positive("temperature", temperature, "K")
    rho = DEFAULT_DENSITY if density is None else check_positive("density", density, "g/cm^3")
    try:
        eq_ps = float(equilibration_ps)
    except (TypeError, ValueError):
        eq_ps = float("nan")
    if not math.isfinite(eq_ps) or eq_ps < 0:
        raise EnpcgError(f"equilibration_ps must be a non-negative number of ps; you supplied {equilibration_ps!r}")
    L = box_length_for_density(n, rho)
    if CUTOFF > 0.5 * L:
        need = math.ceil((2 * CUTOFF) ** 3 * rho / (MOLECULE_MASS * AMU_NM3_TO_G_CM3))
        raise EnpcgError(f"{n} molecules at {rho} g/cm^3 give a {L:.3f} nm box, less than twice the {CUTOFF} nm "
                         f"cutoff. Fix: use at least {need} molecules")
    system, top = create_system(n, L)
    rng = np.random.default_rng(seed)
    choices = np.array([math.pi, math.radians(60.0), math.radians(-60.0)])
    phis = choices[rng.integers(0, 3, size=(n, 2))] + math.radians(10.0) * rng.normal(size=(n, 2))
    templates = [molecule_coordinates(p1, p2) for p1, p2 in phis]
    positions = pack_on_lattice(templates, L, rng)
    steps = int(round(eq_ps / TIMESTEP))
    pos, box, info = equilibrate(system, top, positions, temperature=T, timestep=TIMESTEP, friction=FRICTION,
                                 steps=steps, seed=seed, progress=progress)
    masses = np.array([SITES[t][0] for t in SITE_TYPES] * n)
    meta = {
        "generator": "systems.methylpentane.build_liquid",
        "force_field": "TraPPE-UA 3-methylpentane, flexible bonds (k_b = 217568 kJ/mol/nm^2, OPLS-UA), LJ cutoff "
                       f"{CUTOFF} nm + dispersion correction, torsion c0 dropped",
        "n_molecules": n, "temperature_K": T, "density_g_cm3": density_g_cm3(masses, box), "seed": seed,
        "timestep_ps": TIMESTEP, "friction_per_ps": FRICTION, "equilibration_ps": eq_ps, "nvt_steps": steps,
        **info, "openmm_version": mm.__version__, "wall_time_s": round(time.time() - t0, 1),
    }
    return PolymerSystem(system=system, topology=top, positions=pos, box=box, masses=masses, metadata=meta)
