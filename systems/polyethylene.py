"""United-atom polyethylene melt (TraPPE-UA, flexible bonds) built from scratch as an OpenMM System.

Units: nm, ps, kJ/mol, amu, K, bar. Force field (Martin & Siepmann, J. Phys. Chem. B 102, 2569 (1998)):

* sites: CH3 15.035 amu, eps/kB 98 K, sigma 0.375 nm; CH2 14.027 amu, eps/kB 46 K, sigma 0.395 nm;
  Lorentz-Berthelot mixing (OpenMM's NonbondedForce does this), LJ cut at 1.0 nm (truncated, not shifted)
  with the analytic long-range dispersion correction; pairs 1-2, 1-3 and 1-4 along a chain are excluded.
* bonds: TraPPE fixes them at 0.154 nm. We keep them FLEXIBLE, because OpenMM's ``getForces`` leaves out
  constraint forces, which would bias force matching. Harmonic, E = k_b/2 (r - r0)^2, r0 = 0.154 nm,
  k_b = 2 x 260 kcal/mol/A^2 = 217,568 kJ/mol/nm^2: the CH2-CH2 stretch of OPLS-UA (Jorgensen, Madura &
  Swenson, JACS 106, 6638 (1984), written there as K (r - r0)^2). The bond period is about 36 fs, so the 2 fs
  Langevin step resolves it (about 18 steps per period).
* angles: E = k_theta/2 (theta - theta0)^2, theta0 = 114 deg, k_theta/kB = 62,500 K/rad^2 (TraPPE states
  the constant in exactly this k/2 form), i.e. k = 519.65 kJ/mol/rad^2 in OpenMM's HarmonicAngleForce.
* torsions (OPLS form, TraPPE): E = c0 + c1 (1 + cos phi) + c2 (1 - cos 2 phi) + c3 (1 + cos 3 phi) with
  c0..c3 / kB = 0, 355.03, -68.19, 791.32 K and phi in the IUPAC convention (trans = 180 deg, the minimum,
  E = 0; cis, E/kB = 2292.7 K; gauche minima at +-63.5 deg, E/kB = 417.5 K). As
  PeriodicTorsionForce terms k (1 + cos(n phi - phi0)): (n=1, k=c1, phi0=0), (n=2, k=c2, phi0=180 deg),
  (n=3, k=c3, phi0=0).

Atom order: chain-major; each chain is one OpenMM chain with one residue "PE"; atoms C1..Cn along the
backbone (element carbon); the first and last atoms are CH3, the rest CH2.

Bundled melt (``systems/data/pe_melt.*``, loaded by :func:`default_melt`): 21 chains x 48 sites packed as
random walks at 0.70 g/cm^3, minimised, 2 ns NPT at 450 K and 1 bar (density 0.7456 g/cm^3, mean of the
second half; the instantaneous density fluctuates by 0.013), then 1 ns NVT at the mean NPT volume. The chain
end-to-end vectors are decorrelated from the packed ones (autocorrelation -0.05). It was made with
``python -m systems.polyethylene --out systems/data/pe_melt --npt-ps 2000 --nvt-ps 1000`` on a GPU (63 s;
about 1.5 h on 2 CPU cores); the command's defaults (200 ps NPT + 100 ps NVT) take about 6 min on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openmm as mm
from openmm import app, unit

from enpcg.errors import EnpcgError
from enpcg.fileio import atomic_write, write_json

KB = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)  # kJ/mol/K
AMU_NM3_TO_G_CM3 = 1.66053906660e-3  # (1 amu / 1 nm^3) in g/cm^3

SITES = {  # name: (mass amu, epsilon kJ/mol, sigma nm)
    "CH3": (15.035, 98.0 * KB, 0.375),
    "CH2": (14.027, 46.0 * KB, 0.395),
}
BOND_LENGTH = 0.154                          # nm
BOND_K = 2 * 260.0 * 4.184 * 100.0           # kJ/mol/nm^2 (OPLS-UA 260 kcal/mol/A^2 in K (r-r0)^2 form)
ANGLE_THETA0 = math.radians(114.0)           # rad
ANGLE_K = 62500.0 * KB                       # kJ/mol/rad^2, E = k/2 (theta - theta0)^2
TORSION_C_K = (0.0, 355.03, -68.19, 791.32)  # K, OPLS form c0..c3
DEFAULT_CUTOFF = 1.0                         # nm
MELT_DENSITY_450K = 0.76                     # g/cm^3, experimental PE melt density near 450 K

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_PREFIX = DATA_DIR / "pe_melt"


@dataclass
class PolymerSystem:
    """An atomistic reference system.

    system : openmm.System (no constraints, no barostat)
    topology : openmm.app.Topology with periodic box vectors
    positions : np.ndarray, shape=(n, 3), float64, nm (chains whole, not wrapped atom by atom)
    box : np.ndarray, shape=(3, 3), float64, nm, rows are box vectors
    masses : np.ndarray, shape=(n,), float64, amu
    metadata : dict, how it was made (temperature K, pressure bar, density g/cm^3, steps, seed, ...)
    """

    system: mm.System
    topology: app.Topology
    positions: np.ndarray
    box: np.ndarray
    masses: np.ndarray
    metadata: dict = field(default_factory=dict)

    @property
    def n_particles(self) -> int:
        return int(self.positions.shape[0])

    def density(self) -> float:
        """Mass density in g/cm^3."""
        return density_g_cm3(self.masses, self.box)


def density_g_cm3(masses, box) -> float:
    """Density in g/cm^3 of particles with ``masses`` (amu) in a (3, 3) nm box."""
    return float(np.sum(masses) / abs(np.linalg.det(np.asarray(box))) * AMU_NM3_TO_G_CM3)


def site_types(chain_length):
    """Site type names ("CH3"/"CH2") of one chain of ``chain_length`` united atoms."""
    if chain_length < 2:
        raise EnpcgError(f"chain_length must be at least 2; you supplied {chain_length}")
    return ["CH3"] + ["CH2"] * (chain_length - 2) + ["CH3"]


def chain_mass(chain_length) -> float:
    """Mass of one chain in amu."""
    return float(sum(SITES[t][0] for t in site_types(chain_length)))


def box_length_for_density(n_chains, chain_length, density) -> float:
    """Cubic box edge in nm that holds ``n_chains`` chains at ``density`` g/cm^3."""
    return (n_chains * chain_mass(chain_length) * AMU_NM3_TO_G_CM3 / density) ** (1.0 / 3.0)


# --------------------------------------------------------------------------------------------- the System
def lj_nonbonded(cutoff, *, switch_distance=None, dispersion_correction=True) -> mm.NonbondedForce:
    """Periodic Lennard-Jones NonbondedForce (no charges): cut at ``cutoff`` nm, OpenMM's switching function
    from ``switch_distance`` nm when given (else plain truncation), with or without the analytic long-range
    dispersion correction. Shared by the reference systems (polyethylene, 3-methylpentane, ortho-terphenyl)."""
    nb = mm.NonbondedForce()
    nb.setNonbondedMethod(mm.NonbondedForce.CutoffPeriodic)
    nb.setCutoffDistance(cutoff)
    nb.setUseSwitchingFunction(switch_distance is not None)
    if switch_distance is not None:
        nb.setSwitchingDistance(switch_distance)
    nb.setUseDispersionCorrection(bool(dispersion_correction))
    return nb


def trappe_bonded_forces(torsion_c_k):
    """Empty HarmonicBondForce, HarmonicAngleForce and PeriodicTorsionForce, and the PeriodicTorsionForce
    terms (n, phase rad, k kJ/mol) of the OPLS series c0..c3 ``torsion_c_k`` (K): c0 is a constant and dropped."""
    c = [ck * KB for ck in torsion_c_k]
    terms = ((1, 0.0, c[1]), (2, math.pi, c[2]), (3, 0.0, c[3]))
    return mm.HarmonicBondForce(), mm.HarmonicAngleForce(), mm.PeriodicTorsionForce(), terms


def set_cubic_box(system, topology, box_length):
    """Cubic periodic box of edge ``box_length`` nm on both the System and the Topology."""
    vecs = [mm.Vec3(box_length, 0, 0), mm.Vec3(0, box_length, 0), mm.Vec3(0, 0, box_length)]
    system.setDefaultPeriodicBoxVectors(*vecs)
    topology.setPeriodicBoxVectors(vecs * unit.nanometer)


def create_system(n_chains, chain_length, box_length, *, cutoff=DEFAULT_CUTOFF):
    """TraPPE-UA polyethylene with flexible bonds in a cubic box.

    box_length : nm, cutoff : nm (must be at most half the box). Returns (openmm.System, openmm.app.Topology).
    """
    if n_chains < 1:
        raise EnpcgError(f"n_chains must be at least 1; you supplied {n_chains}")
    types = site_types(chain_length)
    if cutoff > 0.5 * box_length:
        raise EnpcgError(f"cutoff {cutoff} nm is more than half the box edge {box_length:.3f} nm; use more or "
                         "longer chains, or a smaller cutoff")
    system = mm.System()
    top = app.Topology()
    carbon = app.Element.getBySymbol("C")
    nb = lj_nonbonded(cutoff)  # TraPPE: plain truncation plus analytic tail correction
    bonds, angles, torsions, torsion_terms = trappe_bonded_forces(TORSION_C_K)
    bond_pairs = []
    for ic in range(n_chains):
        chain = top.addChain(id=_chain_id(ic))
        res = top.addResidue("PE", chain, id=str(ic + 1))
        first = system.getNumParticles()
        prev = None
        for k, t in enumerate(types):
            mass, eps, sigma = SITES[t]
            system.addParticle(mass)
            nb.addParticle(0.0, sigma, eps)
            atom = top.addAtom(f"C{k + 1}", carbon, res)
            if prev is not None:
                top.addBond(prev, atom)
            prev = atom
        idx = range(first, first + chain_length)
        for i in idx[:-1]:
            bonds.addBond(i, i + 1, BOND_LENGTH, BOND_K)
            bond_pairs.append((i, i + 1))
        for i in idx[:-2]:
            angles.addAngle(i, i + 1, i + 2, ANGLE_THETA0, ANGLE_K)
        for i in idx[:-3]:
            for n, phase, k in torsion_terms:
                torsions.addTorsion(i, i + 1, i + 2, i + 3, n, phase, k)
    # 1-2 and 1-3 excluded, 1-4 scaled by 0 (excluded): TraPPE leaves 1-4 to the torsion
    nb.createExceptionsFromBonds(bond_pairs, 0.0, 0.0)
    for force in (nb, bonds, angles, torsions):
        system.addForce(force)
    system.addForce(mm.CMMotionRemover())
    set_cubic_box(system, top, box_length)
    return system, top


def _chain_id(i):
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return letters[i % 26] if i < 26 else letters[(i // 26 - 1) % 26] + letters[i % 26]


# --------------------------------------------------------------------------------------------- packing
def _place(a, b, c, bond, angle, torsion):
    """Position of d with |cd| = bond, angle bcd = angle, dihedral abcd = torsion (IUPAC, rad)."""
    bc = c - b
    bc /= np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    return c - bond * math.cos(angle) * bc + bond * math.sin(angle) * (
        math.cos(torsion) * m + math.sin(torsion) * n)


def dihedral(a, b, c, d):
    """IUPAC dihedral of four points (rad, in (-pi, pi]); trans = pi."""
    b0, b1, b2 = a - b, c - b, d - c
    b1n = b1 / np.linalg.norm(b1)
    v = b0 - np.dot(b0, b1n) * b1n
    w = b2 - np.dot(b2, b1n) * b1n
    return math.atan2(np.dot(np.cross(b1n, v), w), np.dot(v, w))


def pack_chains(n_chains, chain_length, box_length, *, seed=0, min_distance=0.32, trans_fraction=0.6,
                max_tries=50):
    """Random-walk chains without overlaps in a cubic periodic box.

    Bonds 0.154 nm, angles 114 deg, torsions trans (``trans_fraction``) or gauche +-65 deg with 10 deg
    noise. Sites of different chains, and sites of one chain more than three bonds apart, stay at least
    ``min_distance`` nm apart (minimum image); the distance is lowered by 5% whenever a chain cannot be
    placed. Returns (n_chains * chain_length, 3) nm, chains unwrapped (continuous).
    """
    rng = np.random.default_rng(seed)
    L = float(box_length)
    n = n_chains * chain_length
    pos = np.zeros((n, 3))
    placed = 0  # sites of complete chains
    dmin2 = min_distance**2

    def clear(x, upto, own_start):
        """True if x is far enough from complete chains and the non-neighbour sites of its own chain."""
        others = np.concatenate([pos[:placed], pos[own_start:max(own_start, upto - 3)]])
        if len(others) == 0:
            return True
        d = others - x
        d -= L * np.round(d / L)
        return np.min(np.einsum("ij,ij->i", d, d)) >= dmin2

    theta = ANGLE_THETA0
    for ic in range(n_chains):
        start = ic * chain_length
        for attempt in range(max_tries * 10):
            ok = True
            for k in range(chain_length):
                i = start + k
                for _ in range(max_tries):
                    if k == 0:
                        x = rng.uniform(0, L, 3)
                    elif k == 1:
                        u = rng.normal(size=3)
                        x = pos[i - 1] + BOND_LENGTH * u / np.linalg.norm(u)
                    else:
                        a = pos[i - 3] if k >= 3 else pos[i - 2] + rng.normal(size=3)
                        r = rng.random()
                        phi = math.pi if r < trans_fraction else math.radians(65.0) * (1 if r < (
                            1 + trans_fraction) / 2 else -1)
                        phi += math.radians(10.0) * rng.normal()
                        x = _place(a, pos[i - 2], pos[i - 1], BOND_LENGTH, theta, phi)
                    if clear(x, i, start):
                        pos[i] = x
                        break
                else:
                    ok = False
                    break
            if ok:
                break
            if attempt % max_tries == max_tries - 1:
                dmin2 *= 0.95**2  # crowded: accept slightly closer contacts, minimisation removes them
        else:
            raise EnpcgError(f"could not pack chain {ic} of {n_chains} in a {L:.3f} nm box; lower the packing "
                             "density")
        placed = start + chain_length
    return pos


# --------------------------------------------------------------------------------------------- MD helpers
def _chain_slices(topology):
    return [[a.index for a in ch.atoms()] for ch in topology.chains()]


def _scale_chains(positions, chains, masses, factor):
    """Scale chain centres of mass by ``factor`` (chains move rigidly, as the barostat does)."""
    out = positions.copy()
    for idx in chains:
        com = np.average(positions[idx], axis=0, weights=masses[idx])
        out[idx] += (factor - 1.0) * com
    return out


def wrap_chains(positions, chains, masses, box):
    """Translate each chain by box vectors so its centre of mass lies in the (rectangular) box."""
    out = positions.copy()
    lengths = np.diag(box)
    for idx in chains:
        com = np.average(positions[idx], axis=0, weights=masses[idx])
        out[idx] -= np.floor(com / lengths) * lengths
    return out


def end_to_end(positions, chains):
    """(n_chains, 3) nm end-to-end vectors of whole (unwrapped) chains."""
    return np.array([positions[idx[-1]] - positions[idx[0]] for idx in chains])


def _run_blocks(sim, n_steps, block, desc, progress, on_block=None):
    from tqdm import tqdm

    done = 0
    with tqdm(total=n_steps, desc=desc, disable=not progress, unit="step") as bar:
        while done < n_steps:
            m = min(block, n_steps - done)
            sim.step(m)
            done += m
            bar.update(m)
            if on_block is not None:
                on_block(sim)


def build_melt(n_chains=21, chain_length=48, temperature=450.0, density=None, seed=0, *, pressure=1.0,
               packing_density=0.70, cutoff=DEFAULT_CUTOFF, npt_steps=100_000, nvt_steps=50_000,
               timestep=0.002, friction=1.0, platform=None, progress=False) -> PolymerSystem:
    """Pack, minimise and equilibrate a polyethylene melt.

    n_chains, chain_length : chains of united atoms. temperature : K.
    density : g/cm^3 or None. None: pack at ``packing_density``, compress and equilibrate in NPT at
        ``pressure`` bar for ``npt_steps``, rescale to the mean volume of the second half of the NPT run,
        then NVT for ``nvt_steps``. A number: pack at that density and run NVT only (no barostat).
    seed : int, packing and thermostat seed. cutoff : nm. timestep : ps. friction : 1/ps.
    platform : None (best available), a name, or an openmm.Platform.
    Returns a :class:`PolymerSystem` whose system has no barostat and whose box is the final box.
    """
    from openmm_plugin.sampling import best_platform, openmm_seed, platform_properties

    t0 = time.time()
    target = packing_density if density is None else float(density)
    L = box_length_for_density(n_chains, chain_length, target)
    if density is None:  # the box shrinks: the cutoff must fit in the box at melt density
        L_final = box_length_for_density(n_chains, chain_length, MELT_DENSITY_450K * 1.05)
        if cutoff > 0.5 * L_final:
            raise EnpcgError(f"{n_chains} chains of {chain_length} give a {L_final:.2f} nm box at melt density; "
                             f"the cutoff {cutoff} nm needs at least {2 * cutoff} nm. Use more chains or a "
                             "smaller cutoff")
    system, top = create_system(n_chains, chain_length, L, cutoff=cutoff)
    positions = pack_chains(n_chains, chain_length, L, seed=seed)
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(system.getNumParticles())])
    chains = _chain_slices(top)
    r0 = end_to_end(positions, chains)

    barostat_index = None
    if density is None:
        barostat = mm.MonteCarloBarostat(pressure * unit.bar, temperature * unit.kelvin, 25)
        barostat.setRandomNumberSeed(openmm_seed(seed + 1))
        barostat_index = system.addForce(barostat)
    integrator = mm.LangevinMiddleIntegrator(temperature, friction, timestep)
    integrator.setRandomNumberSeed(openmm_seed(seed))
    if platform is None or isinstance(platform, str):
        platform = best_platform(platform)
    sim = app.Simulation(top, system, integrator, platform, platform_properties(platform))
    sim.context.setPositions(positions)
    sim.minimizeEnergy(tolerance=10.0, maxIterations=2000)
    sim.context.setVelocitiesToTemperature(temperature, openmm_seed(seed + 2))

    volumes = []
    if density is None:
        _run_blocks(sim, npt_steps, 250, "NPT", progress,
                    lambda s: volumes.append(s.context.getState().getPeriodicBoxVolume().value_in_unit(
                        unit.nanometer**3)))
        v_mean = float(np.mean(volumes[len(volumes) // 2:]))
        st = sim.context.getState(getPositions=True, getVelocities=True)
        pos = st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        v_now = st.getPeriodicBoxVolume().value_in_unit(unit.nanometer**3)
        s = (v_mean / v_now) ** (1.0 / 3.0)
        L_new = v_mean ** (1.0 / 3.0)
        system.removeForce(barostat_index)
        sim.context.reinitialize(preserveState=False)
        sim.context.setPeriodicBoxVectors(mm.Vec3(L_new, 0, 0), mm.Vec3(0, L_new, 0), mm.Vec3(0, 0, L_new))
        sim.context.setPositions(_scale_chains(pos, chains, masses, s))
        sim.context.setVelocities(st.getVelocities())
    _run_blocks(sim, nvt_steps, 500, "NVT", progress)

    st = sim.context.getState(getPositions=True, getEnergy=True)
    box = np.array(st.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))
    pos = np.array(st.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    r1 = end_to_end(pos, chains)
    pos = wrap_chains(pos, chains, masses, box)
    system.setDefaultPeriodicBoxVectors(*[mm.Vec3(*b) for b in box])
    top.setPeriodicBoxVectors([mm.Vec3(*b) for b in box] * unit.nanometer)
    rho = density_g_cm3(masses, box)
    # density over the second half of NPT (the first half relaxes from the packing density)
    rho_npt = np.sum(masses) * AMU_NM3_TO_G_CM3 / np.array(volumes[len(volumes) // 2:]) if volumes else None
    meta = {
        "generator": "systems.polyethylene.build_melt",
        "force_field": "TraPPE-UA, flexible bonds (k_b = 217568 kJ/mol/nm^2, OPLS-UA), LJ cutoff "
                       f"{cutoff} nm + dispersion correction",
        "n_chains": n_chains, "chain_length": chain_length, "temperature_K": temperature,
        "pressure_bar": pressure if density is None else None, "seed": seed,
        "timestep_ps": timestep, "friction_per_ps": friction,
        "npt_steps": npt_steps if density is None else 0, "nvt_steps": nvt_steps,
        # density at the mean volume of the second half of NPT (the NVT box)
        "npt_density_mean_g_cm3": float(np.sum(masses) * AMU_NM3_TO_G_CM3 / v_mean) if volumes else None,
        "npt_density_std_g_cm3": float(np.std(rho_npt)) if volumes else None,
        "density_g_cm3": rho,
        "potential_energy_kJ_mol": st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
        # <R(0).R(t)>/<R^2>, R(0) the packed random walks: how far chain conformations decorrelated
        "end_to_end_autocorrelation": float(np.sum(r0 * r1) / np.sqrt(np.sum(r0 * r0) * np.sum(r1 * r1))),
        "mean_square_end_to_end_nm2": float(np.mean(np.sum(r1 * r1, axis=1))),
        "platform": platform.getName(), "openmm_version": mm.__version__,
        "wall_time_s": round(time.time() - t0, 1),
    }
    return PolymerSystem(system=system, topology=top, positions=pos, box=box, masses=masses, metadata=meta)


# --------------------------------------------------------------------------------------------- files
def reference_paths(prefix):
    """The three files of a saved reference: ``prefix.system.xml``, ``prefix.pdb``, ``prefix.json``."""
    prefix = str(prefix)
    return Path(prefix + ".system.xml"), Path(prefix + ".pdb"), Path(prefix + ".json")


def save_melt(melt: PolymerSystem, prefix):
    """Write ``prefix.system.xml`` (serialized System), ``prefix.pdb`` (positions, box, CONECT bonds) and
    ``prefix.json`` (metadata), each atomically. Returns the three paths."""
    xml_path, pdb_path, json_path = reference_paths(prefix)
    with atomic_write(xml_path) as fh:
        fh.write(mm.XmlSerializer.serialize(melt.system))
    melt.topology.setPeriodicBoxVectors([mm.Vec3(*b) for b in melt.box] * unit.nanometer)
    with atomic_write(pdb_path) as fh:
        app.PDBFile.writeFile(melt.topology, melt.positions * unit.nanometer, fh, keepIds=True)
    write_json(json_path, {**melt.metadata, "units": "nm, ps, kJ/mol, amu, K, bar, g/cm^3",
                           "n_particles": melt.n_particles})
    return xml_path, pdb_path, json_path


def load_reference(system_xml, pdb, metadata_json=None) -> PolymerSystem:
    """Load any OpenMM System (serialized XML) with its PDB (positions in nm after reading; box from CRYST1,
    else the System's default box) as a :class:`PolymerSystem`."""
    system_xml, pdb = Path(system_xml), Path(pdb)
    missing = [str(p) for p in (system_xml, pdb) if not p.exists()]
    if missing:
        raise EnpcgError(f"reference files not found: {', '.join(missing)} (System XML {system_xml}, PDB {pdb}). "
                         "Fix: check the paths, or build a melt with `python -m systems.polyethylene --out PREFIX`")
    try:
        system = mm.XmlSerializer.deserialize(system_xml.read_text())
    except Exception as e:
        raise EnpcgError(f"{system_xml}: not a serialized OpenMM System ({e})") from None
    if not isinstance(system, mm.System):
        raise EnpcgError(f"{system_xml}: holds a serialized {type(system).__name__}, not a System. Fix: write it "
                         "with openmm.XmlSerializer.serialize(system)")
    try:
        pdbfile = app.PDBFile(str(pdb))
    except Exception as e:
        raise EnpcgError(f"{pdb}: cannot read as PDB ({e})") from None
    n_sys, n_pdb = system.getNumParticles(), pdbfile.topology.getNumAtoms()
    if n_sys != n_pdb:
        raise EnpcgError(f"atom counts differ: {system_xml} has {n_sys} particles but {pdb} has {n_pdb} atoms. "
                         "Fix: pass the PDB written together with this System")
    positions = np.array(pdbfile.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
    box_system = _box_array(system.getDefaultPeriodicBoxVectors())
    vecs = pdbfile.topology.getPeriodicBoxVectors()
    box = box_system if vecs is None else _box_array(vecs)
    if np.allclose(box, box_system, atol=2e-4):  # same box: keep the System's full precision (PDB has 1e-4 nm)
        box = box_system
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(n_sys)])
    topology = pdbfile.topology
    topology.setPeriodicBoxVectors([mm.Vec3(*b) for b in box] * unit.nanometer)
    metadata = {}
    if metadata_json is not None and Path(metadata_json).exists():
        try:
            metadata = json.loads(Path(metadata_json).read_text())
        except json.JSONDecodeError as e:
            raise EnpcgError(f"{metadata_json}: not valid JSON ({e})") from None
    return PolymerSystem(system=system, topology=topology, positions=positions, box=box, masses=masses,
                         metadata=metadata)


def _box_array(vecs):
    """Box vectors (Quantity of Vec3s, or Vec3 Quantities) -> (3, 3) nm."""
    if unit.is_quantity(vecs):
        vecs = vecs.value_in_unit(unit.nanometer)
    rows = [v.value_in_unit(unit.nanometer) if unit.is_quantity(v) else v for v in vecs]
    return np.array([[r[0], r[1], r[2]] for r in rows], dtype=np.float64)


def load_melt(prefix) -> PolymerSystem:
    """Load a reference written by :func:`save_melt` from its prefix."""
    return load_reference(*reference_paths(prefix))


def default_melt() -> PolymerSystem:
    """The bundled equilibrated melt: 21 chains x 48 united atoms (1,008 sites), 450 K, 1 bar, 0.7456 g/cm^3."""
    return load_melt(DEFAULT_PREFIX)


def main(argv=None):
    p = argparse.ArgumentParser(description="Build and equilibrate a united-atom polyethylene melt "
                                            "(TraPPE-UA, flexible bonds) and save System XML + PDB + JSON.")
    p.add_argument("--out", default=str(DEFAULT_PREFIX), help="output prefix (default: the bundled melt)")
    p.add_argument("--chains", type=int, default=21)
    p.add_argument("--length", type=int, default=48, help="united atoms per chain")
    p.add_argument("--temperature", type=float, default=450.0, help="K")
    p.add_argument("--pressure", type=float, default=1.0, help="bar")
    p.add_argument("--npt-ps", type=float, default=200.0, help="NPT equilibration length (ps)")
    p.add_argument("--nvt-ps", type=float, default=100.0, help="NVT equilibration length (ps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--platform", default=None)
    a = p.parse_args(argv)
    dt = 0.002
    melt = build_melt(a.chains, a.length, a.temperature, None, a.seed, pressure=a.pressure,
                      npt_steps=int(round(a.npt_ps / dt)), nvt_steps=int(round(a.nvt_ps / dt)), timestep=dt,
                      platform=a.platform, progress=True)
    melt.metadata["command"] = "python -m systems.polyethylene " + " ".join(sys.argv[1:] if argv is None else argv)
    paths = save_melt(melt, a.out)
    m = melt.metadata
    print(f"wrote {', '.join(map(str, paths))}")
    print(f"density {m['density_g_cm3']:.4f} g/cm^3 (NPT mean {m['npt_density_mean_g_cm3']:.4f} +- "
          f"{m['npt_density_std_g_cm3']:.4f}), <R^2> {m['mean_square_end_to_end_nm2']:.3f} nm^2, "
          f"end-to-end autocorrelation {m['end_to_end_autocorrelation']:.3f}, {m['wall_time_s']} s")


if __name__ == "__main__":
    main()
