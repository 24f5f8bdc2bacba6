"""run_simulation: Langevin MD of a small periodic CG system through the CGPotential front door.

System: 32 beads (8 chains of 4) in a 2.4 nm cubic box, harmonic bonds and a soft Gaussian repulsion, as a
TorchForce. Few hundred steps, so the file runs in seconds.
"""
from typing import Optional

import torch  # before openmm: openmm-torch's kernel plugins need libtorch loaded
import mdtraj
import numpy as np
import openmm as mm
import pytest
from torch import Tensor

from enpcg.errors import EnpcgError
from enpcg.geometry import all_pairs, bond_lengths, norm, pair_vectors
from enpcg.models import create_model
from enpcg.models.base import CGModel, MODEL_REGISTRY, register_model
from enpcg.topology import CGTopology
from openmm_plugin.simulate import run_simulation
from openmm_plugin.system import CGPotential

L = 2.4
BOX = np.eye(3) * L

if "test_sim_soft_chain" not in MODEL_REGISTRY:
    @register_model("test_sim_soft_chain")
    class SoftChainModel(CGModel):
        """k/2 (r - r0)^2 bonds and eps exp(-r^2 / (2 s^2)) between non-excluded pairs, minimum image."""

        def __init__(self, topology, k: float = 1000.0, r0: float = 0.4, eps: float = 3.0, s: float = 0.3,
                     periodic: bool = True):
            super().__init__(topology)
            self.config = {"k": k, "r0": r0, "eps": eps, "s": s, "periodic": True}
            for name in ("k", "r0", "eps", "s"):
                self.register_buffer(name, torch.tensor(float(self.config[name]), dtype=torch.float64))
            self.register_buffer("bonds", torch.as_tensor(topology.bonds.reshape(-1, 2)), persistent=False)
            self.register_buffer("pairs", all_pairs(topology.n_beads, torch.as_tensor(topology.excluded_pairs())),
                                 persistent=False)

        @torch.jit.export
        def batch_energy(self, positions: Tensor, box: Optional[Tensor] = None) -> Tensor:
            r = norm(pair_vectors(positions, self.pairs[:, 0], self.pairs[:, 1], box))
            e = (self.eps * torch.exp(-r * r / (2.0 * self.s * self.s))).sum(1)
            b = bond_lengths(positions, self.bonds, box)
            return e + (0.5 * self.k * (b - self.r0) ** 2).sum(1)


def melt(n_chains=8, length=4, seed=0):
    names, mol, bonds = [], [], []
    rng = np.random.default_rng(seed)
    pos = []
    for c in range(n_chains):
        x = rng.uniform(0, L, 3)
        for i in range(length):
            names.append(f"C{i}")
            mol.append(c)
            pos.append(x.copy())
            x = x + np.array([0.4, 0.0, 0.0]) @ np.linalg.qr(rng.normal(size=(3, 3)))[0]
        bonds += [[c * length + i, c * length + i + 1] for i in range(length - 1)]
    top = CGTopology(bead_names=names, bead_types=["C"] * len(names), masses=[14.0] * len(names),
                     molecule_index=mol, bonds=bonds, residue_names=["PE"] * n_chains)
    return top, np.array(pos)


def test_run_simulation_outputs_and_temperature(tmp_path):
    """600 steps of 5 fs at 450 K, friction 10/ps, frames every 10 steps, on the CPU platform.

    Checks: the DCD holds steps/report_interval = 60 frames of 32 beads that mdtraj reads with the PDB, with
    the 2.4 nm box; log.csv has 60 rows; no temporary file is left; the mean temperature of the second half
    (30 frames 0.05 ps apart, 3*32-3 = 93 degrees of freedom: per-frame sd 450*sqrt(2/93) = 66 K; the
    kinetic energy decorrelates in ~1/(2 friction) = 0.05 ps, so ~30 independent samples, standard error
    ~12 K) is within 10 % of 450 K (45 K, ~3.7 standard errors).
    """
    top, x = melt()
    potential = CGPotential(create_model("test_sim_soft_chain", top))
    system = potential.create_system(top, box=BOX)
    mm_top = top.to_openmm_topology(BOX)
    top.write_pdb(tmp_path / "cg.pdb", x, box=BOX)
    platform = "CPU" if "CPU" in [mm.Platform.getPlatform(i).getName()
                                  for i in range(mm.Platform.getNumPlatforms())] else "Reference"
    out = run_simulation(system, mm_top, x, BOX, tmp_path / "md", steps=600, timestep=0.005, temperature=450.0,
                         friction=10.0, report_interval=10, platform=platform, seed=1, progress=False)
    assert out["n_frames"] == 60 and out["platform"] == platform and out["ns_per_day"] > 0
    traj = mdtraj.load(str(out["trajectory"]), top=str(tmp_path / "cg.pdb"))
    assert traj.n_frames == 60 and traj.n_atoms == top.n_beads
    assert np.allclose(traj.unitcell_lengths, L, atol=1e-4)
    rows = np.loadtxt(out["log"], delimiter=",")  # '#' header line is skipped
    header = out["log"].read_text().splitlines()[0]
    for col in ("Step", "Time (ps)", "Potential Energy (kJ/mole)", "Kinetic Energy (kJ/mole)",
                "Temperature (K)", "Speed (ns/day)"):
        assert col in header
    assert rows.shape == (60, 6)
    assert rows[-1, 0] == 600 and abs(rows[-1, 1] - 3.0) < 1e-9
    temperature = rows[30:, 4].mean()
    assert abs(temperature - 450.0) <= 45.0, temperature
    assert out["final_state"].exists() and "<State" in out["final_state"].read_text()[:200]
    leftovers = [p.name for p in (tmp_path / "md").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_interrupted_run_leaves_no_complete_looking_file(tmp_path):
    """An error mid-run leaves neither trajectory.dcd nor log.csv nor temporary files behind. The error:
    an extra force whose energy is NaN, which OpenMM's StateDataReporter refuses at the first report."""
    top, x = melt(n_chains=2)
    system = CGPotential(create_model("test_sim_soft_chain", top)).create_system(top, box=BOX)
    nan_force = mm.CustomExternalForce("sqrt(x - 100)")  # NaN for every bead at x < 100 nm
    nan_force.addParticle(0, [])
    system.addForce(nan_force)
    with pytest.raises(EnpcgError, match="NaN"):
        run_simulation(system, top.to_openmm_topology(BOX), x, BOX, tmp_path / "md", steps=50,
                       report_interval=5, platform="Reference", minimize=False, progress=False)
    assert sorted(p.name for p in (tmp_path / "md").iterdir()) == []


def test_run_simulation_checks_inputs(tmp_path):
    top, x = melt(n_chains=2)
    system = CGPotential(create_model("test_sim_soft_chain", top)).create_system(top, box=BOX)
    with pytest.raises(EnpcgError, match=r"positions must be shape \(8, 3\)"):
        run_simulation(system, top.to_openmm_topology(BOX), x[:5], BOX, tmp_path, steps=10, progress=False)
    with pytest.raises(EnpcgError, match="steps must be a positive integer"):
        run_simulation(system, top.to_openmm_topology(BOX), x, BOX, tmp_path, steps=0, progress=False)
    with pytest.raises(EnpcgError, match="not available"):
        run_simulation(system, top.to_openmm_topology(BOX), x, BOX, tmp_path, steps=10, platform="Nope",
                       progress=False)


def test_blow_up_is_a_clear_error(tmp_path):
    """A time step far too large (2 ps for 14 amu beads on stiff springs) makes OpenMM give NaN coordinates;
    run_simulation turns that into an EnpcgError naming the step and the fix, and leaves no output files."""
    top, x = melt(n_chains=2)
    system = CGPotential(create_model("test_sim_soft_chain", top)).create_system(top, box=BOX)
    stiff = mm.HarmonicBondForce()
    for i, j in top.bonds:
        stiff.addBond(int(i), int(j), 0.2, 1e7)  # stretched far from 0.4 nm: huge forces at the start
    system.addForce(stiff)
    with pytest.raises(EnpcgError, match=r"failed at step \d+ of 500.*smaller time step"):
        run_simulation(system, top.to_openmm_topology(BOX), x, BOX, tmp_path / "md", steps=500, timestep=2.0,
                       report_interval=10, platform="Reference", minimize=False, progress=False)
    assert sorted(p.name for p in (tmp_path / "md").iterdir()) == []
