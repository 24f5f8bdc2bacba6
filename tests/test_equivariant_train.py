"""Training the equivariant atomistic potential (``enpcg.equivariant.train``, ``enpcg train``) and sampling
with it (``enpcg sample --reference MODEL_DIR``).

Data: a tiny TraPPE-UA melt (4 chains x 24 united atoms, 96 atoms, 0.70 g/cm^3, box 1.476 nm, 0.7 nm LJ
cutoff), 20 frames 50 steps apart at 450 K; its forces have an RMS of ~840 kJ/mol/nm. Models are tiny
(l_max 1, one layer, 4-8 channels, cutoff 0.5 nm) and float64. Units: nm, kJ/mol, kJ/mol/nm, amu.

Tolerances: species shifts 1e-9 kJ/mol (least squares of exact linear data); resume vs uninterrupted
1e-6 (max |dw| of every weight, float64, same seeded path); OpenMM forces vs Python forces
||dF|| / ||F|| <= 1e-6 (float64 model, Reference platform).
"""
import json
from pathlib import Path

import numpy as np
import pytest

from enpcg import cli
from enpcg.equivariant import EquivariantModel
from enpcg.equivariant.train import (METRICS, atomistic_topology, site_names, species_energy_shifts,
                                     train_equivariant)
from enpcg.errors import EnpcgError
from enpcg.fitting.trainer import CURVE, HISTORY, STOP_ENV
from enpcg.h5md import read_h5md
from enpcg.models import create_model, energy_and_forces, load_model, save_model

MAPPING24 = Path(__file__).parent / "data" / "pe24_4to1.yaml"  # 4:1 beads of the tiny melt's 24-site chains


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Frames of a tiny melt (positions nm, forces kJ/mol/nm, energies kJ/mol) and their H5MD path."""
    from openmm_plugin.sampling import sample
    from systems.polyethylene import build_melt

    melt = build_melt(n_chains=4, chain_length=24, density=0.70, nvt_steps=500, cutoff=0.7, platform="CPU")
    path = sample(melt.system, melt.topology, melt.positions, tmp_path_factory.mktemp("eq") / "atomistic.h5",
                  n_frames=20, interval_steps=50, platform="CPU", progress=False)
    return read_h5md(path), path


def tiny_model(fr, mul=8):
    top = atomistic_topology(fr.masses, fr.species)
    return create_model("equivariant", top, cutoff=0.5, l_max=1, n_layers=1, mul=mul, avg_neighbors=13.0).double()


def test_site_names_from_masses():
    """Masses within 0.01 amu of a TraPPE-UA site name the site; others keep the species or get M<mass>."""
    assert site_names([15.035, 14.027, 14.03, 12.011], ["C1", "C2", "C3", "X"]) == ["CH3", "CH2", "CH2", "X"]
    assert site_names([1.008]) == ["M1.008"]


def test_species_shifts_recover_linear_offset(data):
    """Exact linear data E = counts @ eps are recovered to 1e-9 kJ/mol; for one composition (the melt) the
    shifts reproduce the mean frame energy to 1e-9 kJ/mol."""
    rng = np.random.default_rng(3)
    eps = np.array([-95.0, -80.0, 12.5])  # kJ/mol per species
    counts = rng.integers(0, 40, size=(12, 3)).astype(float)
    np.testing.assert_allclose(species_energy_shifts(counts @ eps, counts), eps, rtol=0, atol=1e-9)

    fr, _ = data
    model = tiny_model(fr, mul=4)
    counts = np.bincount(model.topology.type_index(), minlength=2).astype(float)
    shifts = species_energy_shifts(fr.potential_energy, np.tile(counts, (fr.n_frames, 1)))
    assert abs(counts @ shifts - fr.potential_energy.mean()) < 1e-9


def test_training_lowers_force_error(data, tmp_path):
    """10 epochs: the validation force RMSE falls (observed 804 -> 366 kJ/mol/nm) and ends below 0.9 x
    the force RMS of the data (~840 kJ/mol/nm); metrics, history and curve are written."""
    fr, _ = data
    model = tiny_model(fr)
    model, history, metrics = train_equivariant(
        model, fr.positions, fr.forces, fr.potential_energy, fr.box, model.topology.type_index(), epochs=10,
        batch_size=4, lr=2e-2, val_fraction=0.2, patience=10, seed=0, device="cpu", out_dir=tmp_path,
        progress=False)
    val = history["val_rmse"]
    data_rms = float(np.sqrt((fr.forces ** 2).mean()))
    print(f"val force RMSE {val[0]:.1f} -> {min(val):.1f} kJ/mol/nm; data force RMS {data_rms:.1f}")
    assert min(val) < val[0]
    assert metrics["force_rmse"] < 0.9 * data_rms
    assert metrics["force_rmse"] == pytest.approx(min(val), rel=1e-9)  # best weights kept
    saved = json.loads((tmp_path / METRICS).read_text())
    assert set(saved["per_species"]) == {"CH2", "CH3"}
    for row in saved["per_species"].values():
        assert 0 < row["force_mae"] <= row["force_rmse"]
    assert (tmp_path / HISTORY).exists() and (tmp_path / CURVE).exists()
    assert len(history["val_energy_rmse"]) == len(val)


def test_resume_equals_uninterrupted(data, tmp_path, monkeypatch):
    """Stopped after epoch 1 by the ENPCG_STOP_AFTER_EPOCH hook and resumed: the weights after 3 epochs
    equal those of an uninterrupted run within 1e-6, and the histories agree."""
    fr, _ = data
    kw = dict(epochs=3, batch_size=4, lr=1e-2, seed=1, device="cpu", progress=False)
    species = tiny_model(fr, 4).topology.type_index()
    args = (fr.positions[:12], fr.forces[:12], fr.potential_energy[:12], fr.box[:12], species)
    ref, h_ref, _ = train_equivariant(tiny_model(fr, 4), *args, out_dir=tmp_path / "a", **kw)
    monkeypatch.setenv(STOP_ENV, "1")
    with pytest.raises(KeyboardInterrupt):
        train_equivariant(tiny_model(fr, 4), *args, out_dir=tmp_path / "b", **kw)
    monkeypatch.delenv(STOP_ENV)
    res, h_res, _ = train_equivariant(tiny_model(fr, 4), *args, out_dir=tmp_path / "b", **kw)
    diff = max(float((a - b).abs().max()) for a, b in zip(ref.state_dict().values(), res.state_dict().values())
               if a.numel())
    assert diff <= 1e-6
    np.testing.assert_allclose(h_res["val_rmse"], h_ref["val_rmse"], rtol=1e-6)


def test_train_cli_and_sample_with_model(data, tmp_path):
    """`enpcg train` writes a model folder (site-name species, H5MD masses, metrics, and with --validation the
    atom, bead and chain force errors); `enpcg sample --reference` refuses it on the bundled melt (96 vs 1008
    atoms), and runs with the same weights bound to the bundled melt's atoms: the H5MD forces equal the
    model's Python forces, ||dF||/||F|| <= 1e-4 (MD runs the float32 export; the check is float64)."""
    from systems.polyethylene import default_melt

    fr, path = data
    out = tmp_path / "model"
    rc = cli.main(["train", "--data", str(path), "--out", str(out), "--epochs", "2", "--mul", "4", "--n-layers",
                   "1", "--device", "cpu", "--validation", str(path), "--mapping", str(MAPPING24)])
    assert rc == 0
    validation = json.loads((out / "training" / "validation.json").read_text())
    for level in ("atom", "bead", "chain_intermolecular"):
        assert 0 < validation[level]["relative"] < 2.0 and validation[level]["reference_rms"] > 0
    desc = json.loads((out / "model.json").read_text())
    assert desc["kind"] == "equivariant"
    assert sorted(set(desc["topology"]["bead_types"])) == ["CH2", "CH3"]
    np.testing.assert_allclose(desc["topology"]["masses"], fr.masses, rtol=0, atol=1e-12)
    assert desc["metadata"]["metrics"]["force_rmse"] > 0

    assert cli.main(["sample", "--reference", str(out), "--out", str(tmp_path / "bad.h5")]) == 2
    with pytest.raises(EnpcgError, match="96 atoms vs the model's 1008|1008 atoms vs the model's 96"):
        from enpcg.equivariant.reference import equivariant_reference

        equivariant_reference(out)

    melt = default_melt()
    trained = load_model(out)
    big = EquivariantModel(atomistic_topology(melt.masses, [a.name for a in melt.topology.atoms()]),
                           **trained.config).double()
    big.load_state_dict(trained.state_dict())
    save_model(big, tmp_path / "big")
    h5 = tmp_path / "eq.h5"
    rc = cli.main(["sample", "--reference", str(tmp_path / "big"), "--out", str(h5), "--n-frames", "2",
                   "--interval-steps", "2", "--equilibration-steps", "0", "--platform", "Reference"])
    assert rc == 0
    sampled = read_h5md(h5)
    assert sampled.n_frames == 2
    np.testing.assert_allclose(sampled.masses, melt.masses, rtol=0, atol=1e-9)
    for k in range(sampled.n_frames):
        e, f = energy_and_forces(big, sampled.positions[k], sampled.box[k])
        rel = np.linalg.norm(sampled.forces[k] - f) / np.linalg.norm(f)
        assert rel <= 1e-4, rel
        assert abs(sampled.potential_energy[k] - e) / melt.n_particles <= 1e-3
    assert not np.allclose(sampled.positions[0], sampled.positions[1])
