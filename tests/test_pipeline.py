"""End to end through the `enpcg` command line on a small melt (6 chains x 48 united atoms).

Every stage runs for real (OpenMM MD, mapping, fits, export, CG MD, analysis); the checks are on the files
each stage writes and on the physics that joins them: the exported System gives the same forces as the
Python model and as `CGPotential.create_system` (||dF||/||F|| <= 1e-6, float64 Reference platform).
"""
import json

import numpy as np
import pytest
import yaml

import torch  # noqa: F401  (before openmm: openmm-torch kernels need libtorch loaded)
import openmm
from openmm import unit

from enpcg.cli import main
from enpcg.h5md import read_h5md
from enpcg.models import energy_and_forces, load_model
from enpcg.topology import CGTopology
from openmm_plugin.system import CGPotential, load_system


def run_cli(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Build, sample, map and fit once; the tests below read the outputs."""
    d = tmp_path_factory.mktemp("pipeline")
    assert run_cli("build", "--out", d / "melt", "--n-chains", 6, "--equilibration-ps", 4, "--seed", 3) == 0
    assert run_cli("sample", "--reference", d / "melt", "--out", d / "aa.h5", "--n-frames", 24,
                   "--interval-steps", 50, "--equilibration-steps", 200) == 0
    assert run_cli("map", "--input", d / "aa.h5", "--out", d / "cg") == 0
    for kind in ("priors", "spline", "neural"):
        args = ["fit", "--model", kind, "--data", d / "cg" / "cg.h5", "--out", d / kind, "--cutoff", 1.0]
        if kind == "neural":
            args += ["--epochs", 2, "--prior", d / "priors"]
        assert run_cli(*args) == 0
    return d


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_stage_outputs_and_resolved_configs(work):
    d = work
    for path in ("melt/melt.system.xml", "melt/build.yaml", "aa.h5", "aa.sample.yaml", "cg/cg.h5",
                 "cg/cg_topology.json", "cg/cg.pdb", "cg/map.yaml", "spline/model.json", "spline/fit.yaml",
                 "neural/model.pt", "neural/training/history.json"):
        assert (d / path).exists(), path
    cfg = yaml.safe_load((d / "aa.sample.yaml").read_text())
    assert cfg["n_frames"] == 24 and cfg["interval_steps"] == 50  # command line overrode the defaults
    fr = read_h5md(d / "cg" / "cg.h5")
    assert fr.positions.shape == (24, 72, 3)  # 6 chains x 12 beads
    # mapped force = sum of the atomic forces of each bead: total force is conserved frame by frame
    aa = read_h5md(d / "aa.h5")
    assert np.allclose(fr.forces.sum(axis=1), aa.forces.sum(axis=1), atol=1e-8)
    meta = json.loads((d / "spline" / "model.json").read_text())["metadata"]
    assert meta["mapping_hash"] == fr.metadata["mapping_hash"]


@pytest.mark.parametrize("kind,backend", [("spline", "native"), ("spline", "torch"), ("neural", "torch"),
                                          ("priors", "python")])
def test_cli_export_matches_python_model_and_create_system(work, kind, backend):
    d = work
    out = d / f"export-{kind}-{backend}"
    assert run_cli("export", "--model", d / kind, "--backend", backend, "--topology", d / "cg" / "cg_topology.json",
                   "--pdb", d / "cg" / "cg.pdb", "--out", out) == 0
    system = load_system(out / "system.xml")
    frame = read_h5md(d / "cg" / "cg.h5", frames=[5])
    pos, box = frame.positions[0], frame.box[0]

    def forces_of(sys_):
        ctx = openmm.Context(sys_, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        ctx.setPeriodicBoxVectors(*[openmm.Vec3(*b) for b in box])
        ctx.setPositions(pos * unit.nanometer)
        return ctx.getState(getForces=True).getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)

    f_cli = forces_of(system)
    top = CGTopology.load_json(d / "cg" / "cg_topology.json")
    f_api = forces_of(CGPotential(d / kind).create_system(top, box=box, backend=backend))
    _, f_py = energy_and_forces(load_model(d / kind), pos, box)
    assert rel(f_cli, f_api) <= 1e-6
    assert rel(f_cli, f_py) <= 1e-6


def test_simulate_and_analyze(work):
    d = work
    assert run_cli("simulate", "--model", d / "spline", "--backend", "native", "--pdb", d / "cg" / "cg.pdb",
                   "--out", d / "sim", "--time-ps", 2, "--report-ps", 0.1) == 0
    assert run_cli("simulate", "--model", d / "neural", "--backend", "torch", "--pdb", d / "cg" / "cg.pdb",
                   "--out", d / "sim-nn", "--time-ps", 0.2, "--report-ps", 0.05) == 0
    assert run_cli("analyze", "--reference", d / "cg" / "cg.h5", "--topology", d / "cg" / "cg_topology.json",
                   "--trajectories", f"spline={d / 'sim' / 'trajectory.dcd'},neural={d / 'sim-nn' / 'trajectory.dcd'}",
                   "--out", d / "report") == 0
    metrics = json.loads((d / "report" / "metrics.json").read_text())
    js = metrics["models"]["spline"]["bonds"]["C4-C4"]["js"]
    assert 0.0 <= js <= np.log(2)
    assert (d / "report" / "report.md").exists() and list((d / "report").glob("*.png"))


def test_calibrate_and_simulate_with_dynamics(work):
    """enpcg calibrate fits a Langevin friction per bead type on the mapped D (here a short, plumbing-sized
    run), writes dynamics.json and diffusion.png; enpcg simulate --dynamics applies it; time_scale mode adds
    "Mapped time (ps)" = s x time to the log (1e-5 relative)."""
    d = work
    common = ["--model", d / "spline", "--backend", "native", "--pdb", d / "cg" / "cg.pdb", "--reference",
              d / "cg" / "cg.h5", "--topology", d / "cg" / "cg_topology.json", "--temperature", 450,
              "--time-ps", 4, "--report-ps", 0.05, "--timestep", 0.005]
    assert run_cli("calibrate", *common, "--out", d / "dyn", "--max-runs", 2) == 0
    cal = json.loads((d / "dyn" / "dynamics.json").read_text())
    assert cal["mode"] == "friction" and cal["frictions"]["C4"] > 0 and len(cal["history"]) >= 1
    assert cal["raw_speed_up"]["C4"] > 0 and (d / "dyn" / "diffusion.png").exists()
    assert run_cli("simulate", "--model", d / "spline", "--backend", "native", "--pdb", d / "cg" / "cg.pdb",
                   "--out", d / "sim-dyn", "--time-ps", 0.5, "--report-ps", 0.1, "--timestep", 0.005,
                   "--dynamics", d / "dyn" / "dynamics.json") == 0
    assert run_cli("calibrate", *common, "--out", d / "dyn-ts", "--mode", "time_scale") == 0
    s = json.loads((d / "dyn-ts" / "dynamics.json").read_text())["time_scale"]
    assert run_cli("simulate", "--model", d / "spline", "--backend", "native", "--pdb", d / "cg" / "cg.pdb",
                   "--out", d / "sim-ts", "--time-ps", 0.5, "--report-ps", 0.1, "--timestep", 0.005,
                   "--dynamics", d / "dyn-ts" / "dynamics.json") == 0
    rows = np.genfromtxt(d / "sim-ts" / "log.csv", delimiter=",", names=True)
    assert np.allclose(rows["Mapped_time_ps"], s * rows["Time_ps"], rtol=1e-5)


# ------------------------------------------------------------------------------------------- bad input
def test_unknown_config_key_is_rejected(work, tmp_path, capsys):
    cfg = tmp_path / "fit.yaml"
    cfg.write_text("model: spline\nknots: 12\n")
    assert run_cli("fit", "--config", cfg, "--out", tmp_path / "m") == 2
    err = capsys.readouterr().err
    assert "knots" in err and str(cfg) in err and "allowed" in err
    assert not (tmp_path / "m").exists()


def test_config_file_and_override(work, tmp_path):
    cfg = tmp_path / "fit.yaml"
    cfg.write_text("model: priors\ntemperature: 400\n")
    assert run_cli("fit", "--config", cfg, "--data", work / "cg" / "cg.h5", "--out", tmp_path / "m",
                   "--temperature", 450) == 0
    resolved = yaml.safe_load((tmp_path / "m" / "fit.yaml").read_text())
    assert resolved["model"] == "priors" and resolved["temperature"] == 450.0


def test_fit_on_atomistic_file_is_rejected(work, tmp_path, capsys):
    assert run_cli("fit", "--data", work / "aa.h5", "--out", tmp_path / "m") == 2
    assert "topology_json" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_map_without_forces_and_bad_mapping(work, tmp_path, capsys):
    from enpcg.h5md import H5MDWriter

    aa = read_h5md(work / "aa.h5", frames=[0, 1])
    with H5MDWriter(tmp_path / "noforce.h5", aa.n_particles, masses=aa.masses, with_forces=False) as w:
        w.append_many(aa.positions, None, aa.box, aa.time, aa.step)
    assert run_cli("map", "--input", tmp_path / "noforce.h5", "--out", tmp_path / "cg1") == 2
    assert "force" in capsys.readouterr().err
    assert not (tmp_path / "cg1").exists() or not any((tmp_path / "cg1").iterdir())
    bad = tmp_path / "bad.yaml"
    bad.write_text("molecules:\n  - name: PE\n    count: 6\n    n_atoms: 48\n    beads:\n"
                   "      - {name: B1, type: C, atoms: [0, 1, 2, 3]}\n      - {name: B2, type: C, atoms: [3, 4]}\n")
    assert run_cli("map", "--input", work / "aa.h5", "--mapping", bad, "--out", tmp_path / "cg2") == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "3" in err
    assert not (tmp_path / "cg2").exists() or not any((tmp_path / "cg2").iterdir())


def test_analyze_rejects_mismatched_topology(work, tmp_path, capsys):
    top = CGTopology.load_json(work / "cg" / "cg_topology.json")
    small = CGTopology(top.bead_names[:12], top.bead_types[:12], top.masses[:12], top.molecule_index[:12],
                       bonds=top.bonds[:11])
    small.save_json(tmp_path / "small.json")
    assert run_cli("analyze", "--reference", work / "cg" / "cg.h5", "--topology", tmp_path / "small.json",
                   "--trajectories", work / "cg" / "cg.pdb", "--out", tmp_path / "rep") == 2
    assert "72" in capsys.readouterr().err
