"""Model files carry their provenance (metadata) and refuse a system they were not trained for.

A tiny polyethylene-like dataset (4 random-walk chains of 24 united atoms, random forces) is mapped 4:1 with
two mappings that define the same beads but weigh them differently (centre of mass vs centre of geometry):
same CG topology, different mapping hashes. Models are fitted on it through the real pipeline (priors, the
fast fit); loading them against the other mapping, another topology or another PDB must fail with the two
hashes in the message. Units: nm, kJ/mol, amu.
"""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import torch  # noqa: F401  (before openmm: openmm-torch kernels need libtorch loaded)

from enpcg.errors import EnpcgError
from enpcg.h5md import H5MDWriter, data_hash, read_h5md
from enpcg.mapping import load_mapping
from enpcg.models import create_model, load_model, save_model
from enpcg.models.base import METADATA_KEYS, check_model_matches, topology_hash
from enpcg.pipeline import run_calibrate, run_export, run_fit, run_map, run_simulate
from enpcg.topology import CGTopology
from openmm_plugin.system import CGPotential

ROOT = Path(__file__).resolve().parents[1]
PE24 = ROOT / "tests" / "data" / "pe24_4to1.yaml"
N_CHAINS, N_PER, BOX = 4, 24, 2.5
CH3, CH2 = 15.035, 14.027
MASSES = np.array(([CH3] + [CH2] * (N_PER - 2) + [CH3]) * N_CHAINS)
FIT = dict(temperature=450.0, cutoff=1.0, prior="", epochs=1, batch_size=4, lr=1e-3, patience=2, device="cpu",
           seed=0, resume=False)


def _atomistic(path, seed=0, n_frames=12):
    rng = np.random.default_rng(seed)
    steps = rng.normal(size=(n_frames, N_CHAINS, N_PER, 3))
    steps *= 0.153 / np.linalg.norm(steps, axis=-1, keepdims=True)
    x = (rng.uniform(0, BOX, size=(n_frames, N_CHAINS, 1, 3)) + np.cumsum(steps, axis=2)) % BOX
    x = x.reshape(n_frames, -1, 3)
    with H5MDWriter(path, x.shape[1], masses=MASSES, metadata={"temperature_K": 450.0}) as w:
        w.append_many(x, rng.normal(scale=50.0, size=x.shape), np.broadcast_to(np.eye(3) * BOX, (n_frames, 3, 3)),
                      np.arange(n_frames) * 0.5, np.arange(n_frames) * 250)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Atomistic data mapped with the mass-weighted and the geometry-weighted mapping; priors fitted on the
    mass-weighted CG data."""
    d = tmp_path_factory.mktemp("meta")
    _atomistic(d / "aa.h5")
    geometry = d / "pe24_geometry.yaml"
    geometry.write_text(PE24.read_text().replace("weights: mass", "weights: geometry"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_map(mapping=PE24, input=d / "aa.h5", atom_pdb="", out=d / "cg")
        run_map(mapping=geometry, input=d / "aa.h5", atom_pdb="", out=d / "cg_geo")
        run_fit(data=d / "cg" / "cg.h5", model="priors", out=d / "priors", **FIT)
    return d


def test_save_model_writes_complete_metadata(tmp_path):
    """save_model writes every provenance field: enpcg version, units (nm, kJ/mol, amu, ...), bead types,
    the topology hash of the model's topology, the cutoff from the config (nm), and mapping/training-data
    hashes as null when the caller does not know them; caller metadata is kept."""
    from enpcg import __version__

    top = CGTopology(bead_names=["A", "B", "C"], bead_types=["T2", "T1", "T2"], masses=[10.0, 12.0, 10.0],
                     molecule_index=[0, 0, 0], bonds=[[0, 1], [1, 2]])
    model = create_model("neural", top, cutoff=0.9, seed=0)
    save_model(model, tmp_path / "m", metadata={"note": "hand-made"})
    meta = json.loads((tmp_path / "m" / "model.json").read_text())["metadata"]
    assert set(METADATA_KEYS) <= set(meta)
    assert meta["enpcg_version"] == __version__ and meta["units"]["length"] == "nm"
    assert meta["units"]["energy"] == "kJ/mol" and meta["units"]["mass"] == "amu"
    assert meta["bead_types"] == ["T1", "T2"] and meta["cutoff"] == 0.9
    assert meta["topology_hash"] == topology_hash(top)
    assert meta["mapping_hash"] is None and meta["training_data_hash"] is None and meta["note"] == "hand-made"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete file loads without a warning
        assert load_model(tmp_path / "m").metadata == meta


def test_fit_records_mapping_and_training_data_hashes(work):
    """`enpcg fit` stores the CG data's mapping hash (= Mapping.hash() of the mapping file) and the sha256
    of the training data (positions, forces, box), which differs between differently mapped data."""
    d = work
    meta = json.loads((d / "priors" / "model.json").read_text())["metadata"]
    mapping = load_mapping(PE24, masses=MASSES)
    assert meta["mapping_hash"] == mapping.hash() == read_h5md(d / "cg" / "cg.h5").metadata["mapping_hash"]
    assert meta["training_data_hash"] == data_hash(d / "cg" / "cg.h5")
    assert meta["training_data_hash"] != data_hash(d / "cg_geo" / "cg.h5")
    assert meta["topology_hash"] == topology_hash(CGTopology.load_json(d / "cg" / "cg_topology.json"))
    assert meta["bead_types"] == ["C4"]


def test_wrong_mapping_is_refused_naming_both_hashes(work):
    """A model fitted on mass-weighted beads, given the geometry-weighted mapping (same beads and topology,
    another mapping hash), is refused by CGPotential(mapping=) and by `enpcg calibrate` (whose reference
    carries the mapping hash); the message names the found and the expected hash and the fix."""
    d = work
    mass_map = load_mapping(PE24, masses=MASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        geo_map = load_mapping(d / "pe24_geometry.yaml", masses=MASSES)
    assert geo_map.topology.to_dict() == mass_map.topology.to_dict() and geo_map.hash() != mass_map.hash()
    CGPotential(d / "priors", mapping=mass_map)  # the right mapping passes
    with pytest.raises(EnpcgError) as err:
        CGPotential(d / "priors", mapping=geo_map)
    msg = str(err.value)
    assert geo_map.hash() in msg and mass_map.hash() in msg and "Fix:" in msg and "pe24_geometry.yaml" in msg
    with pytest.raises(EnpcgError) as err:
        run_calibrate(model=d / "priors", backend="native", pdb=d / "cg_geo" / "cg.pdb",
                      reference=d / "cg_geo" / "cg.h5", topology=d / "cg_geo" / "cg_topology.json",
                      out=d / "dyn", mode="friction", temperature=450.0, timestep=0.005, friction=1.0, time_ps=1.0,
                      report_ps=0.05, tolerance=0.05, max_runs=1, platform="Reference", seed=0)
    msg = str(err.value)
    assert geo_map.hash() in msg and mass_map.hash() in msg and str(d / "cg_geo" / "cg.h5") in msg
    assert not (d / "dyn").exists()  # refused before any output


def test_neural_fit_refuses_a_prior_of_another_mapping(work):
    """`enpcg fit --model neural --prior P` refuses a prior fitted on data of another mapping (both hashes in
    the message) before training, and leaves no model behind."""
    d = work
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_fit(data=d / "cg_geo" / "cg.h5", model="priors", out=d / "priors_geo", **FIT)
    with pytest.raises(EnpcgError, match="mapping hash") as err:
        run_fit(data=d / "cg" / "cg.h5", model="neural", out=d / "neural", **dict(FIT, prior=str(d / "priors_geo")))
    meta = json.loads((d / "priors_geo" / "model.json").read_text())["metadata"]
    assert meta["mapping_hash"] in str(err.value)
    assert read_h5md(d / "cg" / "cg.h5").metadata["mapping_hash"] in str(err.value)
    assert not (d / "neural" / "model.json").exists()


def test_wrong_topology_or_pdb_is_refused(work, tmp_path):
    """`enpcg export` with a CG topology of other bead types (same names and count) is refused with both
    topology hashes and the first difference; `enpcg simulate` and `enpcg export` with a PDB of other beads
    are refused naming the bead and both bead-name hashes; nothing is written."""
    d = work
    topo = json.loads((d / "cg" / "cg_topology.json").read_text())
    topo["bead_types"] = ["C4"] * 8 + ["CX"] * (len(topo["bead_types"]) - 8)
    other = tmp_path / "other_topology.json"
    other.write_text(json.dumps(topo))
    with pytest.raises(EnpcgError) as err:
        run_export(model=d / "priors", backend="native", topology=other, pdb=d / "cg" / "cg.pdb", out=tmp_path / "x")
    msg = str(err.value)
    assert topology_hash(CGTopology.from_dict(topo)) in msg and str(other) in msg
    assert topology_hash(CGTopology.load_json(d / "cg" / "cg_topology.json")) in msg
    assert "bead 8 has type 'CX'" in msg and "Fix:" in msg
    assert not (tmp_path / "x").exists()

    pdb = (d / "cg" / "cg.pdb").read_text().replace(" B1  ", " Q1  ", 1)
    (tmp_path / "other.pdb").write_text(pdb)
    for run in (lambda: run_simulate(model=d / "priors", backend="native", pdb=tmp_path / "other.pdb",
                                     out=tmp_path / "sim", time_ps=0.01, timestep=0.005, temperature=450.0,
                                     friction=1.0, report_ps=0.005, platform="Reference", seed=0),
                lambda: run_export(model=d / "priors", backend="native", topology=d / "cg" / "cg_topology.json",
                                   pdb=tmp_path / "other.pdb", out=tmp_path / "x")):
        with pytest.raises(EnpcgError, match=r"bead 0 is named 'Q1'.*bead-name hash [0-9a-f]{64} \(found\) vs "
                                             r"[0-9a-f]{64} \(expected\)"):
            run()
    assert not (tmp_path / "sim").exists() and not (tmp_path / "x").exists()
    # the matching files pass
    run_export(model=d / "priors", backend="native", topology=d / "cg" / "cg_topology.json",
               pdb=d / "cg" / "cg.pdb", out=tmp_path / "ok")
    assert (tmp_path / "ok" / "system.xml").exists()


def test_old_model_files_load_with_a_warning(work, tmp_path):
    """A model.json written before the metadata fields existed (no bead types, hashes or cutoff) still loads
    and gives the same weights, with a warning naming the missing fields; a mapping check cannot be made
    and warns instead of failing; its stored topology is still checked."""
    d = work
    old = tmp_path / "old"
    old.mkdir()
    desc = json.loads((d / "priors" / "model.json").read_text())
    desc["metadata"] = {"enpcg_version": "0.0.9", "units": {"length": "nm"}, "n_frames": 12}
    (old / "model.json").write_text(json.dumps(desc))
    (old / "model.pt").write_bytes((d / "priors" / "model.pt").read_bytes())
    with pytest.warns(UserWarning, match="metadata lacks .*mapping_hash"):
        model = load_model(old)
    new = load_model(d / "priors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), new.state_dict().values()))
    with pytest.warns(UserWarning, match="records no mapping hash"):
        check_model_matches(model, mapping_hash="0" * 64, source="x.h5")
    top = CGTopology.load_json(d / "cg" / "cg_topology.json")
    check_model_matches(old, topology=top)  # a directory works too; the stored topology matches
    top.masses[3] += 1.0
    with pytest.raises(EnpcgError, match="bead 3 has mass"):
        check_model_matches(old, topology=top, source="heavier.json")


def test_data_hash_reads_in_chunks_and_sees_every_frame(tmp_path):
    """data_hash is independent of the read chunk size, changes when one force component of the last frame
    changes, and ignores frames beyond the frame counter (an interrupted write)."""
    import h5py

    p = _atomistic(tmp_path / "a.h5", n_frames=5)
    h = data_hash(p)
    assert data_hash(p, chunk_bytes=1) == h == data_hash([p], chunk_bytes=10**9)
    with h5py.File(p, "r+") as f:
        f["particles/all/force/value"][4, 95, 2] += 1e-9
    assert data_hash(p) != h
    h = data_hash(p)
    with h5py.File(p, "r+") as f:
        f["parameters/enpcg"].attrs["n_frames"] = 4
    h4 = data_hash(p)
    with h5py.File(p, "r+") as f:
        f["particles/all/force/value"][4] = 0.0  # beyond the counter: invisible
    assert data_hash(p) == h4 != h


def test_every_torch_load_is_weights_only():
    """Every torch.load call in the repository passes weights_only=True (no pickled code runs when a model
    or checkpoint is read); checked on the source text of every Python file."""
    import re

    calls = []
    for path in ROOT.rglob("*.py"):
        if any(part.startswith(".") or part in ("out", "build") for part in path.relative_to(ROOT).parts):
            continue
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 0, m.end() - 1
            for end in range(m.end() - 1, len(text)):  # the call's closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            calls.append((path.relative_to(ROOT), text[m.start():end + 1]))
    assert len(calls) >= 3  # models, the neural trainer's and the oriented fit's checkpoints (and tests)
    bad = [(str(p), c) for p, c in calls if "weights_only=True" not in c]
    assert not bad, bad


def test_oriented_fit_resumes_from_a_weights_only_checkpoint(tmp_path):
    """The oriented force-and-torque fit resumes from its checkpoint, which torch.load(weights_only=True)
    reads (model and AdamW state, history, best state): a 2-epoch run continued to 3 epochs runs only epoch 2."""
    import torch

    from enpcg.oriented.data import OrientedData
    from enpcg.oriented.fit import fit_oriented
    from known_answer_oriented import gay_berne_data

    d = gay_berne_data(n_beads=64, n_frames=6, noise=0.1)
    arr = (lambda k: np.array(d[k]))
    data = OrientedData(arr("positions"), arr("axes"), arr("forces"), arr("torques"), arr("box"), d["topology"])
    p = d["params"]
    model = create_model("gay_berne", data.topology, **{k: p[k] for k in ("sigma", "epsilon", "s_par", "s_perp",
                                                                          "e_par", "e_perp", "cutoff",
                                                                          "switch_distance")}).double()
    fit_oriented(model, data, epochs=2, batch_size=3, length_scale=0.3, out_dir=tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    history = fit_oriented(model, data, epochs=3, batch_size=3, length_scale=0.3, out_dir=tmp_path)
    assert history["epoch"] == [0, 1, 2]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the random-bytes file
def test_damaged_or_foreign_weights_are_refused(work, tmp_path):
    """A model.pt of random bytes, one holding a pickled Python object (refused by weights_only=True, so no
    code runs), and weights of another model are refused with an EnpcgError naming model.pt and the fix."""
    import torch

    d = work
    for name, write in {
        "bytes": lambda p: p.write_bytes(b"\x80\x04not a torch file"),
        "object": lambda p: torch.save({"bias": _Payload()}, p),
        "other": lambda p: torch.save({"nothing": torch.zeros(2)}, p),
    }.items():
        m = tmp_path / name
        m.mkdir()
        (m / "model.json").write_text((d / "priors" / "model.json").read_text())
        write(m / "model.pt")
        with pytest.raises(EnpcgError, match=r"model\.pt.*Fix:"):
            load_model(m)
    assert not _Payload.ran


class _Payload:
    """An object whose unpickling would run code (it sets a flag): weights_only loading must refuse it."""

    ran = False

    def __reduce__(self):
        return (_Payload._run, ())

    @staticmethod
    def _run():
        _Payload.ran = True
        return None
