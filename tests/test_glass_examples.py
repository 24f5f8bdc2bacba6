"""The glass examples run end to end at their quick settings (separate Python processes, as a user runs them).

The quick settings check the plumbing, not the physics; the physics statements (T_g against cooling rate; CG
tau_alpha and tau_2 against the mapped atomistic ones) come from the default settings, whose numbers are in
README.md ("Glasses") and bench/RESULTS.md. Units: reduced LJ (polymer), K and ps (3-methylpentane).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def run(script, *args, timeout=900):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_polymer_glass_transition_quick(tmp_path):
    """Two cooling rates x 2 quenches of a 200-bead bead-spring melt: the set temperature falls linearly from
    T* = 1 to 0.2 at the requested rate (1e-9 relative), the density rises on cooling, every fitted T_g lies
    inside the fit window, and the plots and summary are written."""
    from openmm_plugin.protocols import ProtocolRecords
    from systems.bead_spring import temperature_kelvin

    run("polymer_glass_transition.py", "--out", tmp_path, "--quick")
    summary = json.loads((tmp_path / "summary.json").read_text())
    for obs in ("enthalpy", "density"):
        assert (tmp_path / f"glass_transition_{obs}.png").exists()
        for rate, r in summary["observables"][obs]["rates"].items():
            assert all(0.25 <= t <= 0.75 for t in r["per_quench"]), (obs, rate, r)
    kelvin = temperature_kelvin(1.0)
    for path in tmp_path.glob("quench_*.npz"):
        rec = ProtocolRecords.load(path)
        rate = float(path.name.split("_")[1]) * kelvin  # K/ps
        np.testing.assert_allclose(rec.set_temperature, np.maximum(0.2 * kelvin, kelvin - rate * rec.time),
                                   rtol=1e-9)
        assert rec.density[-1] > rec.density[0] * 1.1


def test_glass_dynamics_methylpentane_quick(tmp_path):
    """3-methylpentane at two temperatures: atomistic sampling, oriented-bead fits, a friction fitted on D at
    T1, CG runs at both temperatures, side-by-side plots; the fitted friction is positive and every reported
    ratio is finite (or None where the quick run is too short to define it)."""
    run("glass_dynamics_methylpentane.py", "--out", tmp_path, "--quick", timeout=1200)
    summary = json.loads((tmp_path / "summary.json").read_text())
    cal = summary["calibration"]
    assert cal["friction_per_ps"] > 0 and cal["raw_speed_up"] > 0
    assert json.loads((tmp_path / "dynamics.json").read_text())["mode"] == "friction"
    for t in ("200", "170"):
        assert (tmp_path / f"dynamics_T{t}.png").exists()
        ratios = summary["temperatures"][t]["cg_over_mapped"]
        assert all(v is None or (np.isfinite(v) and v > 0) for v in ratios.values()), ratios
        assert summary["temperatures"][t]["mapped"]["D"] > 0
