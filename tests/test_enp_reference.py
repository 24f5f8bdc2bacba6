"""The bundled equivariant potential of the polyethylene melt as the pipeline's atomistic reference.

* Accuracy (issue 3's targets) of the shipped model ``systems/models/polyethylene_enp`` on a trajectory it
  never saw: classical TraPPE-UA frames sampled here with a seed (11) that neither its training (seed 1) nor
  its validation data (seed 2) used. Force RMSE / RMS below 10% on atoms, below 10% on mapped 4:1 beads and
  below 20% on each chain's total (intermolecular) force. Ten frames, 200 steps apart: the chain level has
  10 x 21 x 3 = 630 components, so its relative error is known to about +-3% (1/sqrt(2 x 630)).
* `enpcg demo --reference enp`, small: the bundled model drives MD of the bundled melt (1,008 atoms) on the
  CPU, its frames and forces are mapped and fitted by MS-CG, the CG model runs in OpenMM and is analysed.
  The forces written while sampling are the model's own on those frames (float32 TorchForce in MD, float64
  model here: ||dF||/||F|| <= 1e-4).

Units: nm, kJ/mol, kJ/mol/nm.
"""
import json

import numpy as np
import pytest

from enpcg import cli
from enpcg.equivariant.validate import validate
from enpcg.h5md import read_h5md
from enpcg.mapping import load_mapping
from enpcg.models import energy_and_forces, load_model
from enpcg.pipeline import BUNDLED_ENP, DEFAULT_MAPPING

TARGETS = {"atom": 0.10, "bead": 0.10, "chain_intermolecular": 0.20}


def test_bundled_model_records_its_training():
    """The shipped model says how it was made: its data, 10 minutes or less of training, and its errors on
    an independent trajectory below the targets."""
    meta = json.loads((BUNDLED_ENP / "model.json").read_text())["metadata"]
    assert meta["fit_seconds"] <= 600  # 10 minutes on 2 CPU cores, final metrics included
    for level, limit in TARGETS.items():
        assert meta["validation"][level]["relative"] < limit, (level, meta["validation"][level])
    assert (BUNDLED_ENP.parent / "train_enp.yaml").is_file()  # the regeneration config (`make enp-model`)


def test_bundled_model_accuracy_on_an_unseen_trajectory(tmp_path):
    """Force errors of the shipped model on fresh classical frames (seed 11): atoms < 10%, beads < 10%,
    chains < 20% of the reference RMS."""
    from openmm_plugin.sampling import sample
    from systems.polyethylene import default_melt

    melt = default_melt()
    path = sample(melt.system, melt.topology, melt.positions, tmp_path / "unseen.h5", n_frames=10,
                  interval_steps=200, equilibration_steps=2000, platform="CPU", seed=11, progress=False,
                  box=melt.box)
    frames = read_h5md(path)
    model = load_model(BUNDLED_ENP)
    mapping = load_mapping(DEFAULT_MAPPING, n_atoms=frames.n_particles, masses=frames.masses)
    errors = validate(model, frames, mapping)
    print({k: round(errors[k]["relative"], 4) for k in TARGETS})
    for level, limit in TARGETS.items():
        assert errors[level]["relative"] < limit, (level, errors[level])


def test_demo_with_the_equivariant_reference(tmp_path):
    """`enpcg demo --reference enp` end to end on the CPU in a small version; the sampled forces are the
    bundled model's own (one Hamiltonian for sampling and forces)."""
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--out", str(out), "--reference", "enp", "--models", "mscg", "--n-frames", "10",
                   "--interval-steps", "10", "--cg-time-ps", "4", "--platform", "CPU"])
    assert rc == 0
    fr = read_h5md(out / "atomistic.h5")
    assert fr.n_frames == 10
    model = load_model(BUNDLED_ENP)
    for k in (0, fr.n_frames - 1):
        _, f = energy_and_forces(model, fr.positions[k], fr.box[k])
        assert np.linalg.norm(f - fr.forces[k]) / np.linalg.norm(fr.forces[k]) < 1e-4
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert (out / "models" / "mscg" / "model.json").is_file()
    assert (out / "sims" / "mscg" / "trajectory.dcd").is_file()
    assert metrics["checks"], "the report holds the CG model's structure checks"
