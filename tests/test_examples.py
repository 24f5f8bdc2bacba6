"""Every script in examples/ runs (small settings), as a user would run it: a separate Python process."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run(script, *args, timeout=300):
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def pipeline_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("example")
    stdout = run("pipeline_python.py", "--out", out, "--small")
    assert "report:" in stdout
    return out


def test_every_example_is_covered():
    """A new example must be added to the tests below (oriented_methylpentane.py: tests/test_oriented_example.py;
    the glass examples: tests/test_glass_examples.py)."""
    assert {p.name for p in EXAMPLES.glob("*.py")} == {"pipeline_python.py", "openmm_script.py",
                                                        "analyze_trajectory.py", "oriented_methylpentane.py",
                                                        "polymer_glass_transition.py",
                                                        "glass_dynamics_methylpentane.py", "inverse_design.py"}


def test_pipeline_python(pipeline_out):
    assert (pipeline_out / "report" / "report.md").exists()
    assert (pipeline_out / "model" / "model.json").exists()


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_openmm_script(pipeline_out, tmp_path, backend):
    from enpcg.h5md import read_h5md

    out = tmp_path / "forces.h5"
    run("openmm_script.py", "--model", pipeline_out / "model", "--pdb", pipeline_out / "cg" / "cg.pdb",
        "--backend", backend, "--steps", 40, "--out", out)
    frames = read_h5md(out)
    assert frames.n_frames == 10 and np.all(np.isfinite(frames.forces))


def test_analyze_trajectory(pipeline_out):
    stdout = run("analyze_trajectory.py", "--reference", pipeline_out / "cg" / "cg.h5", "--topology",
                 pipeline_out / "cg" / "cg_topology.json", "--trajectory", pipeline_out / "sim" / "trajectory.dcd")
    js = float(stdout.split("JS ")[1].split()[0])
    assert 0.0 <= js <= np.log(2)


def test_inverse_design(tmp_path):
    """examples/inverse_design.py --quick: both designs print 'reached' (within 1e-4 relative of the target) and
    the history plot is written."""
    stdout = run("inverse_design.py", "--quick", "--out", tmp_path)
    assert stdout.count("reached in") == 2 and "NOT reached" not in stdout
    assert (tmp_path / "design.png").exists()
