"""Known-answer coarse-grained data: a CG potential with known parameters, sampled by Langevin MD in OpenMM.

Used by the fitting tests (splines, priors, neural models): a fit to these data must recover the parameters
the data were generated with. Units: nm, ps, kJ/mol, amu, K.

Kinds
-----
``"lj_dimers"``  periodic fluid of dimers: harmonic bond (k, r0) inside each dimer, Lennard-Jones (epsilon,
                 sigma) between beads of different dimers, cut at ``cutoff`` and shifted to zero there
                 (energy shift only). One bead type "A"; the bonded pair is excluded (exclusion_bonds=1).
``"polymer_melt"`` periodic melt of 21 linear chains of 12 beads (one type "C"): harmonic bonds and angles,
                 periodic torsions and LJ between beads more than 2 bonds apart (cut and shifted), at about
                 11 beads/nm^3 (a united-atom polyethylene melt mapped 3:1 has this density).
``"ideal_chains"`` non-periodic linear chains with harmonic bonds, harmonic angles and a periodic torsion
                 (n = 1 and 3), no nonbonded interactions: every internal coordinate is sampled exactly from
                 its Boltzmann distribution (bond P(r) ~ r^2 exp(-U/kT), angle P ~ sin(theta) exp(-U/kT)).

Forces are the exact forces of the sampled configurations from the OpenMM context; ``forces`` adds Gaussian
noise of ``noise`` times the RMS force component to each component (``forces_exact`` is kept).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from enpcg.topology import CGTopology

KB = 0.008314462618  # kJ/mol/K


@dataclass
class KnownAnswerData:
    """Sampled CG data and the parameters that generated them.

    positions : (F, n, 3) float64 nm; forces, forces_exact : (F, n, 3) float64 kJ/mol/nm;
    box : (F, 3, 3) float64 nm or None (non-periodic); temperature : K; params : dict of the potential's
    parameters (nm, kJ/mol, rad); noise_sigma : kJ/mol/nm, standard deviation of the added noise.
    """

    kind: str
    topology: CGTopology
    positions: np.ndarray
    forces: np.ndarray
    forces_exact: np.ndarray
    box: np.ndarray | None
    temperature: float
    params: dict = field(default_factory=dict)
    noise_sigma: float = 0.0

    @property
    def kT(self) -> float:
        """k_B T in kJ/mol."""
        return KB * self.temperature


# ------------------------------------------------------------------------------------------- systems
LJ_DIMERS = {"bond_k": 5000.0, "bond_r0": 0.38, "epsilon": 4.0, "sigma": 0.35, "cutoff": 0.8,
             "mass": 50.0, "density": 8.0}
IDEAL_CHAINS = {"bond_k": 4000.0, "bond_r0": 0.40, "angle_k": 40.0, "theta0": 2.0,
                "torsion_k": [1.5, 0.0, 0.6], "torsion_delta": [0.0, 0.0, np.pi], "beads_per_chain": 6,
                "mass": 50.0}


def _lj_dimers(n_molecules, rng):
    import openmm

    p = LJ_DIMERS
    n = 2 * n_molecules
    width = (n / p["density"]) ** (1.0 / 3.0)
    top = CGTopology([f"A{i % 2 + 1}" for i in range(n)], ["A"] * n, np.full(n, p["mass"]),
                     np.repeat(np.arange(n_molecules), 2), [(2 * m, 2 * m + 1) for m in range(n_molecules)],
                     residue_names=["DIM"] * n_molecules, exclusion_bonds=1)
    system = openmm.System()
    for _ in range(n):
        system.addParticle(p["mass"])
    box = np.eye(3) * width
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*b) for b in box])
    bonds = openmm.HarmonicBondForce()
    bonds.setUsesPeriodicBoundaryConditions(True)
    for i, j in top.bonds:
        bonds.addBond(int(i), int(j), p["bond_r0"], p["bond_k"])
    system.addForce(bonds)
    # Cut-and-shifted LJ: the energy shift changes no force, so NonbondedForce's plain cutoff (fast SIMD
    # kernels; zero charges, no dispersion correction) samples the same ensemble with the same forces.
    lj = openmm.NonbondedForce()
    for _ in range(n):
        lj.addParticle(0.0, p["sigma"], p["epsilon"])
    for i, j in top.excluded_pairs():
        lj.addException(int(i), int(j), 0.0, 1.0, 0.0)
    lj.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    lj.setCutoffDistance(p["cutoff"])
    lj.setUseDispersionCorrection(False)
    lj.setUseSwitchingFunction(False)
    system.addForce(lj)
    # Dimers on a cubic lattice, random orientations.
    per_side = int(np.ceil(n_molecules ** (1.0 / 3.0)))
    grid = (np.stack(np.meshgrid(*[np.arange(per_side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n_molecules]
            + 0.5) * (width / per_side)
    axis = rng.normal(size=(n_molecules, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    half = 0.5 * p["bond_r0"] * axis
    pos = np.stack([grid - half, grid + half], axis=1).reshape(n, 3)
    return system, top, pos, box, dict(p)


POLYMER_MELT = {"bond_k": 8000.0, "bond_r0": 0.25, "angle_k": 60.0, "theta0": 2.0,
                "torsion_k": [1.0, 0.0, 1.5], "torsion_delta": [0.0, 0.0, 0.0], "epsilon": 2.0, "sigma": 0.40,
                "cutoff": 1.0, "beads_per_chain": 12, "mass": 42.0, "density": 11.0}


def _polymer_melt(n_molecules, rng):
    import openmm

    p = POLYMER_MELT
    m = p["beads_per_chain"]
    width = (n_molecules * m / p["density"]) ** (1.0 / 3.0)
    box = np.eye(3) * width
    top, pos = random_chains(n_molecules, ["C"] * m, box=box, seed=int(rng.integers(2 ** 31)), bond=p["bond_r0"],
                             min_distance=0.3, exclusion_bonds=2)
    top.residue_names = ["PLY"] * n_molecules
    system = openmm.System()
    for _ in range(top.n_beads):
        system.addParticle(p["mass"])
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*b) for b in box])
    bf = openmm.HarmonicBondForce()
    for i, j in top.bonds:
        bf.addBond(int(i), int(j), p["bond_r0"], p["bond_k"])
    af = openmm.HarmonicAngleForce()
    for i, j, k in top.angles:
        af.addAngle(int(i), int(j), int(k), p["theta0"], p["angle_k"])
    tf = openmm.PeriodicTorsionForce()
    for quad in top.dihedrals:
        for mult, (k, d) in enumerate(zip(p["torsion_k"], p["torsion_delta"]), start=1):
            if k:
                tf.addTorsion(*[int(a) for a in quad], mult, d, k)
    lj = openmm.NonbondedForce()  # the energy shift of cut-and-shifted LJ changes no force
    for _ in range(top.n_beads):
        lj.addParticle(0.0, p["sigma"], p["epsilon"])
    for i, j in top.excluded_pairs():
        lj.addException(int(i), int(j), 0.0, 1.0, 0.0)
    lj.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    lj.setCutoffDistance(p["cutoff"])
    lj.setUseDispersionCorrection(False)
    for f in (bf, af, tf):
        f.setUsesPeriodicBoundaryConditions(True)
        system.addForce(f)
    system.addForce(lj)
    return system, top, pos, box, dict(p)


def _ideal_chains(n_molecules, rng):
    import openmm

    p = IDEAL_CHAINS
    m = p["beads_per_chain"]
    n = m * n_molecules
    bonds, angles, dihedrals = [], [], []
    for c in range(n_molecules):
        o = c * m
        bonds += [(o + i, o + i + 1) for i in range(m - 1)]
        angles += [(o + i, o + i + 1, o + i + 2) for i in range(m - 2)]
        dihedrals += [(o + i, o + i + 1, o + i + 2, o + i + 3) for i in range(m - 3)]
    top = CGTopology([f"C{i % m + 1}" for i in range(n)], ["C"] * n, np.full(n, p["mass"]),
                     np.repeat(np.arange(n_molecules), m), bonds, angles, dihedrals,
                     residue_names=["CHN"] * n_molecules, exclusion_bonds=3)
    system = openmm.System()
    for _ in range(n):
        system.addParticle(p["mass"])
    bf = openmm.HarmonicBondForce()
    for i, j in bonds:
        bf.addBond(i, j, p["bond_r0"], p["bond_k"])
    af = openmm.HarmonicAngleForce()
    for i, j, k in angles:
        af.addAngle(i, j, k, p["theta0"], p["angle_k"])
    tf = openmm.PeriodicTorsionForce()
    for quad in dihedrals:
        for mult, (k, d) in enumerate(zip(p["torsion_k"], p["torsion_delta"]), start=1):
            if k:
                tf.addTorsion(*quad, mult, d, k)
    for f in (bf, af, tf):
        system.addForce(f)
    # Zig-zag chains spaced 3 nm apart (they never interact).
    pos = np.zeros((n, 3))
    for c in range(n_molecules):
        origin = np.array([c % 5, (c // 5) % 5, c // 25], dtype=float) * 3.0
        for i in range(m):
            pos[c * m + i] = origin + [0.33 * i, 0.23 * (i % 2), 0.05 * ((i // 2) % 2)]
    return system, top, pos + 0.01 * rng.normal(size=pos.shape), None, dict(p)


_BUILDERS = {"lj_dimers": (_lj_dimers, 189), "ideal_chains": (_ideal_chains, 40), "polymer_melt": (_polymer_melt, 21)}


@functools.lru_cache(maxsize=8)
def make_known_answer_data(kind: str = "lj_dimers", n_frames: int = 200, noise: float = 2.0, seed: int = 0, *,
                           n_molecules: int | None = None, temperature: float = 300.0, stride: int = 50,
                           equilibration: int = 4000, timestep: float = 0.01, friction: float = 5.0,
                           platform: str = "CPU") -> KnownAnswerData:
    """Sample ``n_frames`` configurations of a known CG potential by Langevin MD in OpenMM.

    kind : "lj_dimers" (189 dimers by default), "polymer_melt" (21 chains of 12 beads) or "ideal_chains"
        (40 chains of 6 beads by default);
    noise : noise standard deviation in units of the RMS exact force component (0 for none);
    stride : MD steps between frames (timestep ps, friction 1/ps); equilibration : steps before the first.
    The result is cached per argument set; its arrays are read-only.
    """
    import openmm

    if kind not in _BUILDERS:
        raise ValueError(f"unknown known-answer kind {kind!r}; choose one of {sorted(_BUILDERS)}")
    build, default_n = _BUILDERS[kind]
    rng = np.random.default_rng(seed)
    system, top, pos, box, params = build(n_molecules or default_n, rng)
    integrator = openmm.LangevinMiddleIntegrator(temperature, friction, timestep)
    integrator.setRandomNumberSeed(int(seed) + 1)
    plat = openmm.Platform.getPlatformByName(platform)
    ctx = openmm.Context(system, integrator, plat)
    ctx.setPositions(pos)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 200)
    ctx.setVelocitiesToTemperature(temperature, int(seed) + 2)
    integrator.step(equilibration)
    n = top.n_beads
    xs = np.zeros((n_frames, n, 3))
    fs = np.zeros((n_frames, n, 3))
    for k in range(n_frames):
        integrator.step(stride)
        st = ctx.getState(getPositions=True, getForces=True)
        xs[k] = st.getPositions(asNumpy=True).value_in_unit(openmm.unit.nanometer)
        fs[k] = st.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer)
    sigma = float(noise) * float(np.sqrt(np.mean(fs ** 2)))
    noisy = fs + sigma * rng.normal(size=fs.shape) if sigma > 0 else fs.copy()
    boxes = None if box is None else np.broadcast_to(box, (n_frames, 3, 3)).copy()
    for arr in (xs, fs, noisy) + (() if boxes is None else (boxes,)):
        arr.setflags(write=False)
    params["temperature"] = float(temperature)
    return KnownAnswerData(kind=kind, topology=top, positions=xs, forces=noisy, forces_exact=fs, box=boxes,
                           temperature=float(temperature), params=params, noise_sigma=sigma)


# ------------------------------------------------------------------------------------------- small test systems
TRICLINIC_BOX = np.array([[2.6, 0.0, 0.0], [0.4, 2.5, 0.0], [-0.3, 0.5, 2.4]])  # nm, OpenMM reduced form


def random_chains(n_chains: int = 6, types=("A", "B", "A", "B", "A"), box=TRICLINIC_BOX, seed: int = 0,
                  bond: float = 0.4, min_distance: float = 0.33, exclusion_bonds: int = 2):
    """A CG topology of linear chains (with all bonds, angles and dihedrals) and one non-overlapping
    configuration, for model tests (not equilibrated).

    types : bead types along each chain; box : (3, 3) nm rows or None (then beads fill a 2.5 nm cube);
    bond : bond length nm (+-5 %); min_distance : nm, smallest distance between any two beads that are not
    directly bonded (minimum image). Returns (CGTopology, positions (n, 3) float64 nm).
    """
    rng = np.random.default_rng(seed)
    m = len(types)
    n = n_chains * m
    bonds = [(c * m + i, c * m + i + 1) for c in range(n_chains) for i in range(m - 1)]
    angles = [(c * m + i, c * m + i + 1, c * m + i + 2) for c in range(n_chains) for i in range(m - 2)]
    dihedrals = [(c * m + i, c * m + i + 1, c * m + i + 2, c * m + i + 3) for c in range(n_chains)
                 for i in range(m - 3)]
    top = CGTopology([f"{t}{i % m + 1}" for i, t in enumerate(list(types) * n_chains)], list(types) * n_chains,
                     np.full(n, 50.0), np.repeat(np.arange(n_chains), m), bonds, angles, dihedrals,
                     exclusion_bonds=exclusion_bonds)
    cell = np.eye(3) * 2.5 if box is None else np.asarray(box, dtype=float)
    inv = np.linalg.inv(cell)

    def too_close(p, placed, skip):
        if not placed:
            return False
        d = np.array(placed) - p
        if box is not None:
            d = d - np.round(d @ inv) @ cell
        dist = np.linalg.norm(d, axis=1)
        dist[skip] = np.inf
        return bool(np.any(dist < min_distance))

    placed = []
    for c in range(n_chains):
        for i in range(m):
            for _ in range(10000):
                if i == 0:
                    p = rng.uniform(0, 1, 3) @ cell
                else:
                    v = rng.normal(size=3)
                    p = placed[-1] + bond * rng.uniform(0.95, 1.05) * v / np.linalg.norm(v)
                skip = [len(placed) - 1] if i > 0 else []
                if not too_close(p, placed, skip):
                    break
            else:
                raise RuntimeError("random_chains: could not place a bead; lower the density")
            placed.append(p)
    return top, np.array(placed)
