"""Kob-Andersen binary Lennard-Jones glass former as an OpenMM System.

Model (W. Kob and H. C. Andersen, Phys. Rev. E 51, 4626 (1995) and 52, 4134 (1995)): an 80:20 mixture of
A and B particles of equal mass interacting through

    u_ab(r) = 4 eps_ab [(sig_ab / r)^12 - (sig_ab / r)^6] - u_ab^LJ(rc_ab)   for r < rc_ab = 2.5 sig_ab,
    u_ab(r) = 0                                                           for r >= rc_ab,

with eps_AA = 1.0, eps_AB = 1.5, eps_BB = 0.5 and sig_AA = 1.0, sig_AB = 0.8, sig_BB = 0.88 (so
rc_AA = 2.5, rc_AB = 2.0, rc_BB = 2.2). The energy is shifted to zero at each pair's own cutoff; the force
is NOT shifted (it jumps at rc_ab), there is no switching function and no long-range correction. State "N"
of the literature is number density rho = 1.2 sigma_AA^-3.

Units and the reduced-unit mapping
----------------------------------
Everything here is in OpenMM's units (nm, ps, kJ/mol, amu, K, bar). The reduced LJ units map onto them
exactly by choosing sigma_AA = 1 nm, eps_AA = 1 kJ/mol and m = 1 amu:

* length: 1 sigma_AA = 1 nm; number density rho* = rho [nm^-3] (state N: 1.2 nm^-3);
* energy: 1 eps_AA = 1 kJ/mol, so a potential energy per particle in kJ/mol IS the reduced value;
* time: tau = sigma sqrt(m / eps) = 1 nm sqrt(1 amu / (1 kJ/mol)) = 1 ps exactly (1 kJ/mol/amu =
  1 nm^2/ps^2), so lengths of runs in ps are reduced times and diffusion coefficients in nm^2/ps are
  reduced D* = D tau / sigma^2;
* temperature: T* = k_B T / eps, i.e. T [K] = T* / R with R = 0.0083144626 kJ/mol/K
  (``openmm.unit.MOLAR_GAS_CONSTANT_R``). Worked example: T* = 0.8 is 0.8 / 0.0083144626 = 96.218 K,
  T* = 2.0 is 240.544 K (:func:`temperature_kelvin`);
* pressure: P* = P sigma^3 / eps, and 1 kJ/mol/nm^3 = 1000 J / (N_A 1e-27 m^3) = 16.6054 bar, so
  P [bar] = 16.6054 P* (:func:`pressure_bar`, :func:`pressure_reduced`).

Rescaling to argon-like units: the dynamics and thermodynamics depend on sigma, eps and m only through the
reduced numbers, so a user wanting sigma_AA = 0.3405 nm, eps_AA/k_B = 119.8 K (eps = 0.99607 kJ/mol) and
m = 39.948 amu multiplies lengths by 0.3405, energies by 0.99607, temperatures T* by 119.8 K, times by
tau = sigma sqrt(m / eps) = 0.3405 sqrt(39.948 / 0.99607) ps = 2.156 ps, pressures P* by
eps / sigma^3 = 0.99607 / 0.3405^3 kJ/mol/nm^3 = 25.23 kJ/mol/nm^3 = 419.0 bar, and diffusion coefficients
D* by sigma^2 / tau = 0.0538 nm^2/ps. (The time unit of Kob and Andersen's own papers is
sqrt(m sigma^2 / (48 eps)) = tau / sqrt(48); see the tests for how their numbers are converted.)

Implementation
--------------
One ``CustomNonbondedForce`` with a per-particle parameter ``t`` (0 = A, 1 = B) and the
``CutoffPeriodic`` method at the largest pair cutoff, 2.5 nm; the pair type is s = t1 + t2 (0 = AA, 1 = AB,
2 = BB) and the per-pair constants A = 4 eps sig^12, B = 4 eps sig^6, rc and the shift u^LJ(rc) are chosen
with nested ``select(s, select(s - 1, BB, AB), AA)``; a ``step(rc - r)`` applies each pair's own cutoff.
(``Discrete2DFunction`` tables give identical energies but were measured 1.5-2x slower on the CPU platform;
a select is exact, the table values would be the same numbers.) The force is checked against a numpy double
loop on the Reference platform in ``tests/test_kob_andersen.py``.

Pressure: OpenMM has no pressure reporter. We use the virial, P = (2 K + W) / (3 V) with
W = sum_pairs r_ij . f_ij = sum_pairs [12 A r^-12 - 6 B r^-6] (r < rc_ab) and K the kinetic energy; W is
the "energy" of a second CustomNonbondedForce (same cutoffs, expression -r du/dr) evaluated in a separate
Context (:class:`VirialPressure`), so the physical System holds only the KA force. This is exact (no finite
difference, no single-precision cancellation between two large energies); the force discontinuity at rc
contributes nothing to W because the energy is continuous there. The tests check W against a numpy virial
and against a central-difference -dU/dV on one configuration.

Dynamics: :func:`equilibrate` runs Langevin dynamics (``LangevinMiddleIntegrator``, friction 1/ps by
default; any friction samples the canonical configurations, and 10/ps decorrelates U and P fastest, see the
tests); :func:`run` with ``ensemble="nve"`` uses ``VerletIntegrator`` so transport properties are not
disturbed by a thermostat, and ``"nose-hoover"`` (``NoseHooverIntegrator``, a deterministic global chain)
keeps the temperature with a negligible effect on them. The time step is 0.005 tau (:data:`TIMESTEP`):
the NVE energy drifts by ~1e-5 eps_AA per particle per tau (measured, N = 1000, CPU platform). Positions
come back unwrapped (OpenMM's ``getState`` returns each particle's continuous trajectory unless
``enforcePeriodicBox`` is set), so they can be used for mean squared displacements directly. For NVE runs,
:func:`run` takes ``total_energy`` to rescale the initial velocities so that the run sits at the canonical
mean energy of the target temperature; the mean kinetic temperature then misses it only by velocity
Verlet's O(dt^2) kinetic-energy bias (-0.3% at T* = 0.8) instead of the ~1% scatter of a single
configuration's energy. Cost: ~2 ms per step for N = 1000 on one CPU thread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import openmm as mm
from openmm import app, unit

from enpcg.errors import EnpcgError, check_int, check_positive

# --- model constants (reduced units = OpenMM units with sigma_AA = 1 nm, eps_AA = 1 kJ/mol, m = 1 amu) ---
SIGMA = np.array([[1.0, 0.8], [0.8, 0.88]])      # nm, sigma_ab (rows/columns: A, B)
EPSILON = np.array([[1.0, 1.5], [1.5, 0.5]])     # kJ/mol, eps_ab
CUTOFF_RATIO = 2.5                               # rc_ab / sigma_ab
CUTOFF = CUTOFF_RATIO * SIGMA                    # nm, per-pair cutoffs (2.5, 2.0, 2.2)
MAX_CUTOFF = float(CUTOFF.max())                 # nm, the force's global cutoff (2.5)
SHIFT = 4.0 * EPSILON * ((SIGMA / CUTOFF) ** 12 - (SIGMA / CUTOFF) ** 6)  # kJ/mol, u_LJ(rc) (subtracted)
MASS = 1.0                                       # amu, both species
FRACTION_B = 0.2                                 # number fraction of B
DENSITY = 1.2                                    # nm^-3, state "N"
TIMESTEP = 0.005                                 # ps = 0.005 tau
TAU = 1.0                                        # ps, LJ time sigma sqrt(m/eps) in these units
KB = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)  # kJ/mol/K
# 1 kJ/mol/nm^3 in bar: 1e3 J / (N_A * 1e-27 m^3) / 1e5 Pa/bar
BAR_PER_KJ_MOL_NM3 = 1e3 / (unit.AVOGADRO_CONSTANT_NA.value_in_unit(unit.mole ** -1) * 1e-27) / 1e5
TYPE_NAMES = ("A", "B")

_A = 4.0 * EPSILON * SIGMA ** 12                 # kJ/mol nm^12
_B = 4.0 * EPSILON * SIGMA ** 6                  # kJ/mol nm^6


def temperature_kelvin(t_reduced):
    """Kelvin for a reduced temperature T* = k_B T / eps_AA (eps_AA = 1 kJ/mol): T = T* / R.

    ``t_reduced`` (dimensionless, scalar or array) -> K. Example: 0.8 -> 96.218 K.
    """
    return np.asarray(t_reduced, dtype=float) / KB if np.ndim(t_reduced) else float(t_reduced) / KB


def temperature_reduced(kelvin):
    """Reduced temperature T* = R T / (1 kJ/mol) of ``kelvin`` (K, scalar or array) -> dimensionless."""
    return np.asarray(kelvin, dtype=float) * KB if np.ndim(kelvin) else float(kelvin) * KB


def pressure_bar(p_reduced):
    """Bar for a reduced pressure P* = P sigma_AA^3 / eps_AA (1 kJ/mol/nm^3 = 16.6054 bar) -> bar."""
    return np.asarray(p_reduced, dtype=float) * BAR_PER_KJ_MOL_NM3 if np.ndim(p_reduced) \
        else float(p_reduced) * BAR_PER_KJ_MOL_NM3


def pressure_reduced(p_bar):
    """Reduced pressure P* (= kJ/mol/nm^3) of ``p_bar`` (bar, scalar or array) -> dimensionless."""
    return np.asarray(p_bar, dtype=float) / BAR_PER_KJ_MOL_NM3 if np.ndim(p_bar) \
        else float(p_bar) / BAR_PER_KJ_MOL_NM3


def pair_potential(r, type_i, type_j):
    """Kob-Andersen pair energy (kJ/mol) at distances ``r`` (nm) between species ``type_i``, ``type_j``
    (0 = A, 1 = B; broadcastable integer arrays): truncated at 2.5 sigma_ab and shifted to zero there."""
    r = np.asarray(r, dtype=float)
    a, b = _A[type_i, type_j], _B[type_i, type_j]
    ir6 = r ** -6
    return np.where(r < CUTOFF[type_i, type_j], ir6 * (a * ir6 - b) - SHIFT[type_i, type_j], 0.0)


def _select(values):
    """Lepton sub-expression picking values[AA], values[AB], values[BB] by the pair type s = t1 + t2."""
    return (f"select(s, select(s - 1, {float(values[1, 1])!r}, {float(values[0, 1])!r}), "
            f"{float(values[0, 0])!r})")


def energy_expression() -> str:
    """The ``CustomNonbondedForce`` energy expression (kJ/mol; r in nm; per-particle parameter t = 0/1)."""
    return (f"step(rc - r) * (ir6 * (A * ir6 - B) - shift); ir6 = r^(-6); "
            f"A = {_select(_A)}; B = {_select(_B)}; rc = {_select(CUTOFF)}; shift = {_select(SHIFT)}; "
            f"s = t1 + t2")


def virial_expression() -> str:
    """Pair virial -r du/dr = r . f (kJ/mol) as a ``CustomNonbondedForce`` expression (same cutoffs)."""
    return (f"step(rc - r) * ir6 * (12 * A * ir6 - 6 * B); ir6 = r^(-6); "
            f"A = {_select(_A)}; B = {_select(_B)}; rc = {_select(CUTOFF)}; s = t1 + t2")


def _nonbonded(expression, types):
    force = mm.CustomNonbondedForce(expression)
    force.addPerParticleParameter("t")
    for t in types:
        force.addParticle([float(t)])
    force.setNonbondedMethod(mm.CustomNonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(MAX_CUTOFF)
    force.setUseSwitchingFunction(False)
    force.setUseLongRangeCorrection(False)
    return force


class KobAndersenSystem(NamedTuple):
    """What :func:`create_system` returns (unpacks as ``system, topology, types``)."""

    system: mm.System          # the OpenMM System (masses 1 amu, cubic box)
    topology: app.Topology     # one chain; one residue and atom per particle, named "A" or "B"
    types: np.ndarray          # (N,) int, 0 = A, 1 = B

    @property
    def box_length(self) -> float:
        """Edge of the cubic box, nm."""
        return float(self.system.getDefaultPeriodicBoxVectors()[0][0].value_in_unit(unit.nanometer))

    @property
    def n_particles(self) -> int:
        """Number of particles."""
        return int(self.system.getNumParticles())


def box_length_for(n_particles, density=DENSITY) -> float:
    """Cubic box edge (nm) holding ``n_particles`` at number ``density`` (nm^-3): (N / rho)^(1/3)."""
    n = check_int("n_particles", n_particles, 1)
    rho = check_positive("density", density, "number density in nm^-3")
    return (n / rho) ** (1.0 / 3.0)


def create_system(n_particles=1000, density=DENSITY, fraction_b=FRACTION_B) -> KobAndersenSystem:
    """Build the Kob-Andersen mixture as an OpenMM System.

    Parameters
    ----------
    n_particles : int
        Number of particles N (A first, then B). The cubic box (N / density)^(1/3) nm must be at least
        twice the 2.5 nm cutoff, i.e. N >= 150 at density 1.2.
    density : float
        Number density, nm^-3 (= reduced density rho sigma_AA^3); 1.2 is the standard state "N".
    fraction_b : float
        Number fraction of B particles (dimensionless); N_B = round(fraction_b N). 0.2 is the KA mixture.

    Returns
    -------
    KobAndersenSystem
        ``(system, topology, types)``: the System (masses 1 amu, one ``CustomNonbondedForce``, cubic periodic
        box), its Topology (same box) and the (N,) integer species array (0 = A, 1 = B).
    """
    n = check_int("n_particles", n_particles, 2)
    rho = check_positive("density", density, "number density in nm^-3")
    try:
        fb = float(fraction_b)
    except (TypeError, ValueError):
        fb = float("nan")
    if not 0.0 <= fb <= 1.0:
        raise EnpcgError(f"fraction_b: expected a number fraction in [0, 1], got {fraction_b!r}. "
                         f"Fix: pass e.g. 0.2 for the 80:20 Kob-Andersen mixture")
    box = (n / rho) ** (1.0 / 3.0)
    if box < 2.0 * MAX_CUTOFF:
        n_min = math.ceil(rho * (2.0 * MAX_CUTOFF) ** 3)
        raise EnpcgError(f"n_particles: {n} particles at density {rho} nm^-3 give a {box:.3f} nm box, smaller than "
                         f"twice the {MAX_CUTOFF} nm cutoff. Fix: use at least {n_min} particles at this density")
    n_b = int(round(fb * n))
    types = np.zeros(n, dtype=np.int64)
    types[n - n_b:] = 1

    system = mm.System()
    for _ in range(n):
        system.addParticle(MASS)
    system.addForce(_nonbonded(energy_expression(), types))
    vecs = [mm.Vec3(box, 0, 0), mm.Vec3(0, box, 0), mm.Vec3(0, 0, box)]
    system.setDefaultPeriodicBoxVectors(*vecs)

    topology = app.Topology()
    chain = topology.addChain("K")
    for t in types:
        name = TYPE_NAMES[int(t)]
        residue = topology.addResidue(name, chain)
        topology.addAtom(name, None, residue)  # no element: the particles are LJ atoms of mass 1 amu
    topology.setPeriodicBoxVectors(vecs * unit.nanometer)
    return KobAndersenSystem(system, topology, types)


def lattice_positions(n_particles, density=DENSITY, seed=0) -> np.ndarray:
    """Starting positions (N, 3), nm: a random subset of the sites of a simple cubic lattice filling the box.

    The lattice has ceil(N^(1/3)) sites per edge (spacing (N / density)^(1/3) / ceil(N^(1/3)) nm, 0.941 nm
    for N = 1000 at density 1.2, so no pair starts closer than that); sites are assigned in a random order
    (``seed``), so the A-then-B species order of :func:`create_system` lands randomly on the lattice. At
    T* = 2 the lattice melts at once: U/N is at its liquid value within ~1 tau of Langevin dynamics
    (measured; the tests melt for 3 tau).
    """
    n = check_int("n_particles", n_particles, 1)
    box = box_length_for(n, density)
    m = int(math.ceil(n ** (1.0 / 3.0) - 1e-9))
    grid = np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    sites = grid[rng.permutation(len(grid))[:n]]
    return (sites + 0.5) * (box / m)


def _platform(platform, threads):
    if isinstance(platform, mm.Platform):
        plat = platform
    else:
        names = [mm.Platform.getPlatform(i).getName() for i in range(mm.Platform.getNumPlatforms())]
        if platform not in names:
            raise EnpcgError(f"platform: {platform!r} is not an OpenMM platform here (have {names}). "
                             f"Fix: pass one of those names")
        plat = mm.Platform.getPlatformByName(platform)
    props = {}
    if threads is not None:
        if plat.getName() != "CPU":
            raise EnpcgError(f"threads: only the CPU platform takes a thread count, got threads={threads!r} with "
                             f"platform {plat.getName()!r}. Fix: leave threads=None")
        props["Threads"] = str(check_int("threads", threads, 1))
    return plat, props


class VirialPressure:
    """Instantaneous virial pressure of Kob-Andersen configurations.

    Holds its own Context (same particles and cutoffs, energy = pair virial r . f) on the given platform and
    evaluates W = sum_pairs r_ij . f_ij (kJ/mol) for a configuration; then P = (2 K + W) / (3 V) in
    kJ/mol/nm^3 (= reduced P*). The physical System is not touched.

    Parameters
    ----------
    types : (N,) int array
        Species (0 = A, 1 = B), as returned by :func:`create_system`.
    box_length : float
        Edge of the cubic box, nm (at least twice the 2.5 nm cutoff); :meth:`virial` may change it.
    platform : str or openmm.Platform
        OpenMM platform name ("Reference" is double precision; "CPU" single precision with double
        accumulation).
    threads : int or None
        CPU platform threads (None: OpenMM's default).
    """

    def __init__(self, types, box_length, platform="CPU", threads=None):
        types = np.asarray(types)
        self.n_particles = len(types)
        L = check_positive("box_length", box_length, "box edge in nm")
        system = mm.System()
        for _ in types:
            system.addParticle(MASS)
        system.addForce(_nonbonded(virial_expression(), types))
        system.setDefaultPeriodicBoxVectors(mm.Vec3(L, 0, 0), mm.Vec3(0, L, 0), mm.Vec3(0, 0, L))
        plat, props = _platform(platform, threads)
        self._context = mm.Context(system, mm.VerletIntegrator(TIMESTEP), plat, props)

    def virial(self, positions, box_length) -> float:
        """W = sum over pairs of r_ij . f_ij, kJ/mol, for ``positions`` (N, 3) nm in a cubic box of
        ``box_length`` nm (positions need not be wrapped)."""
        L = float(box_length)
        self._context.setPeriodicBoxVectors(mm.Vec3(L, 0, 0), mm.Vec3(0, L, 0), mm.Vec3(0, 0, L))
        self._context.setPositions(np.asarray(positions, dtype=float))
        e = self._context.getState(getEnergy=True).getPotentialEnergy()
        return float(e.value_in_unit(unit.kilojoule_per_mole))

    def pressure(self, positions, box_length, kinetic_energy) -> float:
        """Virial pressure (2 K + W) / (3 V), kJ/mol/nm^3 (= P*), for ``kinetic_energy`` K in kJ/mol."""
        volume = float(box_length) ** 3
        return (2.0 * float(kinetic_energy) + self.virial(positions, box_length)) / (3.0 * volume)


@dataclass
class Trajectory:
    """Frames of one :func:`run` (or :func:`equilibrate`) call.

    Attributes (units): ``times`` (F,) ps since the start of the call (the first frame is after
    ``report_interval`` steps); ``positions`` (F, N, 3) nm, unwrapped; ``potential_energy``,
    ``kinetic_energy`` (F,) kJ/mol (whole system); ``virial`` (F,) kJ/mol, W = sum r.f (NaN where not
    computed); ``bath_energy`` (F,) kJ/mol, the Nose-Hoover chain's energy (zero for the other ensembles), so
    U + K + bath is the conserved quantity of an NVE or Nose-Hoover run; ``box_length`` nm; ``types`` (N,)
    0/1; ``n_dof`` degrees of freedom used for the kinetic temperature (3N - 3 for momentum-conserving runs,
    3N for Langevin); ``final_positions``, ``final_velocities`` (N, 3) nm and nm/ps, to continue from;
    ``ensemble``; ``timestep`` ps.
    """

    times: np.ndarray
    positions: np.ndarray
    potential_energy: np.ndarray
    kinetic_energy: np.ndarray
    virial: np.ndarray
    bath_energy: np.ndarray
    box_length: float
    types: np.ndarray
    n_dof: int
    final_positions: np.ndarray
    final_velocities: np.ndarray
    ensemble: str
    timestep: float

    @property
    def n_particles(self) -> int:
        """Number of particles."""
        return len(self.types)

    @property
    def volume(self) -> float:
        """Box volume, nm^3."""
        return self.box_length ** 3

    @property
    def potential_energy_per_particle(self) -> np.ndarray:
        """U / N per frame, kJ/mol (= reduced units of eps_AA)."""
        return self.potential_energy / self.n_particles

    @property
    def temperature(self) -> np.ndarray:
        """Kinetic temperature per frame, reduced (T* = 2 K / n_dof, K in kJ/mol); Kelvin via
        :func:`temperature_kelvin`."""
        return 2.0 * self.kinetic_energy / self.n_dof

    @property
    def pressure(self) -> np.ndarray:
        """Virial pressure per frame, (2 K + W) / (3 V) in kJ/mol/nm^3 (= reduced P*); bar via
        :func:`pressure_bar`."""
        return (2.0 * self.kinetic_energy + self.virial) / (3.0 * self.volume)

    @property
    def total_energy_per_particle(self) -> np.ndarray:
        """(U + K) / N per frame, kJ/mol."""
        return (self.potential_energy + self.kinetic_energy) / self.n_particles

    @property
    def conserved_energy_per_particle(self) -> np.ndarray:
        """(U + K + Nose-Hoover bath energy) / N per frame, kJ/mol: constant up to integration error for
        "nve" and "nose-hoover" runs (not for Langevin, which exchanges energy with its bath)."""
        return (self.potential_energy + self.kinetic_energy + self.bath_energy) / self.n_particles

    def energy_drift(self) -> float:
        """Least-squares slope of :attr:`conserved_energy_per_particle`, kJ/mol per ps (= eps_AA / tau)."""
        if len(self.times) < 2:
            return 0.0
        return float(np.polyfit(self.times, self.conserved_energy_per_particle, 1)[0])

    def to_mdtraj(self, topology):
        """The frames as an ``mdtraj.Trajectory`` (unwrapped nm coordinates, cubic unit cell, times ps)."""
        import mdtraj as md

        top = md.Topology.from_openmm(topology)
        n = len(self.times)
        return md.Trajectory(self.positions.astype(np.float32), top, time=self.times,
                             unitcell_lengths=np.full((n, 3), self.box_length),
                             unitcell_angles=np.full((n, 3), 90.0))


_ENSEMBLES = ("nve", "langevin", "nose-hoover")


def _make_integrator(ensemble, temperature_k, timestep, friction, collision_frequency, seed, n):
    if ensemble == "nve":
        return mm.VerletIntegrator(timestep)
    if ensemble == "langevin":
        integrator = mm.LangevinMiddleIntegrator(temperature_k, friction, timestep)
        integrator.setRandomNumberSeed(int(seed))
        return integrator
    # Without a CMMotionRemover OpenMM's Nose-Hoover chain drives K to 3N kT/2, but the total momentum is
    # zero and conserved, so only 3N - 3 degrees of freedom carry it: aim at T (3N - 3)/(3N) so that those
    # sit at T (a 0.1% correction at N = 1000, i.e. 0.1% in P at T* = 0.8).
    return mm.NoseHooverIntegrator(temperature_k * (3 * n - 3) / (3 * n), collision_frequency, timestep)


def _maxwell_boltzmann(n, temperature, rng, zero_momentum):
    """Velocities (nm/ps) at reduced ``temperature`` for unit masses, rescaled to exactly that kinetic T."""
    v = rng.normal(scale=math.sqrt(temperature / MASS), size=(n, 3))
    if zero_momentum:
        v -= v.mean(axis=0)
    dof = 3 * n - (3 if zero_momentum else 0)
    return v * math.sqrt(temperature * dof / (MASS * np.sum(v * v)))


def run(system, positions, temperature, steps, report_interval, *, velocities=None, ensemble="nve",
        total_energy=None, friction=1.0, collision_frequency=1.0, timestep=TIMESTEP, compute_pressure=True,
        platform="CPU", threads=None, seed=0, progress=True) -> Trajectory:
    """Integrate the Kob-Andersen System and record frames.

    Parameters
    ----------
    system : KobAndersenSystem
        From :func:`create_system`.
    positions : (N, 3) array
        Starting positions, nm.
    temperature : float
        REDUCED temperature T* (Kelvin = T* / R, :func:`temperature_kelvin`): the bath temperature for
        Langevin / Nose-Hoover, and the temperature of fresh Maxwell-Boltzmann velocities when
        ``velocities`` is None.
    steps : int
        Number of time steps (each ``timestep`` ps).
    report_interval : int
        Steps between frames; must divide ``steps``.
    velocities : (N, 3) array or None
        Starting velocities, nm/ps; None draws them (seeded) at ``temperature``.
    ensemble : {"nve", "langevin", "nose-hoover"}
        "nve": ``VerletIntegrator`` (velocity Verlet); the total momentum is removed from the starting
        velocities, so the kinetic temperature uses 3N - 3 degrees of freedom. "langevin":
        ``LangevinMiddleIntegrator`` with ``friction`` (1/ps), 3N degrees of freedom. "nose-hoover":
        ``NoseHooverIntegrator`` (chain of 3) with ``collision_frequency`` (1/ps), 3N - 3.
    total_energy : float or None
        NVE only: total energy U + K, kJ/mol, to start from; the starting velocities are rescaled so that
        K = total_energy - U(positions). Pass N (<U>_T + (3N - 3) T* / 2) to sit at temperature T*.
    friction, collision_frequency : float
        1/ps, see ``ensemble``.
    timestep : float
        ps (default 0.005 = 0.005 tau).
    compute_pressure : bool
        Evaluate the virial W for each frame (one extra force evaluation per frame); otherwise NaN.
    platform : str or openmm.Platform
        OpenMM platform ("CPU" by default; "Reference" for double precision).
    threads : int or None
        CPU threads (None: OpenMM's default).
    seed : int
        Seeds the Langevin noise and drawn velocities.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    Trajectory
        ``steps / report_interval`` frames; see :class:`Trajectory` for units.
    """
    from tqdm.auto import tqdm

    if not isinstance(system, KobAndersenSystem):
        raise EnpcgError(f"system: expected the KobAndersenSystem from create_system(), got {type(system).__name__}. "
                         f"Fix: build it with systems.kob_andersen.create_system()")
    if ensemble not in _ENSEMBLES:
        raise EnpcgError(f"ensemble: expected one of {_ENSEMBLES}, got {ensemble!r}. Fix: pick one of those")
    steps = check_int("steps", steps, 1)
    report_interval = check_int("report_interval", report_interval, 1)
    if steps % report_interval:
        raise EnpcgError(f"report_interval: {report_interval} does not divide steps={steps}. "
                         f"Fix: make steps a multiple of report_interval")
    t_red = check_positive("temperature", temperature, "reduced temperature (T* = k_B T / eps_AA)")
    timestep = check_positive("timestep", timestep, "time step in ps")
    n = system.n_particles
    positions = np.asarray(positions, dtype=float)
    if positions.shape != (n, 3) or not np.all(np.isfinite(positions)):
        raise EnpcgError(f"positions: expected a finite ({n}, 3) array in nm, got shape {positions.shape}. "
                         f"Fix: pass lattice_positions(...) or the final_positions of a previous run")
    if total_energy is not None and ensemble != "nve":
        raise EnpcgError(f"total_energy: only an NVE run can be started at a given energy, got ensemble={ensemble!r}. "
                         f"Fix: drop total_energy or use ensemble='nve'")

    zero_momentum = ensemble != "langevin"
    rng = np.random.default_rng(seed)
    if velocities is None:
        v = _maxwell_boltzmann(n, t_red, rng, zero_momentum)
    else:
        v = np.array(velocities, dtype=float)
        if v.shape != (n, 3) or not np.all(np.isfinite(v)):
            raise EnpcgError(f"velocities: expected a finite ({n}, 3) array in nm/ps, got shape {v.shape}. "
                             f"Fix: pass the final_velocities of a previous run or None")
        if zero_momentum:
            v -= v.mean(axis=0)  # equal masses: zero total momentum, so Verlet keeps it zero
    plat, props = _platform(platform, threads)
    temperature_k = t_red / KB
    integrator = _make_integrator(ensemble, temperature_k, timestep, friction, collision_frequency, seed, n)
    context = mm.Context(system.system, integrator, plat, props)
    context.setPositions(positions)
    if total_energy is not None:
        u0 = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        k_target = float(total_energy) - u0
        if not k_target > 0:
            raise EnpcgError(f"total_energy: {total_energy} kJ/mol is below the starting potential energy {u0:.3f} "
                             f"kJ/mol, so no kinetic energy is left. Fix: pass N (<U> + (3N - 3) T*/2)")
        v *= math.sqrt(2.0 * k_target / (MASS * np.sum(v * v)))
    context.setVelocities(v)
    box = system.box_length
    virial = VirialPressure(system.types, box, plat, props.get("Threads") and int(props["Threads"])) \
        if compute_pressure else None
    n_frames = steps // report_interval
    times = np.empty(n_frames)
    pos = np.empty((n_frames, n, 3))
    pot = np.empty(n_frames)
    kin = np.empty(n_frames)
    vir = np.full(n_frames, np.nan)
    bath = np.zeros(n_frames)
    state = None
    for k in tqdm(range(n_frames), desc=f"KA {ensemble} T*={t_red:g}", disable=not progress, leave=False):
        integrator.step(report_interval)
        state = context.getState(getPositions=True, getVelocities=True, getEnergy=True)
        times[k] = (k + 1) * report_interval * timestep
        # enforcePeriodicBox is off: OpenMM returns each particle's continuous (unwrapped) trajectory
        pos[k] = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        pot[k] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        kin[k] = state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
        if virial is not None:
            vir[k] = virial.virial(pos[k], box)
        if ensemble == "nose-hoover":
            bath[k] = integrator.computeHeatBathEnergy().value_in_unit(unit.kilojoule_per_mole)
    final_v = state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
    n_dof = 3 * n - 3 if zero_momentum else 3 * n
    return Trajectory(times=times, positions=pos, potential_energy=pot, kinetic_energy=kin, virial=vir,
                      bath_energy=bath, box_length=box, types=np.asarray(system.types).copy(), n_dof=n_dof,
                      final_positions=pos[-1].copy(), final_velocities=np.asarray(final_v), ensemble=ensemble,
                      timestep=timestep)


def equilibrate(system, positions, temperature, steps, *, velocities=None, report_interval=None, friction=1.0,
                timestep=TIMESTEP, compute_pressure=True, platform="CPU", threads=None, seed=0,
                progress=True) -> Trajectory:
    """Langevin (``LangevinMiddleIntegrator``) equilibration at reduced ``temperature``; see :func:`run`.

    ``friction`` is in 1/ps (= 1/tau), ``timestep`` in ps, ``steps`` the number of steps. ``report_interval``
    (steps, default: ``steps``, i.e. one frame at the end) sets how often U, K and the virial are recorded;
    configurational averages over the later frames are canonical at T*. Continue from ``final_positions`` and
    ``final_velocities`` of the returned :class:`Trajectory`.
    """
    return run(system, positions, temperature, steps, steps if report_interval is None else report_interval,
               velocities=velocities, ensemble="langevin", friction=friction, timestep=timestep,
               compute_pressure=compute_pressure, platform=platform, threads=threads, seed=seed,
               progress=progress)
