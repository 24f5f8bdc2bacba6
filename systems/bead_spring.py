"""Bead-spring polymers in reduced Lennard-Jones units as OpenMM Systems: the Kremer-Grest melt and a
bead-spring polymer glass former.

Unit mapping (exact)
--------------------
Reduced LJ units map onto OpenMM's units with sigma = 1 nm, epsilon = 1 kJ/mol, m = 1 amu:

================  ===========================================  =====================================
quantity          reduced unit                                 OpenMM value
================  ===========================================  =====================================
length            sigma                                        1 nm
energy            epsilon                                      1 kJ/mol
mass              m                                            1 amu (g/mol)
time              tau = sigma sqrt(m / epsilon)                1 ps exactly (1e-9 m x 1e-3 s/m)
force             epsilon / sigma                              1 kJ/mol/nm
temperature       T* = k_B T / epsilon                         T = T* / R = T* / 0.0083144626 K
                                                               (T* = 1 is 120.27 K)
pressure          P* = P sigma^3 / epsilon                     1 kJ/mol/nm^3 = 16.6054 bar
number density    rho* = N sigma^3 / V                         N / V with V in nm^3
================  ===========================================  =====================================

so a length in nm, an energy in kJ/mol, a time in ps and a force in kJ/mol/nm *are* the reduced numbers;
only temperature (:func:`temperature_kelvin`, :func:`temperature_reduced`) and pressure
(:func:`pressure_bar`, :func:`pressure_reduced`) need converting (R is ``openmm.unit.MOLAR_GAS_CONSTANT_R``).

Models
------
Both models share the bond (K. Kremer and G. S. Grest, J. Chem. Phys. 92, 5057 (1990)):

* FENE, ``U_FENE(r) = -0.5 k R0^2 ln(1 - (r/R0)^2)``, k = 30 epsilon/sigma^2, R0 = 1.5 sigma (it diverges at
  r = R0; beyond it the log is undefined and the run is stopped with an :class:`EnpcgError`);
* plus the WCA repulsion ``U_WCA(r) = 4 epsilon ((sigma/r)^12 - (sigma/r)^6) + epsilon`` for
  r < 2^(1/6) sigma, zero beyond.

Bonded pairs get FENE + WCA from one ``CustomBondForce`` (force group :data:`BOND_GROUP`) and are excluded
from the pair force (force group :data:`PAIR_GROUP`). This is LAMMPS' ``bond_style fene`` with
``special_bonds fene`` (0 1 1), and for the Kremer-Grest melt it is identical to WCA between all pairs.

1. :func:`create_kremer_grest`: the Kremer-Grest melt; pair force WCA between all non-bonded pairs, number
   density 0.85, T* = 1.
2. :func:`create_polymer_glass`: the glass former; the pair force between non-bonded pairs is
   Lennard-Jones cut at 2.5 sigma and shifted to zero there,
   ``U(r) = 4 epsilon ((sigma/r)^12 - (sigma/r)^6) - U_LJ(2.5 sigma)`` (shift +0.016317 epsilon), so the
   energy is continuous at the cutoff (the force jumps by 0.039 epsilon/sigma). Bonded pairs: FENE + WCA
   only (no LJ attraction between bonded neighbours; second neighbours along the chain do feel the LJ).

Pair forces are ``CustomNonbondedForce`` with ``CutoffPeriodic`` and no long-range correction, and the bond
force uses periodic boundary conditions, so a ``MonteCarloBarostat`` can be added (:func:`equilibrate` with
``pressure=``). Every System also has a ``CMMotionRemover`` (3N - 3 degrees of freedom).

Initial positions
-----------------
Chains are random walks with bond length 0.97 sigma whose successive bond vectors make an angle of at most
~114 deg (so beads i and i+2 never overlap), started at uniform random points of the cubic box. Overlaps
between chains are removed by a soft push-off (the slow push-off idea of R. Auhl et al., J. Chem. Phys. 119,
12718 (2003), here with a cosine soft core instead of their capped LJ):
Langevin dynamics with the full FENE + WCA bonds and the capped cosine repulsion
``A (1 + cos(pi r / 2^(1/6) sigma)) / 2`` between non-bonded pairs, A ramped geometrically from 1 to
:data:`PUSH_OFF_MAX_A` epsilon; then the full pair potential is switched on with a short run at reduced time
steps (0.001 tau, then 0.0025 tau). The returned positions have chains whole (each chain's centre in the box)
and finite, moderate energy.

Dynamics
--------
:func:`equilibrate` runs ``LangevinMiddleIntegrator`` (defaults: time step 0.005 tau = 0.005 ps, friction
0.5 / tau = 0.5 / ps) on the CPU platform, checks after every block that no bond has reached R0 and that the
energy is finite, and reports the kinetic temperature, bond statistics and the closest non-bonded distance.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import openmm as mm
from openmm import app, unit

from enpcg.errors import EnpcgError, check_int, check_positive
from systems.polyethylene import _chain_id, set_cubic_box

# --------------------------------------------------------------------------------------------- constants
KB = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)  # kJ/mol/K = epsilon/K
BAR_PER_REDUCED_PRESSURE = (1.0 * unit.kilojoule_per_mole / unit.nanometer ** 3
                            / unit.AVOGADRO_CONSTANT_NA).value_in_unit(unit.bar)  # 16.6054 bar
SIGMA = 1.0                     # nm
EPSILON = 1.0                   # kJ/mol
BEAD_MASS = 1.0                 # amu
TAU = 1.0                       # ps, sigma sqrt(m / epsilon)
FENE_K = 30.0                   # kJ/mol/nm^2 (30 epsilon / sigma^2)
FENE_R0 = 1.5                   # nm (1.5 sigma), the FENE maximum extension
WCA_CUTOFF = 2.0 ** (1.0 / 6.0)  # nm, 1.12246 sigma, the LJ minimum
LJ_CUTOFF = 2.5                 # nm, pair cutoff of the glass former
LJ_SHIFT = -4.0 * (LJ_CUTOFF ** -12 - LJ_CUTOFF ** -6)  # kJ/mol, +0.0163169 epsilon added below the cutoff
KG_DENSITY = 0.85               # beads / nm^3 (sigma^-3), Kremer & Grest 1990
KG_TEMPERATURE = 1.0            # reduced
INITIAL_BOND_LENGTH = 0.97      # nm, the mean KG bond length, used for the random walks
PUSH_OFF_MAX_A = 100.0          # kJ/mol, final height parameter of the soft cosine repulsion
TIMESTEP = 0.005                # ps (0.005 tau)
FRICTION = 0.5                  # 1/ps (0.5 / tau)
BOND_GROUP = 1                  # force group of the FENE + WCA bonds
PAIR_GROUP = 2                  # force group of the non-bonded pair force

_FENE_EXPR = f"-0.5*{FENE_K}*{FENE_R0}^2*log(1 - (r/{FENE_R0})^2)"


# --------------------------------------------------------------------------------------------- units
def temperature_kelvin(t_reduced):
    """Temperature in K of the reduced temperature ``t_reduced`` = k_B T / epsilon (epsilon = 1 kJ/mol).

    T* = 1 is 1 / 0.0083144626 = 120.272 K. Accepts a number or an array; returns the same shape.
    """
    return np.asarray(t_reduced, dtype=np.float64) / KB if np.ndim(t_reduced) else float(t_reduced) / KB


def temperature_reduced(kelvin):
    """Reduced temperature k_B T / epsilon of ``kelvin`` (K), epsilon = 1 kJ/mol."""
    return np.asarray(kelvin, dtype=np.float64) * KB if np.ndim(kelvin) else float(kelvin) * KB


def pressure_bar(p_reduced):
    """Pressure in bar of the reduced pressure ``p_reduced`` = P sigma^3 / epsilon (1 kJ/mol/nm^3 = 16.6054 bar)."""
    return np.asarray(p_reduced, dtype=np.float64) * BAR_PER_REDUCED_PRESSURE if np.ndim(p_reduced) \
        else float(p_reduced) * BAR_PER_REDUCED_PRESSURE


def pressure_reduced(bar):
    """Reduced pressure P sigma^3 / epsilon of ``bar`` (bar)."""
    return np.asarray(bar, dtype=np.float64) / BAR_PER_REDUCED_PRESSURE if np.ndim(bar) \
        else float(bar) / BAR_PER_REDUCED_PRESSURE


# --------------------------------------------------------------------------------------------- potentials
def fene_energy(r):
    """FENE energy -0.5 k R0^2 ln(1 - (r/R0)^2) in kJ/mol (epsilon) at distances ``r`` in nm (sigma);
    +inf at and beyond R0 = 1.5 nm."""
    r = np.asarray(r, dtype=np.float64)
    arg = 1.0 - (r / FENE_R0) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(arg > 0, -0.5 * FENE_K * FENE_R0 ** 2 * np.log(np.where(arg > 0, arg, 1.0)), np.inf)


def wca_energy(r):
    """WCA energy 4((1/r)^12 - (1/r)^6) + 1 in kJ/mol for r < 2^(1/6) nm, 0 beyond; ``r`` in nm."""
    r = np.asarray(r, dtype=np.float64)
    x = r ** -6.0
    return np.where(r < WCA_CUTOFF, 4.0 * (x * x - x) + 1.0, 0.0)


def lj_energy(r, cutoff=LJ_CUTOFF):
    """Lennard-Jones energy 4((1/r)^12 - (1/r)^6) shifted to zero at ``cutoff`` (nm), zero beyond; kJ/mol.
    ``r`` in nm."""
    r = np.asarray(r, dtype=np.float64)
    x = r ** -6.0
    xc = float(cutoff) ** -6.0
    return np.where(r < cutoff, 4.0 * (x * x - x) - 4.0 * (xc * xc - xc), 0.0)


def bond_energy(r):
    """Energy of one bond, FENE + WCA, in kJ/mol at bond lengths ``r`` in nm (LAMMPS ``bond_style fene``)."""
    return fene_energy(r) + wca_energy(r)


# --------------------------------------------------------------------------------------------- the model
@dataclass
class BeadSpringModel:
    """A bead-spring polymer system.

    system : openmm.System (CustomBondForce FENE + WCA in force group 1, CustomNonbondedForce pair force in
        group 2, CMMotionRemover; no barostat)
    topology : openmm.app.Topology, one chain (one residue) per polymer, beads named B1, B2, ... with no
        element (masses are on the System and in ``masses``)
    positions : np.ndarray (n, 3) float64, nm (chains whole, each chain's centre of mass in the box)
    box : np.ndarray (3, 3) float64, nm, rows are box vectors
    masses : np.ndarray (n,) float64, amu (all 1)
    bonds : np.ndarray (n_chains (chain_length - 1), 2) int, bead indices of the FENE bonds
    metadata : dict (model, n_chains, chain_length, number density sigma^-3, seed, push-off record, ...)
    """

    system: mm.System
    topology: app.Topology
    positions: np.ndarray
    box: np.ndarray
    masses: np.ndarray
    bonds: np.ndarray
    metadata: dict = field(default_factory=dict)

    @property
    def n_particles(self) -> int:
        return int(self.positions.shape[0])

    @property
    def chains(self) -> list:
        """Bead indices of each chain (list of lists)."""
        return [[a.index for a in ch.atoms()] for ch in self.topology.chains()]

    def number_density(self) -> float:
        """Beads per nm^3 (= reduced number density rho* = N sigma^3 / V)."""
        return float(self.n_particles / abs(np.linalg.det(self.box)))


def _fene_bond_force():
    """FENE + WCA bond (CustomBondForce, periodic, group BOND_GROUP); energy kJ/mol, r in nm."""
    expr = f"{_FENE_EXPR} + step({WCA_CUTOFF} - r)*(4*(x^2 - x) + 1); x = (1/r)^6"
    bf = mm.CustomBondForce(expr)
    bf.setUsesPeriodicBoundaryConditions(True)
    bf.setForceGroup(BOND_GROUP)
    return bf


def _pair_force(kind):
    """Non-bonded pair force between beads (group PAIR_GROUP), ``kind`` 'wca', 'lj' (cut and shifted at 2.5)
    or 'soft' (A (1 + cos(pi r / 2^(1/6))) / 2 with global parameter A in kJ/mol)."""
    if kind == "wca":
        nb = mm.CustomNonbondedForce("4*(x^2 - x) + 1; x = (1/r)^6")
        cutoff = WCA_CUTOFF
    elif kind == "lj":
        nb = mm.CustomNonbondedForce(f"4*(x^2 - x) + {LJ_SHIFT!r}; x = (1/r)^6")
        cutoff = LJ_CUTOFF
    elif kind == "soft":
        nb = mm.CustomNonbondedForce(f"0.5*soft_a*(1 + cos({math.pi!r}*r/{WCA_CUTOFF!r}))")
        nb.addGlobalParameter("soft_a", 1.0)
        cutoff = WCA_CUTOFF
    else:  # internal
        raise ValueError(kind)
    nb.setNonbondedMethod(mm.CustomNonbondedForce.CutoffPeriodic)
    nb.setCutoffDistance(cutoff)
    nb.setUseLongRangeCorrection(False)
    nb.setUseSwitchingFunction(False)
    nb.setForceGroup(PAIR_GROUP)
    return nb


MODELS = {"kremer-grest": "wca", "polymer-glass": "lj"}


def create_system(n_chains, chain_length, box_length, model="kremer-grest"):
    """The System of ``n_chains`` linear chains of ``chain_length`` beads in a cubic box of edge ``box_length``
    nm, without positions (for known-answer checks and custom set-ups; :func:`create_kremer_grest` and
    :func:`create_polymer_glass` also build positions).

    model : 'kremer-grest' (WCA pair force) or 'polymer-glass' (LJ cut and shifted at 2.5 nm).
    chain_length may be 1 (free beads, pair force only). The box must be at least twice the pair cutoff.
    Returns (openmm.System, openmm.app.Topology, bonds (m, 2) int bead indices).
    """
    if model not in MODELS:
        raise EnpcgError(f"model must be one of {sorted(MODELS)}; you supplied {model!r}. Fix: pass "
                         "model='kremer-grest' or model='polymer-glass'")
    n_chains = check_int("n_chains", n_chains, 1, 20)
    chain_length = check_int("chain_length", chain_length, 1, 25)
    L = check_positive("box_length", box_length, "nm (sigma)", 10.0)
    pair = MODELS[model]
    cutoff = WCA_CUTOFF if pair == "wca" else LJ_CUTOFF
    if L < 2.0 * cutoff:
        raise EnpcgError(f"box_length {L} nm is less than twice the {cutoff:.4f} nm pair cutoff of the {model} "
                         f"model. Fix: use a box of at least {2.0 * cutoff:.4f} nm")
    return _build_system(n_chains, chain_length, L, pair)


def _build_system(n_chains, chain_length, box_length, pair):
    """(System, Topology, bonds (m, 2)) of ``n_chains`` linear chains of ``chain_length`` beads in a cubic box."""
    system = mm.System()
    top = app.Topology()
    bf = _fene_bond_force()
    nb = _pair_force(pair)
    resname = "KG" if pair == "wca" else "BSG"
    bonds = []
    for c in range(n_chains):
        chain = top.addChain(id=_chain_id(c))
        res = top.addResidue(resname, chain, id=str(c + 1))
        prev = None
        for k in range(chain_length):
            i = system.addParticle(BEAD_MASS)
            nb.addParticle([])
            atom = top.addAtom(f"B{k + 1}", None, res)
            if prev is not None:
                top.addBond(prev, atom)
                bf.addBond(i - 1, i, [])
                bonds.append((i - 1, i))
            prev = atom
    for i, j in bonds:
        nb.addExclusion(i, j)  # bonded pairs: FENE + WCA from the bond force only
    system.addForce(bf)
    system.addForce(nb)
    system.addForce(mm.CMMotionRemover())
    set_cubic_box(system, top, box_length)
    return system, top, np.array(bonds, dtype=np.int64).reshape(-1, 2)


def random_walk_chains(n_chains, chain_length, box_length, rng, *, bond_length=INITIAL_BOND_LENGTH,
                       min_cos=-0.4):
    """Random-walk chains in a cubic box: (n_chains chain_length, 3) nm, chains whole.

    Each chain starts at a uniform random point of the box (edge ``box_length`` nm); its bond vectors have
    length ``bond_length`` nm and uniform random directions, redrawn while the cosine between successive bond
    vectors is below ``min_cos`` (-0.4: beads i and i+2 at least 1.06 bond_length apart). ``rng`` is a numpy
    Generator.
    """
    out = np.empty((n_chains, chain_length, 3))
    for c in range(n_chains):
        out[c, 0] = rng.uniform(0.0, box_length, 3)
        prev = None
        for k in range(1, chain_length):
            while True:
                v = rng.normal(size=3)
                v /= np.linalg.norm(v)
                if prev is None or float(v @ prev) >= min_cos:
                    break
            out[c, k] = out[c, k - 1] + bond_length * v
            prev = v
    return out.reshape(-1, 3)


# --------------------------------------------------------------------------------------------- geometry
def _minimum_image(d, box):
    """Minimum image of displacement vectors ``d`` (..., 3) nm in a rectangular ``box`` (3, 3) nm."""
    lengths = np.diag(box)
    return d - lengths * np.round(d / lengths)


def bond_lengths(positions, bonds, box=None):
    """Bond lengths (nm) of ``bonds`` (m, 2) for ``positions`` (n, 3) or (n_frames, n, 3) nm; minimum image
    in the rectangular ``box`` (3, 3) nm when given. Returns (m,) or (n_frames, m)."""
    pos = np.asarray(positions, dtype=np.float64)
    b = np.asarray(bonds)
    d = pos[..., b[:, 1], :] - pos[..., b[:, 0], :]
    if box is not None:
        d = _minimum_image(d, np.asarray(box, dtype=np.float64))
    return np.linalg.norm(d, axis=-1)


def bond_statistics(positions, bonds, box=None) -> dict:
    """Bond statistics of one frame (n, 3) or of frames (n_frames, n, 3) of positions in nm (= sigma).

    bonds : (m, 2) bead indices. box : (3, 3) nm rectangular box for minimum image (optional).
    Returns a dict, averages over all bonds and frames, lengths in nm (sigma), energies in kJ/mol (epsilon):
    ``mean_bond_length``, ``rms_bond_length``, ``max_bond_length``, ``fene_energy_per_bond``,
    ``wca_energy_per_bond``, ``bond_energy_per_bond`` (FENE + WCA), ``n_bonds``, ``n_frames``.
    Raises EnpcgError when a bond is at or beyond R0 = 1.5 nm (the FENE energy is infinite there).
    """
    r = bond_lengths(positions, bonds, box)
    if not np.all(np.isfinite(r)):
        raise EnpcgError("bond_statistics: positions hold NaN or inf. Fix: pass finite positions in nm")
    if r.size and r.max() >= FENE_R0:
        k = int(np.argmax(r.reshape(-1))) % len(bonds)
        raise EnpcgError(f"bond_statistics: bond {tuple(int(x) for x in bonds[k])} has length {r.max():.4f} nm, at "
                         f"or beyond the FENE maximum extension R0 = {FENE_R0} nm, where the FENE energy is "
                         "infinite. Fix: pass unwrapped chains or the box (minimum image), or positions from a "
                         "stable run")
    fene = fene_energy(r)
    wca = wca_energy(r)
    return {"mean_bond_length": float(r.mean()), "rms_bond_length": float(np.sqrt(np.mean(r * r))),
            "max_bond_length": float(r.max()), "fene_energy_per_bond": float(fene.mean()),
            "wca_energy_per_bond": float(wca.mean()), "bond_energy_per_bond": float((fene + wca).mean()),
            "n_bonds": int(r.shape[-1]), "n_frames": 1 if r.ndim == 1 else int(r.shape[0])}


def min_nonbonded_distance(positions, bonds, box, *, search=1.0):
    """Closest distance (nm) between two beads that are not bonded (periodic, rectangular ``box`` (3, 3) nm);
    ``search`` nm is the radius searched (returns ``search`` when no pair is closer)."""
    from scipy.spatial import cKDTree

    lengths = np.diag(np.asarray(box, dtype=np.float64))
    pos = np.mod(np.asarray(positions, dtype=np.float64), lengths)
    tree = cKDTree(pos, boxsize=lengths)
    pairs = tree.query_pairs(search, output_type="ndarray")
    if len(pairs) == 0:
        return float(search)
    bonded = {(int(i), int(j)) for i, j in np.sort(np.asarray(bonds), axis=1)}
    keep = np.array([(int(i), int(j)) not in bonded for i, j in np.sort(pairs, axis=1)])
    if not keep.any():
        return float(search)
    p = pairs[keep]
    d = np.linalg.norm(_minimum_image(pos[p[:, 1]] - pos[p[:, 0]], np.asarray(box)), axis=1)
    return float(d.min())


def _whole_chains(positions, chains, box):
    """Make each chain whole by following its bonds with minimum image, then put its centre in the box."""
    out = np.asarray(positions, dtype=np.float64).copy()
    lengths = np.diag(box)
    for idx in chains:
        p = out[idx]
        d = _minimum_image(np.diff(p, axis=0), box)
        p = p[0] + np.concatenate([np.zeros((1, 3)), np.cumsum(d, axis=0)])
        centre = p.mean(axis=0)  # equal masses: centre of mass = centroid
        out[idx] = p - np.floor(centre / lengths) * lengths
    return out


# --------------------------------------------------------------------------------------------- MD core
def _platform(name, threads):
    """OpenMM platform ``name`` ('CPU' or 'Reference') and its properties (CPU: ``threads`` threads)."""
    names = [mm.Platform.getPlatform(i).getName() for i in range(mm.Platform.getNumPlatforms())]
    if name not in names:
        raise EnpcgError(f"platform must be one of {names}; you supplied {name!r}. Fix: pass platform='CPU'")
    props = {"Threads": str(check_int("threads", threads, 1, 1))} if name == "CPU" else {}
    return mm.Platform.getPlatformByName(name), props


def _box_from_state(state):
    return np.array(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))


def _check_bonds(pos, bonds, box, where, fix):
    """EnpcgError when a bond is non-finite or at/beyond R0 (the FENE log diverges)."""
    if not np.all(np.isfinite(pos)):
        raise EnpcgError(f"{where}: positions became NaN/inf (the run blew up). Fix: {fix}")
    r = bond_lengths(pos, bonds, box)
    if r.size and r.max() >= FENE_R0:
        k = int(np.argmax(r))
        raise EnpcgError(f"{where}: bond {int(bonds[k, 0])}-{int(bonds[k, 1])} is {r[k]:.4f} nm long, at or beyond the "
                         f"FENE maximum extension R0 = {FENE_R0} nm (sigma), where -0.5 k R0^2 ln(1 - (r/R0)^2) "
                         f"diverges. Fix: {fix}")
    return r


class _Runner:
    """A Langevin context with block-wise checks."""

    def __init__(self, system, positions, bonds, *, temperature, timestep, friction, seed, platform, threads,
                 velocities=None, box=None):
        from openmm_plugin.sampling import openmm_seed

        self.bonds = bonds
        self.integrator = mm.LangevinMiddleIntegrator(temperature, friction, timestep)
        self.integrator.setRandomNumberSeed(openmm_seed(seed))
        plat, props = _platform(platform, threads)
        self.context = mm.Context(system, self.integrator, plat, props)
        if box is not None:  # e.g. after an NPT run the box differs from the System's default
            self.context.setPeriodicBoxVectors(*[mm.Vec3(*row) for row in np.asarray(box, dtype=np.float64)])
        self.context.setPositions(positions)
        if velocities is None:
            self.context.setVelocitiesToTemperature(temperature, openmm_seed(seed + 7))
        else:
            self.context.setVelocities(velocities)
        self.platform_name = plat.getName()

    def run(self, steps, *, block, where, fix, on_block=None, bar=None):
        done = 0
        while done < steps:
            k = min(block, steps - done)
            try:
                self.integrator.step(k)
            except mm.OpenMMException as exc:  # e.g. "Particle coordinate is NaN"
                raise EnpcgError(f"{where}: OpenMM stopped the run ({str(exc).split('  ')[0]}); most likely a FENE "
                                 f"bond reached the maximum extension R0 = {FENE_R0} nm (sigma) within a block of "
                                 f"{k} steps, where -0.5 k R0^2 ln(1 - (r/R0)^2) diverges. Fix: {fix}") from None
            done += k
            st = self.context.getState(getPositions=True, getEnergy=True)
            pos = st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            box = _box_from_state(st)
            _check_bonds(pos, self.bonds, box, where, fix)
            e = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            if not math.isfinite(e):
                raise EnpcgError(f"{where}: the potential energy became {e}. Fix: {fix}")
            if on_block is not None:
                on_block(st, pos, box)
            if bar is not None:
                bar.update(k)


def _push_off(n_chains, chain_length, box_length, pair, rng, seed, *, push_steps, warmup_steps, platform,
              threads, progress):
    """Random walks, soft push-off and switch-on of the full ``pair`` potential; returns (positions nm, record)."""
    from tqdm import tqdm

    T = temperature_kelvin(KG_TEMPERATURE)
    pos = random_walk_chains(n_chains, chain_length, box_length, rng)
    soft_system, _, bonds = _build_system(n_chains, chain_length, box_length, "soft")
    fix = "this should not happen in the push-off; report it with the arguments (n_chains, chain_length, density)"
    total = push_steps + 2 * warmup_steps
    with tqdm(total=total, desc="push-off", disable=not progress, unit="step") as bar:
        runner = _Runner(soft_system, pos, bonds, temperature=T, timestep=TIMESTEP, friction=1.0, seed=seed,
                         platform=platform, threads=threads)
        n_ramp = max(1, push_steps // 50)
        for k in range(n_ramp):
            # geometric ramp A: 1 -> PUSH_OFF_MAX_A kJ/mol: gentle while beads overlap strongly
            runner.context.setParameter("soft_a", PUSH_OFF_MAX_A ** ((k + 1) / n_ramp))
            runner.run(max(1, push_steps // n_ramp), block=50, where="push-off (soft repulsion)", fix=fix, bar=bar)
        st = runner.context.getState(getPositions=True, getVelocities=True)
        pos = st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        vel = st.getVelocities()
        d_soft = min_nonbonded_distance(pos, bonds, np.eye(3) * box_length)
        full_system, _, _ = _build_system(n_chains, chain_length, box_length, pair)
        # full potential: short steps first, while the closest pairs (~0.8 sigma) still carry large forces
        for dt in (0.001, 0.0025):
            runner = _Runner(full_system, pos, bonds, temperature=T, timestep=dt, friction=1.0, seed=seed + 1,
                             platform=platform, threads=threads, velocities=vel)
            runner.run(warmup_steps, block=100, where="push-off (switching on the full pair potential)", fix=fix,
                       bar=bar)
            st = runner.context.getState(getPositions=True, getVelocities=True)
            pos = st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            vel = st.getVelocities()
    record = {"push_off_steps": push_steps, "push_off_timestep_ps": TIMESTEP, "push_off_max_a_kj_mol": PUSH_OFF_MAX_A,
              "min_nonbonded_distance_after_soft_nm": d_soft, "warmup_steps": [warmup_steps, warmup_steps],
              "warmup_timesteps_ps": [0.001, 0.0025]}
    return np.asarray(pos), record


def _create(pair, n_chains, chain_length, density, seed, push_steps, warmup_steps, platform, threads, progress):
    t0 = time.time()
    n_chains = check_int("n_chains", n_chains, 1, 20)
    chain_length = check_int("chain_length", chain_length, 2, 25)
    rho = check_positive("density", density, "beads per nm^3 (sigma^-3)", 0.85)
    push_steps = check_int("push_off_steps", push_steps, 0, 3000)
    warmup_steps = check_int("warmup_steps", warmup_steps, 0, 500)
    n = n_chains * chain_length
    L = (n / rho) ** (1.0 / 3.0)
    cutoff = WCA_CUTOFF if pair == "wca" else LJ_CUTOFF
    if L < 2.0 * cutoff:
        need = math.ceil((2.0 * cutoff) ** 3 * rho)
        raise EnpcgError(f"n_chains x chain_length = {n} beads at density {rho} give a {L:.3f} nm (sigma) box, less "
                         f"than twice the {cutoff:.4f} nm pair cutoff. Fix: use at least {need} beads")
    if L < 2.0 * FENE_R0:  # minimum image of the periodic bonds needs a box of at least 2 R0
        raise EnpcgError(f"{n} beads at density {rho} give a {L:.3f} nm box, less than twice the FENE R0 "
                         f"({FENE_R0} nm). Fix: use at least {math.ceil((2 * FENE_R0) ** 3 * rho)} beads")
    rng = np.random.default_rng(seed)
    pos, record = _push_off(n_chains, chain_length, L, pair, rng, seed, push_steps=push_steps,
                            warmup_steps=warmup_steps, platform=platform, threads=threads, progress=progress)
    system, top, bonds = _build_system(n_chains, chain_length, L, pair)
    box = np.eye(3) * L
    chains = [list(range(c * chain_length, (c + 1) * chain_length)) for c in range(n_chains)]
    pos = _whole_chains(pos, chains, box)
    record["min_nonbonded_distance_nm"] = min_nonbonded_distance(pos, bonds, box)
    meta = {"model": "kremer-grest" if pair == "wca" else "polymer-glass",
            "generator": f"systems.bead_spring.create_{'kremer_grest' if pair == 'wca' else 'polymer_glass'}",
            "units": "sigma = 1 nm, epsilon = 1 kJ/mol, m = 1 amu, tau = 1 ps",
            "pair": ("WCA (LJ cut at 2^(1/6) sigma, shifted by +epsilon) between non-bonded pairs" if pair == "wca"
                     else "LJ cut at 2.5 sigma and shifted to zero there, between non-bonded pairs"),
            "bond": "FENE k = 30 epsilon/sigma^2, R0 = 1.5 sigma, plus WCA (bonded pairs get no pair force)",
            "n_chains": n_chains, "chain_length": chain_length, "number_density": rho, "box_length_nm": L,
            "seed": seed, **record, "openmm_version": mm.__version__, "wall_time_s": round(time.time() - t0, 2)}
    return BeadSpringModel(system=system, topology=top, positions=pos, box=box, masses=np.full(n, BEAD_MASS),
                           bonds=bonds, metadata=meta)


def create_kremer_grest(n_chains, chain_length, density=KG_DENSITY, *, seed=0, push_off_steps=3000,
                        warmup_steps=500, platform="CPU", threads=1, progress=False) -> BeadSpringModel:
    """The Kremer-Grest melt: ``n_chains`` linear chains of ``chain_length`` beads at ``density`` beads/nm^3.

    FENE (k = 30 kJ/mol/nm^2, R0 = 1.5 nm) + WCA bonds, WCA (cut at 2^(1/6) nm, +1 kJ/mol shift) between
    all non-bonded pairs; default density 0.85 sigma^-3 (Kremer & Grest, J. Chem. Phys. 92, 5057 (1990)).
    The box must hold twice the WCA cutoff and twice R0 (at least 23 beads at 0.85).

    seed : int, random walks and push-off thermostat. push_off_steps : steps (0.005 ps each) of the soft
    push-off at T* = 1. warmup_steps : steps at 0.001 ps and again at 0.0025 ps with the full potential.
    platform, threads : OpenMM platform name ('CPU' or 'Reference') and CPU threads used for the push-off.
    Returns a :class:`BeadSpringModel` whose positions (nm) start without overlaps (see the module docstring).
    """
    return _create("wca", n_chains, chain_length, density, seed, push_off_steps, warmup_steps, platform, threads,
                   progress)


def create_polymer_glass(n_chains, chain_length, density=KG_DENSITY, *, seed=0, push_off_steps=3000,
                         warmup_steps=500, platform="CPU", threads=1, progress=False) -> BeadSpringModel:
    """The bead-spring polymer glass former: ``n_chains`` chains of ``chain_length`` beads at ``density``
    beads/nm^3 (default 0.85, a starting point for NPT runs: :func:`equilibrate` with ``pressure=``).

    Bonds as in :func:`create_kremer_grest` (FENE + WCA; bonded pairs get no pair force); non-bonded pairs
    interact by LJ (sigma = 1 nm, epsilon = 1 kJ/mol) cut at 2.5 nm and shifted to zero there. The box must
    be at least 5 nm (twice the cutoff; 107 beads at 0.85). Other arguments as in :func:`create_kremer_grest`.
    """
    return _create("lj", n_chains, chain_length, density, seed, push_off_steps, warmup_steps, platform, threads,
                   progress)


# --------------------------------------------------------------------------------------------- equilibration
@dataclass
class EquilibrationResult:
    """What :func:`equilibrate` returns.

    model : BeadSpringModel with the final positions (nm, chains whole) and box (nm); after an NPT run its
        System is a copy whose default box is the final box (the input model is never changed)
    velocities : np.ndarray (n, 3) nm/ps, final velocities
    samples : dict of arrays, one entry per sample (every ``sample_every`` steps of production):
        ``time_ps``, ``kinetic_temperature_K``, ``potential_energy_per_bead`` (kJ/mol), ``bond_energy_per_bond``
        (FENE + WCA from OpenMM's bond force group, kJ/mol), ``mean_bond_length`` (nm), ``number_density``
        (nm^-3), ``pressure_bar`` (instantaneous pressure from ``MonteCarloBarostat.computeCurrentPressure``,
        bar; only with ``pressure=``) and ``positions`` (n_samples, n, 3) nm when ``keep_positions``
    report : dict of checks on the run (see :func:`equilibrate`)
    """

    model: BeadSpringModel
    velocities: np.ndarray
    samples: dict
    report: dict


def equilibrate(model: BeadSpringModel, steps, *, temperature=None, timestep=TIMESTEP, friction=FRICTION,
                pressure=None, barostat_frequency=25, equilibration_steps=0, sample_every=0, keep_positions=False,
                seed=0, velocities=None, platform="CPU", threads=1, progress=False) -> EquilibrationResult:
    """Langevin dynamics (``LangevinMiddleIntegrator``) of a bead-spring model at ``temperature``.

    model : from :func:`create_kremer_grest` / :func:`create_polymer_glass` (or a previous result's model).
    steps : production steps (samples are taken from these). equilibration_steps : steps run first, unsampled.
    temperature : K (default T* = 1, i.e. :func:`temperature_kelvin` (1.0) = 120.27 K).
    timestep : ps (= tau; default 0.005). friction : 1/ps (= 1/tau; default 0.5).
    pressure : bar (optional): adds a MonteCarloBarostat (every ``barostat_frequency`` steps) to a copy of the
        System; use :func:`pressure_bar` for reduced pressures. The model's System is never changed.
    sample_every : steps between samples (0: no samples). keep_positions : store sampled positions.
    seed : int (thermostat and initial velocities). velocities : (n, 3) nm/ps to continue from (optional).
    platform, threads : OpenMM platform ('CPU' or 'Reference') and CPU threads.

    Raises EnpcgError when a bond reaches R0 = 1.5 nm (the FENE energy diverges), when positions or the
    energy become non-finite, or on invalid arguments. The report holds ``kinetic_temperature_K`` and
    ``kinetic_temperature_reduced`` (averaged over samples, else final), ``temperature_relative_error``,
    ``max_bond_length_nm`` (over all checked blocks), ``min_nonbonded_distance_nm`` (final frame),
    ``bond_energy_per_bond`` and ``mean_bond_length_nm`` (sample averages, else final), ``number_density``
    (final, nm^-3), ``platform``, ``steps``, ``timestep_ps``, ``friction_per_ps``, ``wall_time_s``.
    """
    from tqdm import tqdm

    t0 = time.time()
    steps = check_int("steps", steps, 0, 10000)
    equilibration_steps = check_int("equilibration_steps", equilibration_steps, 0, 2000)
    sample_every = check_int("sample_every", sample_every, 0, 100)
    T = temperature_kelvin(KG_TEMPERATURE) if temperature is None else \
        check_positive("temperature", temperature, "K", "temperature_kelvin(1.0) = 120.27")
    dt = check_positive("timestep", timestep, "ps (= tau)", 0.005)
    if dt > 0.02:
        raise EnpcgError(f"timestep {dt} ps (tau) is too large for the stiff FENE + WCA bond (period ~0.15 tau). "
                         "Fix: use 0.005-0.01 ps")
    gamma = check_positive("friction", friction, "1/ps (= 1/tau)", 0.5)
    pos0 = np.asarray(model.positions, dtype=np.float64)
    fix_start = ("start from the overlap-free positions of create_kremer_grest/create_polymer_glass (soft "
                 "push-off)")
    _check_bonds(pos0, model.bonds, model.box, "equilibrate: initial positions", fix_start)
    system = model.system
    if pressure is not None:
        P = float(pressure)
        if not math.isfinite(P):
            raise EnpcgError(f"pressure must be a finite number in bar; you supplied {pressure!r}. Fix: pass e.g. "
                             "pressure_bar(0.0)")
        system = copy.deepcopy(system)
        barostat = mm.MonteCarloBarostat(P * unit.bar, T * unit.kelvin,
                                         check_int("barostat_frequency", barostat_frequency, 1, 25))
        system.addForce(barostat)
    else:
        barostat = None
    fix = (f"use a smaller timestep (you used {dt} ps = tau; 0.005 is safe at T* = 1) or a lower temperature (you "
           f"used {T:.4g} K = T* {temperature_reduced(T):.4g}), and start from the push-off positions of "
           "create_kremer_grest/create_polymer_glass")
    runner = _Runner(system, pos0, model.bonds, temperature=T, timestep=dt, friction=gamma, seed=seed,
                     platform=platform, threads=threads, velocities=velocities, box=model.box)
    n = model.n_particles
    dof = 3 * n - 3  # CMMotionRemover removes 3
    max_bond = [0.0]
    samples = {k: [] for k in ("time_ps", "kinetic_temperature_K", "potential_energy_per_bead",
                               "bond_energy_per_bond", "mean_bond_length", "number_density")}
    if barostat is not None:
        samples["pressure_bar"] = []
    if keep_positions:
        samples["positions"] = []
    n_bonds = len(model.bonds)

    def track(st, pos, box):
        max_bond[0] = max(max_bond[0], float(bond_lengths(pos, model.bonds, box).max(initial=0.0)))

    def sample(st, pos, box):
        track(st, pos, box)
        ke = st.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
        eb = runner.context.getState(getEnergy=True, groups={BOND_GROUP}).getPotentialEnergy()
        samples["time_ps"].append(st.getTime().value_in_unit(unit.picosecond))
        samples["kinetic_temperature_K"].append(2.0 * ke / (dof * KB))
        samples["potential_energy_per_bead"].append(st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / n)
        samples["bond_energy_per_bond"].append(eb.value_in_unit(unit.kilojoule_per_mole) / max(n_bonds, 1))
        samples["mean_bond_length"].append(float(bond_lengths(pos, model.bonds, box).mean()) if n_bonds else 0.0)
        samples["number_density"].append(n / abs(np.linalg.det(box)))
        if barostat is not None:
            # instantaneous molecular-virial pressure (finite difference of the energy in the volume)
            samples["pressure_bar"].append(barostat.computeCurrentPressure(runner.context).value_in_unit(unit.bar))
        if keep_positions:
            samples["positions"].append(np.array(pos))

    with tqdm(total=equilibration_steps + steps, desc="Langevin", disable=not progress, unit="step") as bar:
        runner.run(equilibration_steps, block=500, where="equilibrate (equilibration)", fix=fix, on_block=track,
                   bar=bar)
        if sample_every:
            runner.run(steps, block=sample_every, where="equilibrate (production)", fix=fix, on_block=sample, bar=bar)
        else:
            runner.run(steps, block=500, where="equilibrate (production)", fix=fix, on_block=track, bar=bar)
    st = runner.context.getState(getPositions=True, getVelocities=True, getEnergy=True)
    pos = st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    box = _box_from_state(st)
    _check_bonds(pos, model.bonds, box, "equilibrate: final positions", fix)
    pos = _whole_chains(pos, model.chains, box)
    vel = np.array(st.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond))
    samples = {k: np.asarray(v, dtype=np.float64) for k, v in samples.items()}
    if len(samples["time_ps"]):
        t_kin = float(samples["kinetic_temperature_K"].mean())
        e_bond = float(samples["bond_energy_per_bond"].mean())
        l_bond = float(samples["mean_bond_length"].mean())
    else:
        t_kin = 2.0 * st.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole) / (dof * KB)
        stats = bond_statistics(pos, model.bonds, box) if n_bonds else {}
        e_bond = stats.get("bond_energy_per_bond", 0.0)
        l_bond = stats.get("mean_bond_length", 0.0)
    new_model = replace(model, positions=pos, box=box,
                        metadata={**model.metadata, "last_run": {"temperature_K": T, "pressure_bar": pressure,
                                                                 "steps": equilibration_steps + steps,
                                                                 "timestep_ps": dt}})
    vecs = [mm.Vec3(*row) for row in box]
    new_model.topology = copy.copy(model.topology)
    new_model.topology.setPeriodicBoxVectors(vecs * unit.nanometer)
    if not np.array_equal(box, model.box):  # NPT: a System copy whose default box is the final box
        new_model.system = copy.deepcopy(model.system)
        new_model.system.setDefaultPeriodicBoxVectors(*vecs)
    report = {"kinetic_temperature_K": t_kin, "kinetic_temperature_reduced": temperature_reduced(t_kin),
              "target_temperature_K": T, "temperature_relative_error": t_kin / T - 1.0,
              "max_bond_length_nm": max(max_bond[0], float(bond_lengths(pos, model.bonds, box).max(initial=0.0))),
              "min_nonbonded_distance_nm": min_nonbonded_distance(pos, model.bonds, box),
              "bond_energy_per_bond": e_bond, "mean_bond_length_nm": l_bond,
              "number_density": n / abs(np.linalg.det(box)), "platform": runner.platform_name,
              "steps": equilibration_steps + steps, "timestep_ps": dt, "friction_per_ps": gamma,
              "wall_time_s": round(time.time() - t0, 2)}
    return EquilibrationResult(model=new_model, velocities=vel, samples=samples, report=report)
