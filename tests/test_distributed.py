"""Data-parallel fitting under torchrun, and datasets of several H5MD files.

The torchrun tests launch two CPU ranks (gloo) as subprocesses (``python -m torch.distributed.run
--nproc_per_node=2``, one thread each) on a small synthetic CG system: 6 chains x 5 beads in a triclinic box,
random non-overlapping configurations, forces of a random neural "teacher" (kJ/mol/nm). Each parallel fit is
compared with the same fit in this process; the effective batch (sum over ranks) is the single-process batch.

Run as a script (``python tests/test_distributed.py neural DATA OUT``) this file is the torchrun worker of
the neural test.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from enpcg.errors import EnpcgError
from enpcg.h5md import H5MDWriter, read_h5md
from enpcg.models import batch_forces, create_model, load_model
from known_answer import TRICLINIC_BOX, random_chains

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
N_FRAMES = 37          # 4 validation frames (val_fraction 0.1) and 33 training frames
# 33 training frames in batches of 8: 4 batches split 4 + 4 over two ranks and one of a single frame, which
# leaves rank 1 without a frame (it joins with weight 0); 40 epochs x 5 steps = 200 optimiser steps.
TRAIN_KW = dict(epochs=40, batch_size=8, lr=3e-3, val_fraction=0.1, patience=1000, select_best=False, seed=5,
                device="cpu", progress=False, weight_decay=0.1, ema_decay=0.9)


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, env_extra=None, timeout=240):
    """Run ``torchrun --nproc_per_node=2 --master_port <free> ARGS`` (one OpenMP/torch thread per rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", **(env_extra or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def write_cg(path, top, pos, frc, box, first_frame=0, mapping_hash="synthetic-mapping"):
    """A CG H5MD file as `enpcg map` writes it: positions nm, forces kJ/mol/nm, box nm, topology, hash."""
    n = len(pos)
    with H5MDWriter(path, top.n_beads, masses=top.masses, species=list(top.bead_types),
                    topology_json=top.to_dict(), metadata={"mapping_hash": mapping_hash}) as w:
        w.append_many(pos, frc, box, 0.5 * np.arange(first_frame, first_frame + n),
                      np.arange(first_frame, first_frame + n))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic dataset as one file (all.h5) and split in two (parts/a.h5, parts/b.h5)."""
    d = tmp_path_factory.mktemp("ddp")
    top, _ = random_chains(6, seed=0)
    pos = np.stack([random_chains(6, seed=100 + k)[1] for k in range(N_FRAMES)])
    box = np.broadcast_to(TRICLINIC_BOX, (N_FRAMES, 3, 3)).copy()
    teacher = create_model("neural", top, cutoff=0.9, hidden=8, n_layers=1, seed=99).double()
    _, frc = batch_forces(teacher, torch.tensor(pos), torch.tensor(box))
    frc = frc.detach().numpy()
    (d / "parts").mkdir()
    write_cg(d / "all.h5", top, pos, frc, box)
    write_cg(d / "parts" / "a.h5", top, pos[:18], frc[:18], box[:18])
    write_cg(d / "parts" / "b.h5", top, pos[18:], frc[18:], box[18:], first_frame=18)
    return {"dir": d, "top": top, "pos": pos, "frc": frc, "box": box}


def model_arrays(model_dir):
    return {k: v.detach().double().numpy() for k, v in load_model(model_dir).state_dict().items()}


# ------------------------------------------------------------------------------------------- torchrun
def test_torchrun_spline_fit_equals_one_process(data, tmp_path):
    """`torchrun --nproc_per_node=2 -m enpcg fit --model spline` (each rank accumulates A^T A and A^T F over
    half the frames, all-reduced) saves the same tables as `enpcg fit` in one process: every table within
    1e-8 relative (||d|| / ||table||); rank 0 alone writes the model and fit.yaml."""
    from enpcg.cli import main

    args = ["fit", "--model", "spline", "--data", data["dir"] / "all.h5", "--cutoff", 1.0, "--device", "cpu"]
    res = torchrun(["-m", "enpcg", *args, "--out", tmp_path / "ddp"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("enpcg fit: done") == 1  # rank 0 reports, rank 1 is silent
    assert main([str(a) for a in args] + ["--out", str(tmp_path / "one")]) == 0
    ddp, one = model_arrays(tmp_path / "ddp"), model_arrays(tmp_path / "one")
    assert set(ddp) == set(one)
    worst = max(rel(ddp[k], one[k]) for k in one if np.linalg.norm(one[k]) > 0)
    print(f"spline tables, torchrun (2 ranks) vs one process: max relative difference {worst:.2e}")
    assert worst <= 1e-8
    assert json.loads((tmp_path / "ddp" / "model.json").read_text())["metadata"]["fit_ranks"] == 2
    assert (tmp_path / "ddp" / "fit.yaml").exists()
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def train_small(data_path, out_dir):
    """The neural fit of the torchrun test: a tiny float64 model (hidden 8, one block) trained for 200 steps
    (TRAIN_KW); returns (model, history)."""
    from enpcg.fitting.trainer import train_force_matching
    from enpcg.pipeline import load_cg_dataset

    fr, top = load_cg_dataset(data_path)
    model = create_model("neural", top, cutoff=0.9, hidden=8, n_layers=1, seed=2).double()
    return train_force_matching(model, fr.positions, fr.forces, fr.box, out_dir=out_dir, **TRAIN_KW)


def test_torchrun_neural_fit_resumes_and_equals_one_process(data, tmp_path):
    """Two ranks, each with half of every batch of 8 frames (and one rank idle, weight 0, on the last 1-frame
    batch), interrupted after epoch 20 (ENPCG_STOP_AFTER_EPOCH) and resumed under torchrun, end with the
    weights of one uninterrupted process after 200 steps of the same effective batch: float64,
    ||dw|| / ||w|| <= 1e-6 over all weights (AdamW with weight decay, EMA and the plateau schedule on the
    all-reduced validation loss); validation RMSE history within 1e-8 relative."""
    torch.set_num_threads(1)
    ref, h_ref = train_small(data["dir"] / "all.h5", tmp_path / "one")
    assert len(h_ref["epoch"]) == 40
    out = tmp_path / "ddp"
    worker = [HERE / "test_distributed.py", "neural", data["dir"] / "all.h5", out]
    stopped = torchrun(worker, {"ENPCG_STOP_AFTER_EPOCH": "20"})
    assert stopped.returncode != 0  # the KeyboardInterrupt of the test hook, on both ranks
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 20
    res = torchrun(worker)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = torch.load(out / "result.pt", weights_only=True)
    assert result["ranks"] == 2
    w_ref = torch.cat([v.flatten() for v in ref.state_dict().values()]).numpy()
    w_ddp = torch.cat([result["state"][k].flatten() for k in ref.state_dict()]).numpy()
    print(f"neural weights after 200 steps, torchrun (2 ranks, resumed) vs one process: ||dw||/||w|| = "
          f"{rel(w_ddp, w_ref):.2e}, max |dw| = {np.abs(w_ddp - w_ref).max():.2e}")
    assert rel(w_ddp, w_ref) <= 1e-6
    h_ddp = result["history"]
    assert h_ddp["epoch"] == list(range(1, 41))
    assert np.allclose(h_ddp["val_rmse"], h_ref["val_rmse"], rtol=1e-8, atol=0)
    assert np.allclose(h_ddp["train_rmse"], h_ref["train_rmse"], rtol=1e-8, atol=0)


def _worker(argv):
    """torchrun entry of the neural test: train, then rank 0 saves the weights and history."""
    from enpcg.fitting import distributed

    torch.set_num_threads(1)
    model, history = train_small(Path(argv[1]), Path(argv[2]))
    if distributed.is_main():
        torch.save({"state": model.state_dict(), "history": history, "ranks": distributed.world_size()},
                   Path(argv[2]) / "result.pt")


# ------------------------------------------------------------------------------------------- several files
def test_fit_on_two_files_equals_fit_on_their_concatenation(data, tmp_path):
    """`enpcg fit` on a quoted glob of two files, and on a YAML list of them, gives the model of the same
    frames in one file (tables equal to 1e-12 relative: the same arrays in the same order); the metadata
    lists both files."""
    from enpcg.cli import main
    from enpcg.pipeline import load_cg_dataset

    d = data["dir"]
    common = ["fit", "--model", "spline", "--cutoff", "1.0", "--device", "cpu"]
    assert main(common + ["--data", str(d / "all.h5"), "--out", str(tmp_path / "one")]) == 0
    assert main(common + ["--data", str(d / "parts" / "*.h5"), "--out", str(tmp_path / "glob")]) == 0
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(f"data:\n  - {d / 'parts' / 'a.h5'}\n  - {d / 'parts' / 'b.h5'}\n")
    assert main(["fit", "--config", str(cfg)] + common[1:] + ["--out", str(tmp_path / "list")]) == 0
    one = model_arrays(tmp_path / "one")
    for tag in ("glob", "list"):
        two = model_arrays(tmp_path / tag)
        assert max(rel(two[k], one[k]) for k in one if np.linalg.norm(one[k]) > 0) <= 1e-12
        meta = json.loads((tmp_path / tag / "model.json").read_text())["metadata"]
        assert meta["training_data"] == [str(d / "parts" / "a.h5"), str(d / "parts" / "b.h5")]
        assert meta["n_frames"] == N_FRAMES
    fr, _ = load_cg_dataset([d / "parts" / "a.h5", d / "parts" / "b.h5"])
    assert np.array_equal(fr.positions, data["pos"]) and np.array_equal(fr.forces, data["frc"])
    assert [s["n_frames"] for s in fr.metadata["sources"]] == [18, N_FRAMES - 18]


def test_files_of_different_mappings_are_rejected(data, tmp_path, capsys):
    """A file of another mapping (hash) or another CG topology in a dataset is an error naming both files,
    the field and the fix; nothing is written."""
    from enpcg.cli import main
    from enpcg.pipeline import load_cg_dataset

    d, top = data["dir"], data["top"]
    other = write_cg(tmp_path / "other.h5", top, data["pos"][:3], data["frc"][:3], data["box"][:3],
                     mapping_hash="another-mapping")
    with pytest.raises(EnpcgError) as err:
        load_cg_dataset([d / "parts" / "a.h5", other])
    msg = str(err.value)
    assert str(other) in msg and str(d / "parts" / "a.h5") in msg and "mapping_hash" in msg and "Fix" in msg
    top2, _ = random_chains(6, types=("A", "B", "B", "B", "A"), seed=0)
    foreign = write_cg(tmp_path / "foreign.h5", top2, data["pos"][:3], data["frc"][:3], data["box"][:3])
    assert main(["fit", "--model", "priors", "--data", str(d / "parts" / "b.h5"), str(foreign),
                 "--out", str(tmp_path / "m")]) == 2
    msg = capsys.readouterr().err
    assert str(foreign) in msg and str(d / "parts" / "b.h5") in msg and "topology_json" in msg
    assert not (tmp_path / "m").exists()
    assert main(["fit", "--data", str(tmp_path / "none" / "*.h5"), "--out", str(tmp_path / "m")]) == 2
    assert "matches no file" in capsys.readouterr().err


MAPPING = """molecules:
  - name: M
    count: fill
    n_atoms: 8
    weights: mass
    linear: {atoms_per_bead: 2, type: C, name_prefix: B}
"""


def _atomistic(path, n_frames, seed, n_atoms_per_chain=8, first_frame=0):
    """Atomistic H5MD: 4 chains of united atoms (nm), random forces (kJ/mol/nm), masses 14 amu."""
    top, _ = random_chains(4, types=["X"] * n_atoms_per_chain, bond=0.15, min_distance=0.12, seed=seed)
    rng = np.random.default_rng(seed)
    pos = np.stack([random_chains(4, types=["X"] * n_atoms_per_chain, bond=0.15, min_distance=0.12,
                                  seed=seed + 1 + k)[1] for k in range(n_frames)])
    frc = rng.normal(scale=100.0, size=pos.shape)
    with H5MDWriter(path, top.n_beads, masses=np.full(top.n_beads, 14.0), species=["X"] * top.n_beads) as w:
        w.append_many(pos, frc, TRICLINIC_BOX, np.arange(first_frame, first_frame + n_frames) * 1.0,
                      np.arange(first_frame, first_frame + n_frames), potential_energy=rng.normal(size=n_frames))
    return path


def test_map_several_replicas_into_one_dataset(tmp_path, capsys):
    """`enpcg map --input 'replicas/*.h5'` writes one CG dataset whose frames are those of mapping each replica
    alone, in order (positions and forces equal to 1e-12 nm and kJ/mol/nm), with the sources in its
    metadata; a replica of another system is an error naming both files."""
    from enpcg.cli import main

    rep = tmp_path / "replicas"
    rep.mkdir()
    a = _atomistic(rep / "r1.h5", 3, seed=1)
    b = _atomistic(rep / "r2.h5", 4, seed=2, first_frame=10)
    mapping = tmp_path / "map.yaml"
    mapping.write_text(MAPPING)
    assert main(["map", "--mapping", str(mapping), "--input", str(rep / "*.h5"), "--out", str(tmp_path / "cg")]) == 0
    for src, tag in ((a, "cg1"), (b, "cg2")):
        assert main(["map", "--mapping", str(mapping), "--input", str(src), "--out", str(tmp_path / tag)]) == 0
    both = read_h5md(tmp_path / "cg" / "cg.h5")
    one = [read_h5md(tmp_path / t / "cg.h5") for t in ("cg1", "cg2")]
    assert np.allclose(both.positions, np.concatenate([f.positions for f in one]), rtol=0, atol=1e-12)
    assert np.allclose(both.forces, np.concatenate([f.forces for f in one]), rtol=0, atol=1e-12)
    assert both.time.tolist() == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 13.0]
    assert both.metadata["sources"] == [{"file": str(a), "n_frames": 3}, {"file": str(b), "n_frames": 4}]
    assert both.metadata["mapping_hash"] == one[0].metadata["mapping_hash"]
    assert sorted(p.name for p in (tmp_path / "cg").iterdir()) == ["cg.h5", "cg.pdb", "cg_topology.json", "map.yaml"]
    capsys.readouterr()
    c = _atomistic(tmp_path / "r3.h5", 2, seed=3, n_atoms_per_chain=6)
    assert main(["map", "--mapping", str(mapping), "--input", str(a), str(c), "--out", str(tmp_path / "bad")]) == 2
    msg = capsys.readouterr().err
    assert str(a) in msg and str(c) in msg and "atoms" in msg and "Fix" in msg
    assert not (tmp_path / "bad").exists()


if __name__ == "__main__":
    if sys.argv[1:2] == ["neural"]:
        _worker(sys.argv[1:])
