"""The pipeline's stages as plain functions (keyword arguments in, dict of output paths out).

The command line (:mod:`enpcg.cli`) resolves each stage's options and calls ``run_<stage>(**options)``;
Python users may call these directly. Units: nm, ps, kJ/mol, amu, K.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .errors import EnpcgError

KB = 0.008314462618  # kJ/mol/K
DEFAULT_MAPPING = Path(__file__).resolve().parent.parent / "systems" / "mappings" / "polyethylene_4to1.yaml"
# The small equivariant potential of the bundled melt shipped with the repository (`make enp-model` rebuilds it).
BUNDLED_ENP = Path(__file__).resolve().parent.parent / "systems" / "models" / "polyethylene_enp"


def _say(msg):
    print(f"[enpcg] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ build
def run_build(out, n_chains, chain_length, temperature, equilibration_ps, seed):
    """Build and equilibrate a polyethylene melt; writes ``out/melt.{system.xml,pdb,json}``."""
    from systems.polyethylene import build_melt, save_melt

    steps = int(round(equilibration_ps / 0.002))
    melt = build_melt(n_chains=n_chains, chain_length=chain_length, temperature=temperature, seed=seed,
                      npt_steps=2 * steps // 3, nvt_steps=steps - 2 * steps // 3, progress=True)
    xml, pdb, meta = save_melt(melt, Path(out) / "melt")
    _say(f"melt: {melt.n_particles} sites, density {melt.density():.4f} g/cm^3")
    return {"system": xml, "pdb": pdb, "metadata": meta}


def load_reference_system(reference):
    """'default' (bundled melt), 'enp' (the bundled equivariant potential driving the bundled melt), a folder
    written by ``enpcg build``, 'SYSTEM.xml,STRUCTURE.pdb', or a model folder of kind "equivariant" (written by
    ``enpcg train``; the model drives the bundled melt)."""
    from systems.polyethylene import default_melt, load_melt, load_reference

    if reference in ("default", "", None):
        return default_melt()
    if reference == "enp":
        from .equivariant.reference import equivariant_reference

        if not (BUNDLED_ENP / "model.json").is_file():
            raise EnpcgError(f"{BUNDLED_ENP}: the bundled equivariant model is missing (model.json). Fix: "
                             "restore it from git, or rebuild it with `make enp-model`")
        return equivariant_reference(BUNDLED_ENP)
    if "," in str(reference):
        xml, pdb = (s.strip() for s in str(reference).split(",", 1))
        return load_reference(xml, pdb)
    path = Path(reference)
    from .equivariant.reference import equivariant_reference, is_equivariant_model_dir

    if is_equivariant_model_dir(path):
        return equivariant_reference(path)
    if path.is_dir():
        return load_melt(path / "melt")
    raise EnpcgError(f"sample.reference {reference!r} is neither 'default', 'enp', a build folder, 'XML,PDB', nor "
                     "an equivariant model folder. Fix: pass --reference default, --reference enp, --reference out/melt, "
                     "--reference system.xml,system.pdb or --reference out/equivariant")


# ------------------------------------------------------------------------------------------------ sample
def run_sample(reference, out, n_frames, interval_steps, equilibration_steps, temperature, timestep, friction,
               platform, seed):
    """Atomistic Langevin MD with the reference's own Hamiltonian; frames and forces to H5MD (resumable)."""
    from openmm_plugin.sampling import sample

    ref = load_reference_system(reference)
    path = sample(ref.system, ref.topology, ref.positions, out, n_frames=n_frames, interval_steps=interval_steps,
                  temperature=temperature, timestep=timestep, friction=friction,
                  platform=None if platform == "auto" else platform, seed=seed,
                  equilibration_steps=equilibration_steps, box=ref.box)
    return {"h5md": path}


# ------------------------------------------------------------------------------------------------ datasets
def data_files(spec, field) -> list:
    """The H5MD files of a dataset option: one path, a glob pattern (``out/replicas/*.h5``), or a list of
    paths and patterns. Patterns expand in sorted order and the list order is kept, so a dataset's frame
    order (and with it a seeded validation split) does not depend on the file system. Strings may be
    patterns; ``Path`` objects are taken literally. ``field`` (e.g. ``"fit.data"``) names the option in
    errors."""
    import glob

    items = [spec] if isinstance(spec, (str, Path)) else list(spec or [])
    files = []
    for item in items:
        text = str(item)
        if isinstance(item, str) and glob.has_magic(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise EnpcgError(f"{field}: the pattern {text!r} matches no file. Fix: check the folder, and "
                                 "quote the pattern on the command line so that the shell does not expand it")
            files += [Path(m) for m in matches]
        else:
            files.append(Path(text))
    if not files:
        raise EnpcgError(f"{field}: no file given. Fix: pass an H5MD file, a glob pattern or a list of files")
    seen = set()
    for f in files:
        if f.resolve() in seen:
            raise EnpcgError(f"{field}: {f} is listed twice, so its frames would count twice. Fix: list each "
                             "file once")
        seen.add(f.resolve())
    return files


def _check_same_atoms(first, other):
    """Atomistic files of one dataset: same particle count, masses and species (else an error naming both)."""
    from .h5md import read_h5md

    a = read_h5md(first, frames=[0], require_forces=True)
    b = read_h5md(other, frames=[0], require_forces=True)
    problem = None
    if a.n_particles != b.n_particles:
        problem = f"/particles/all/position has {b.n_particles} atoms, but {first} has {a.n_particles}"
    elif (a.masses is None) != (b.masses is None) or (
            a.masses is not None and not np.allclose(a.masses, b.masses, rtol=1e-9, atol=0.0)):
        problem = f"/parameters/enpcg/masses differ from those of {first}"
    elif a.species != b.species:
        problem = f"/parameters/enpcg/species differ from those of {first}"
    if problem:
        raise EnpcgError(f"{other}: {problem}; the files of one dataset must be replicas of the same system. "
                         f"Fix: map {other} on its own, or sample it from the same reference")


def _merge_cg_parts(parts, out_h5, topology_json, pdb_src, pdb_dst, oriented):
    """Concatenate mapped CG H5MD files ``parts`` ([(cg file, atomistic source)]) into ``out_h5`` (frames in
    order, times and steps as sampled), with ``metadata["sources"]`` listing each source and its frame count;
    writes the topology JSON and copies the PDB of the first part. Every output appears only when complete."""
    from .fileio import atomic_path
    from .h5md import H5MDWriter, n_frames as count_frames, read_h5md
    from .mapping import ORIENTED_VECTORS
    from .topology import CGTopology

    heads = [read_h5md(p, frames=[0], require_forces=True) for p, _ in parts]
    counts = [count_frames(p) for p, _ in parts]
    topo = CGTopology.from_dict(json.loads(heads[0].topology_json))
    if oriented:  # each part's mean body-frame second moments, weighted by its frames (same beads per frame)
        per_part = [json.loads(h.topology_json).get("body_moments") or {} for h in heads]
        topo.body_moments = {t: (sum(np.asarray(m[t]) * c for m, c in zip(per_part, counts))
                                 / sum(counts)).tolist() for t in per_part[0]}
    with_energy = all(h.potential_energy is not None for h in heads)
    extra = ORIENTED_VECTORS if oriented else {}
    metadata = dict(heads[0].metadata)
    metadata.update({"atomistic_source": [str(src) for _, src in parts],
                     "sources": [{"file": str(src), "n_frames": c} for (_, src), c in zip(parts, counts)]})
    with atomic_path(out_h5) as tmp_h5, atomic_path(topology_json) as tmp_json, atomic_path(pdb_dst) as tmp_pdb:
        with H5MDWriter(tmp_h5, topo.n_beads, masses=topo.masses, species=list(topo.bead_types),
                        topology_json=json.dumps(topo.to_dict()), metadata=metadata,
                        extra_vectors=extra) as writer:
            for (part, _), n in zip(parts, counts):
                for start in range(0, n, 500):  # bounded memory for long trajectories
                    fr = read_h5md(part, frames=slice(start, min(start + 500, n)), require_forces=True)
                    writer.append_many(fr.positions, fr.forces, fr.box, fr.time, fr.step,
                                       potential_energy=fr.potential_energy if with_energy else None,
                                       **{k: fr.extra[k] for k in extra})
        topo.save_json(tmp_json)
        shutil.copyfile(pdb_src, tmp_pdb)


# ------------------------------------------------------------------------------------------------ map
def run_map(mapping, input, atom_pdb, out):
    """Map atomistic frames to beads: ``out/cg.h5``, ``out/cg_topology.json``, ``out/cg.pdb``.

    ``input``: one atomistic H5MD file, a glob pattern or a list of files (replicas of one system: same atoms,
    masses and species). Several files become one CG dataset, their frames concatenated in order (times and
    steps as each replica sampled them; ``metadata["sources"]`` lists the files and their frame counts).
    """
    import tempfile

    from .h5md import read_h5md
    from .mapping import load_mapping, map_trajectory

    inputs = data_files(input, "map.input")
    mapping_path = DEFAULT_MAPPING if mapping in ("default", "", None) else Path(mapping)
    head = read_h5md(inputs[0], frames=[0], require_forces=True)
    for other in inputs[1:]:  # before any mapping work: a mismatch fails fast
        _check_same_atoms(inputs[0], other)
    m = load_mapping(mapping_path, atom_topology=atom_pdb or None, n_atoms=head.n_particles, masses=head.masses)
    out = Path(out)
    result = {"cg_h5md": out / "cg.h5", "topology": out / "cg_topology.json", "pdb": out / "cg.pdb"}
    if len(inputs) == 1:
        map_trajectory(m, inputs[0], out / "cg.h5", out_topology_json=out / "cg_topology.json",
                       out_pdb=out / "cg.pdb")
        return result
    out.mkdir(parents=True, exist_ok=True)
    # Each replica is mapped (and checked) on its own into a scratch folder, then the parts are concatenated;
    # the scratch folder goes away either way, so a failure leaves no partial output.
    scratch = Path(tempfile.mkdtemp(prefix=".map-parts-", dir=out))
    try:
        parts = []
        for k, src in enumerate(inputs):
            part = scratch / f"part{k}"
            map_trajectory(m, src, part / "cg.h5", out_topology_json=part / "cg_topology.json",
                           out_pdb=part / "cg.pdb")
            parts.append((part / "cg.h5", src))
        _merge_cg_parts(parts, out / "cg.h5", out / "cg_topology.json", scratch / "part0" / "cg.pdb",
                        out / "cg.pdb", m.oriented)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------------ fit
def _load_one_cg(path):
    from .h5md import read_h5md
    from .topology import CGTopology

    fr = read_h5md(path, require_forces=True)
    topo = json.loads(fr.topology_json) if fr.topology_json else None
    if not isinstance(topo, dict) or "bead_types" not in topo:
        raise EnpcgError(f"{path}: /parameters/enpcg/topology_json holds no CG topology (bead_types missing): "
                         "this is not a mapped CG dataset. Fix: map the atomistic trajectory first (enpcg map) "
                         "and fit on its cg.h5")
    try:
        return fr, CGTopology.from_dict(topo), topo
    except (TypeError, EnpcgError) as e:
        raise EnpcgError(f"{path}: /parameters/enpcg/topology_json: {e}") from None


def load_cg_dataset(path):
    """(frames, topology) of a CG dataset written by ``enpcg map``: one CG H5MD file, a glob pattern or a
    list of files. Several files must share the CG topology, the mapping hash and periodicity (one mapping
    of one system); their frames are concatenated in order, ``metadata["sources"]`` lists the files and
    their frame counts, and potential energies are kept only when every file has them. Units as in
    :func:`enpcg.h5md.read_h5md` (nm, kJ/mol/nm, ps, kJ/mol)."""
    from .h5md import Frames

    files = data_files(path, "fit.data")
    fr, topology, topo = _load_one_cg(files[0])
    if len(files) == 1:
        return fr, topology
    parts = [fr]
    for other in files[1:]:
        f2, _, topo2 = _load_one_cg(other)
        hash1, hash2 = fr.metadata.get("mapping_hash"), f2.metadata.get("mapping_hash")
        if topo2 != topo:
            what = "/parameters/enpcg/topology_json (the CG topology)"
        elif hash2 != hash1:
            what = f"/parameters/enpcg/metadata mapping_hash ({hash2!r} vs {hash1!r})"
        elif (f2.box is None) != (fr.box is None):
            what = "/particles/all/box (one file is periodic, the other is not)"
        else:
            what = None
        if what:
            raise EnpcgError(f"{other}: {what} differs from {files[0]}; the files of one dataset must be mapped "
                             f"with the same mapping from the same system. Fix: map every replica with the same "
                             f"mapping file (enpcg map --mapping ...), or fit {other} separately")
        parts.append(f2)

    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else np.concatenate(values)

    extra = {k: np.concatenate([p.extra[k] for p in parts]) for k in parts[0].extra
             if all(k in p.extra for p in parts)}
    metadata = dict(fr.metadata)
    metadata["sources"] = [{"file": str(f), "n_frames": p.n_frames} for f, p in zip(files, parts)]
    merged = Frames(positions=cat("positions"), forces=cat("forces"), box=cat("box"), time=cat("time"),
                    step=cat("step"), potential_energy=cat("potential_energy"), masses=fr.masses,
                    species=fr.species, topology_json=fr.topology_json, metadata=metadata, extra=extra)
    return merged, topology


def _device(device):
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _training_data_hash(data):
    """``training_data_hash`` of a model's metadata: :func:`enpcg.h5md.data_hash` of the data file(s)."""
    from .h5md import data_hash

    return data_hash(data if isinstance(data, (list, tuple)) else [data])


def run_fit(data, model, out, temperature, cutoff, prior, epochs, batch_size, lr, patience, device, seed, resume,
            refine_iterations=0, refine_ps=20.0, max_minutes=0.0, length_scale=0.0):
    """Fit a CG model to a CG dataset by force matching and save it to ``out`` (model.json + model.pt).

    ``data``: one CG H5MD file, a glob pattern or a list of files (see :func:`load_cg_dataset`).
    Under ``torchrun`` (WORLD_SIZE > 1) the MS-CG normal equations and the neural minibatches are shared
    among the ranks (:mod:`enpcg.fitting.distributed`); every rank fits the same model and rank 0 saves it.
    Priors are cheap and fitted by every rank; IBI refinement runs CG simulations on rank 0 only.
    """
    from .fitting import distributed
    from .models import load_model, save_model

    files = data_files(data, "fit.data")
    if model == "oriented_neural":
        if len(files) > 1:
            raise EnpcgError(f"fit.data: oriented_neural fits read one file; you gave {len(files)}. Fix: map the "
                             "replicas into one dataset with `enpcg map --input 'replicas/*.h5'` and fit its cg.h5")
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
            raise EnpcgError("fit.model: oriented_neural fits do not run under torchrun (WORLD_SIZE > 1). Fix: "
                             "run `enpcg fit --model oriented_neural` as one process")
        return _fit_oriented(files[0], out, temperature, cutoff, epochs, batch_size, lr, device, seed, resume,
                             max_minutes, length_scale, prior)

    fr, topology = load_cg_dataset(files)
    data = str(files[0]) if len(files) == 1 else [str(f) for f in files]  # as recorded in the metadata
    meta = {"mapping_hash": fr.metadata.get("mapping_hash"), "training_data": data,
            "training_data_hash": _training_data_hash(data), "n_frames": fr.n_frames, "temperature": temperature}
    t0 = time.time()
    if model == "priors":
        from .fitting.boltzmann import fit_priors

        fitted = fit_priors(fr.positions, fr.box, topology, temperature)
    elif model == "spline":
        from .fitting.mscg import fit_spline

        fitted = fit_spline(fr.positions, fr.forces, fr.box, topology, cutoff=cutoff, temperature=temperature,
                            device=_device(device))
        meta["mscg_force_residual"] = getattr(fitted, "fit_info", {}).get("force_residual")
        if refine_iterations > 0 and distributed.is_main():  # serial CG runs; only rank 0 saves the result
            from .fitting.refine import refine_spline

            fitted, history = refine_spline(fitted, fr.positions, fr.box, temperature,
                                            iterations=refine_iterations, sim_ps=refine_ps, seed=seed)
            meta["ibi_history"] = history
    else:
        from .fitting.boltzmann import fit_priors
        from .fitting.trainer import train_force_matching
        from .models import create_model
        from .models.composite import SumModel

        if prior:
            from .models.base import check_model_matches

            prior_model = load_model(prior)
            check_model_matches(prior_model, mapping_hash=fr.metadata.get("mapping_hash"), topology=topology,
                                source=data)  # the prior must be of the data's mapping
        else:
            prior_model = fit_priors(fr.positions, fr.box, topology, temperature)
        net = create_model("neural", topology, cutoff=min(cutoff, 1.0), seed=seed)
        net, history = train_force_matching(net, fr.positions, fr.forces, fr.box, prior=prior_model,
                                            out_dir=Path(out) / "training", epochs=epochs, batch_size=batch_size,
                                            lr=lr, patience=patience, seed=seed, device=_device(device),
                                            resume=resume, max_minutes=max_minutes or None)
        meta["training"] = {"best_epoch": history.get("best_epoch"), "val_rmse": history["val_rmse"][-1:]}
        fitted = SumModel(topology, [prior_model.double(), net.double()])
    meta["fit_seconds"] = round(time.time() - t0, 2)
    meta["fit_ranks"] = distributed.world_size()  # processes that shared the fit (torchrun), else 1
    if distributed.is_main():  # every rank holds the same model; one writes it
        save_model(fitted.double(), out, metadata=meta)
    return {"model": Path(out)}


# ------------------------------------------------------------------------------------------------ train
def run_train(data, out, cutoff, l_max, n_layers, mul, epochs, batch_size, lr, energy_weight, force_weight,
              patience, max_minutes, device, seed, resume, precision="float32", validation="", mapping="default",
              cg_force_weight=1.0):
    """Train the equivariant atomistic potential on an atomistic H5MD file (``enpcg sample``) and save it to
    ``out`` (model.json + model.pt; training outputs in ``out/training``).

    Species are united-atom site names from the H5MD masses (see :func:`enpcg.equivariant.train.site_names`);
    the topology keeps the H5MD masses (amu), so the model can drive MD (``enpcg sample --reference out``).
    Training runs in ``precision`` (float32 is about twice as fast on CPUs); the saved model is float64.
    With ``cg_force_weight`` > 0 the loss also weighs the errors of the mapped bead forces and of each
    molecule's total force (beads and molecules from ``mapping``): multiscale force matching, which the
    coarse-graining downstream needs (atom forces, dominated by stiff bonds, hardly constrain the
    intermolecular forces; measured on the bundled melt, 4 frames per step: chain-force error 54% without,
    20% with weight 1).
    With ``max_minutes`` the learning rate decays on a cosine over that budget.
    With ``validation`` (an H5MD file of another trajectory of the same system), the relative force errors
    on atoms, mapped beads and whole chains (:mod:`enpcg.equivariant.validate`) go to
    ``out/training/validation.json`` and into the model metadata.
    """
    import torch

    from .equivariant.train import atomistic_topology, mean_neighbors, train_equivariant
    from .equivariant.validate import validate as validate_model
    from .fileio import write_json
    from .h5md import read_h5md
    from .mapping import load_mapping
    from .models import create_model, save_model

    fr = read_h5md(data, require_forces=True)
    if fr.masses is None:
        raise EnpcgError(f"{data}: /particles/all/mass is missing, so the atom species are unknown. Fix: sample "
                         "the data with `enpcg sample`, which stores masses")
    if fr.potential_energy is None and energy_weight > 0:
        raise EnpcgError(f"{data}: no potential energies (observables/potential_energy) but train.energy_weight is "
                         f"{energy_weight}. Fix: pass --energy-weight 0 to fit forces only")
    val_frames = atom_map = force_groups = None
    if validation:  # read and check before hours of training, not after
        val_frames = read_h5md(validation, require_forces=True)
        if val_frames.n_particles != fr.n_particles:
            raise EnpcgError(f"{validation}: {val_frames.n_particles} atoms, but the training data {data} has "
                             f"{fr.n_particles}. Fix: validate on another trajectory of the same system")
    if validation or cg_force_weight > 0:
        mapping_path = DEFAULT_MAPPING if mapping in ("default", "", None) else Path(mapping)
        try:
            atom_map = load_mapping(mapping_path, n_atoms=fr.n_particles, masses=fr.masses)
        except EnpcgError as e:
            raise EnpcgError(f"{e} (train.mapping defines the beads and molecules of the CG force loss and of "
                             "the validation errors: pass --mapping for your system, or --cg-force-weight 0 "
                             "without --validation)") from None
    if cg_force_weight > 0:
        bead_of = np.full(fr.n_particles, -1, dtype=np.int64)
        for b, atoms in enumerate(atom_map.bead_atoms):
            bead_of[atoms] = b
        if (bead_of < 0).any():
            raise EnpcgError(f"{atom_map.source}: {int((bead_of < 0).sum())} atoms are in no bead, so bead and "
                             "molecule force sums are incomplete. Fix: map every atom, or pass "
                             "--cg-force-weight 0")
        mol_of = np.asarray(atom_map.topology.molecule_index)[bead_of]
        force_groups = [(bead_of, cg_force_weight), (mol_of, cg_force_weight)]
    energies = fr.potential_energy if fr.potential_energy is not None else np.zeros(fr.n_frames)
    topology = atomistic_topology(fr.masses, fr.species)
    box0 = None if fr.box is None else fr.box[0]
    neighbors = mean_neighbors(fr.positions[0], box0, cutoff)
    dtype = {"float32": torch.float32, "float64": torch.float64}[precision]
    # Network outputs in units of 0.1 nm x the data's force RMS (NequIP's force-RMS scaling): forces of O(1) in
    # network units from the first step.
    energy_scale = round(0.1 * float(np.sqrt(np.mean(np.square(fr.forces)))), 3) or 1.0
    model = create_model("equivariant", topology, cutoff=cutoff, l_max=l_max, n_layers=n_layers, mul=mul,
                         avg_neighbors=round(neighbors, 2), energy_scale=energy_scale, seed=seed).to(dtype)
    t0 = time.time()
    model, history, metrics = train_equivariant(
        model, fr.positions, fr.forces, energies, fr.box, topology.type_index(), energy_weight=energy_weight,
        force_weight=force_weight, epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, seed=seed,
        device=_device(device), out_dir=Path(out) / "training", resume=resume, max_minutes=max_minutes or None,
        force_groups=force_groups)
    fit_seconds = round(time.time() - t0, 2)
    model = model.cpu().double()
    meta = {"training_data": str(data), "training_data_hash": _training_data_hash(data),
            "n_frames": fr.n_frames, "temperature": fr.metadata.get("temperature_K"),
            "mapping_hash": None,  # an atomistic model: no mapping binds it (its CG-loss mapping is below)
            "cg_loss_mapping_hash": atom_map.hash() if atom_map else None,
            "species_rule": "united-atom site by H5MD mass (CH3 15.035, CH2 14.027 amu, +-0.01), else the "
                            "H5MD species name", "metrics": metrics, "precision": precision,
            "cg_force_weight": cg_force_weight, "mapping": str(atom_map.source) if atom_map else None,
            "training": {"best_epoch": history.get("best_epoch"), "stopped": history.get("stopped"),
                         "epochs_run": len(history.get("epoch", []))},
            "fit_seconds": fit_seconds}
    _say(f"validation-split force RMSE {metrics['force_rmse']:.4g} kJ/mol/nm (data force RMS "
         f"{metrics['reference_force_rms']:.4g}); {fit_seconds:.0f} s")
    result = {"model": Path(out), "metrics": Path(out) / "training" / "metrics.json"}
    if val_frames is not None:
        errors = validate_model(model, val_frames, atom_map)
        errors["data"] = str(validation)
        write_json(Path(out) / "training" / "validation.json", errors)
        meta["validation"] = errors
        result["validation"] = Path(out) / "training" / "validation.json"
        _say("independent-trajectory force errors (RMSE / RMS): " + ", ".join(
            f"{k} {errors[k]['relative']:.1%}" for k in ("atom", "bead", "chain_intermolecular")))
    save_model(model, out, metadata=meta)
    return result


# ------------------------------------------------------------------------------------------------ export
def run_export(model, backend, topology, pdb, out):
    """Write ``out/system.xml`` (serialized CG System with the model's forces) and ``out/cg.pdb``."""
    from openmm_plugin.system import CGPotential, save_system

    from .topology import CGTopology

    top = CGTopology.load_json(topology)
    _, box = _read_pdb(pdb)
    pot = CGPotential(model)
    pot.check_topology(top, source=topology)  # refuse a topology or PDB the model was not trained for
    pot.check_topology(pdb)
    system = pot.create_system(top, box=box, backend=backend)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_system(system, out / "system.xml")
    shutil.copyfile(pdb, out / "cg.pdb")
    return {"system": out / "system.xml", "pdb": out / "cg.pdb"}


def _read_pdb(pdb):
    """Positions (n, 3) nm and box (3, 3) nm of a CG PDB, read once; the box (CRYST1) is required."""
    from openmm import app, unit

    try:
        f = app.PDBFile(str(pdb))
    except FileNotFoundError:
        raise EnpcgError(f"{pdb}: CG structure not found. Fix: run `enpcg map` first or pass --pdb") from None
    vecs = f.topology.getPeriodicBoxVectors()
    if vecs is None:
        raise EnpcgError(f"{pdb}: no CRYST1 record, so the periodic box is unknown. Fix: write the PDB with a box")
    box = np.array([[v[k] for k in range(3)] for v in vecs.value_in_unit(unit.nanometer)])
    return np.array(f.getPositions(asNumpy=True).value_in_unit(unit.nanometer)), box


# ----------------------------------------------------------------------------------------------- calibrate
def reference_diffusion(frames, topology) -> dict:
    """Diffusion coefficient per bead type of a mapped atomistic trajectory.

    frames : :class:`enpcg.h5md.Frames` with times (ps) and, when periodic, boxes (nm); consecutive frames must
        be close enough to unwrap (no bead moves half a box). topology : CGTopology (bead types).
    Returns {bead type: (D nm^2/ps, standard error nm^2/ps)}, centre-of-mass drift removed.
    """
    from .analysis import trajectory_from_arrays
    from .dynamics import diffusion_coefficient_or_bound, mean_squared_displacement

    if not np.all(np.isfinite(frames.time)) or frames.positions.shape[0] < 10:
        raise EnpcgError("the reference needs at least 10 frames with times to give a diffusion coefficient. "
                         "Fix: map an atomistic trajectory sampled at regular times")
    traj = trajectory_from_arrays(frames.positions, frames.box, topology, time=frames.time)
    types = np.asarray(topology.bead_types)
    out = {}
    for t in topology.type_names():
        lag, msd = mean_squared_displacement(traj, np.flatnonzero(types == t), masses=topology.masses,
                                             progress=False)
        fit = diffusion_coefficient_or_bound(lag, msd, label=f"bead type {t!r}")
        out[t] = (float(fit["D"]), float(fit["stderr"]))
    return out


def run_calibrate(model, backend, pdb, reference, topology, out, mode, temperature, timestep, friction, time_ps,
                  report_ps, tolerance, max_runs, platform, seed):
    """Fit CG dynamics to the mapped atomistic diffusion: ``out/dynamics.json`` and ``out/diffusion.png``.

    ``mode`` "friction": a Langevin friction per bead type (1/ps) fitted so the CG D of each type equals the
    mapped one (:func:`openmm_plugin.cg_dynamics.fit_friction`); "time_scale": one factor s, mapped time =
    s x CG time, at the fixed ``friction``. Each CG run lasts ``time_ps`` (plus a fifth of it to equilibrate).
    """
    from openmm_plugin.cg_dynamics import calibrate_time_scale, fit_friction
    from openmm_plugin.system import CGPotential

    from .h5md import read_h5md
    from .models.base import check_model_matches
    from .topology import CGTopology

    top = CGTopology.load_json(topology)
    frames = read_h5md(reference, require_forces=False)
    if frames.positions.shape[1] != top.n_beads:
        raise EnpcgError(f"{reference}: {frames.positions.shape[1]} beads but {topology} has {top.n_beads}. "
                         "Fix: pass the mapped H5MD of the same mapping")
    pot = CGPotential(model)
    # refuse a model trained for another mapping or topology before the diffusion analysis and CG runs
    check_model_matches(pot.model, mapping_hash=frames.metadata.get("mapping_hash"), source=reference)
    pot.check_topology(top, source=topology)
    pos, box = _read_pdb(pdb)
    pot.check_topology(pdb)
    ref = reference_diffusion(frames, top)
    target = {t: d for t, (d, _) in ref.items()}
    system = pot.create_system(pot.topology, box=box, backend=backend)
    types = np.asarray(pot.topology.bead_types)
    groups = {t: np.flatnonzero(types == t) for t in pot.topology.type_names()}
    if set(groups) != set(target):
        raise EnpcgError(f"{model}: bead types {sorted(groups)} differ from the reference's {sorted(target)}")
    report = max(1, int(round(report_ps / timestep)))
    steps = max(report * 20, int(round(time_ps / timestep)))
    kw = dict(temperature=temperature, timestep=timestep, steps=steps, record_interval=report,
              equilibration_steps=steps // 5, platform=None if platform == "auto" else platform, seed=seed)
    if mode == "friction":
        cal = fit_friction(system, pos, box, groups, target, initial_friction=friction, rel_tol=tolerance,
                           max_iter=max_runs, **kw)
    else:
        cal = calibrate_time_scale(system, pos, box, groups, target, friction=friction, **kw)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cal.save(out / "dynamics.json")
    _plot_calibration(cal, out / "diffusion.png")
    print("reference D (nm^2/ps): " + ", ".join(f"{t} {d:.4g} +- {e:.1g}" for t, (d, e) in ref.items()))
    print("raw CG speed-up at friction {:g}/ps: ".format(friction)
          + ", ".join(f"{t} {v:.2f}x" for t, v in cal.raw_speed_up.items()))
    if mode == "friction":
        print("fitted frictions (1/ps): " + ", ".join(f"{t} {g:.4g}" for t, g in cal.frictions.items()))
    else:
        print(f"time scale: 1 ps of CG time = {cal.time_scale:.4g} ps of mapped atomistic time")
    return {"dynamics": out / "dynamics.json", "plot": out / "diffusion.png"}


def _plot_calibration(cal, path):
    """CG diffusion coefficient of each run against its friction, with the mapped atomistic target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import atomic_path

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for k, (t, target) in enumerate(sorted(cal.target_diffusion.items())):
        g = [run["frictions"][t] for run in cal.history]
        d = [run["diffusion"][t] for run in cal.history]
        e = [run["stderr"][t] for run in cal.history]
        ax.errorbar(g, d, yerr=e, marker="o", ls="-", color=f"C{k}", label=f"CG {t}")
        ax.axhline(target, color=f"C{k}", ls="--", label=f"mapped atomistic {t}")
    ax.set_xlabel("Langevin friction (1/ps)")
    ax.set_ylabel("D (nm$^2$/ps)")
    ax.set_title(f"{cal.mode} calibration at {cal.temperature:g} K", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ simulate
# The overlap limit of `enpcg simulate --min-distance auto`, as a fraction of the model's fitted range (the
# smallest non-bonded pair distance of its training data). The minimum of a finite sample is not a hard wall:
# a simulation as long as the training run samples the tail of g(r) about as far (measured on the demo melt,
# 200 training frames: the MS-CG spline and the priors simulations of 100 ps came to 0.93-0.94 x the range),
# so the limit leaves 20 % for that and stops only at pairs well inside the model's extrapolation (with the
# priors' r^-12 repulsion, eps = kT at sigma: 0.8 sigma costs 15 kT).
MIN_DISTANCE_FACTOR = 0.8


def _smallest_pair_distance(files, topology, search=1.0, chunk=256):
    """Smallest distance (nm) between non-excluded beads (minimum image) over every frame of CG H5MD
    ``files``, found with a cell list within ``search`` nm (at most half the smallest box width); None when no
    frame has such a pair that close."""
    import torch

    from .h5md import n_frames, read_h5md
    from .neighbors import PairList, perpendicular_widths

    best = None
    pairs = None
    for path in files:
        total = n_frames(path)
        for start in range(0, total, chunk):
            fr = read_h5md(path, frames=slice(start, min(start + chunk, total)), require_forces=False)
            if pairs is None:
                radius = search if fr.box is None else min(search, 0.5 * float(perpendicular_widths(fr.box[0]).min()))
                pairs = PairList(topology.n_beads, radius, topology.excluded_pairs(), "vesin", compact=True)
            with torch.no_grad():
                _, _, _, d = pairs(torch.as_tensor(fr.positions), None if fr.box is None else torch.as_tensor(fr.box))
            if d.shape[0]:
                r = float(torch.linalg.norm(d, dim=-1).min())
                best = r if best is None else min(best, r)
    return best


def fitted_pair_range(model_dir, topology):
    """The lower end of a model's fitted range of non-bonded pair distances: (r nm or None, where it came from).

    In order: ``min_pair_distance`` (nm) in the model's metadata; else the smallest non-bonded pair distance
    of its training data, when the files named in the metadata are there and still hash to its
    ``training_data_hash`` where it records one (MS-CG splines are fitted exactly over that range, and a
    network has seen no pair closer); else the smallest repulsion sigma of a priors term (the 1st percentile of the nearest non-bonded
    neighbour distances of the training data, :func:`enpcg.fitting.boltzmann.fit_priors`); else None.
    """
    from .h5md import data_hash

    path = Path(model_dir) / "model.json"
    try:
        desc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, f"{path} is unreadable"
    meta = desc.get("metadata") or {}
    r = meta.get("min_pair_distance")
    if isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0:
        return float(r), f"min_pair_distance of {path}"
    data = meta.get("training_data")
    files = [data] if isinstance(data, str) else [str(f) for f in data] if isinstance(data, list) else []
    why = "the model's metadata names no training data"
    if files:
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            why = f"its training data {missing[0]} is not there"
        elif meta.get("training_data_hash") and data_hash(files) != meta["training_data_hash"]:
            why = f"its training data {files[0]} changed since the fit (training_data_hash differs)"
        else:
            r = _smallest_pair_distance(files, topology)
            if r is not None:
                return r, "the smallest non-bonded pair distance in the training data"
            why = "its training data hold no non-bonded pair within 1 nm"
    sigmas = []

    def walk(node):
        if isinstance(node, dict):
            rep = node.get("repulsion")
            if isinstance(rep, dict):
                sigmas.extend(float(v["sigma"]) for v in rep.values() if isinstance(v, dict) and "sigma" in v)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(desc.get("config"))
    if sigmas:
        return min(sigmas), f"the priors' repulsion sigma; {why}"
    return None, why


def _health_limits(model, topology, min_distance, max_force):
    """HealthLimits of `enpcg simulate` from its options (min_distance: 'auto', 'off' or nm; max_force
    kJ/mol/nm, 0 = off)."""
    from openmm_plugin.reporters import HealthLimits

    text = str(min_distance).strip().lower()
    source = ""
    if text == "auto":
        r, source = fitted_pair_range(model, topology)
        limit = None if r is None else MIN_DISTANCE_FACTOR * r
        source = source if r is None else f"{MIN_DISTANCE_FACTOR} x {r:.4g} nm, {source}"
        if limit is None:
            _say(f"simulate: the bead-overlap check is off: no fitted pair range is known for {model} ({source}). "
                 "Fix: pass --min-distance NM to set one")
        else:
            _say(f"simulate: stops if non-bonded beads come closer than {limit:.4g} nm ({source})")
    elif text in ("off", "none", "0", "0.0"):
        limit = None
    else:
        try:
            limit = float(text)
        except ValueError:
            limit = float("nan")
        if not (np.isfinite(limit) and limit > 0):
            raise EnpcgError(f"simulate.min_distance must be 'auto', 'off' or a distance in nm > 0; you supplied "
                             f"{min_distance!r}. Fix: e.g. --min-distance auto or --min-distance 0.25")
        source = "--min-distance"
    if not (np.isfinite(max_force) and max_force >= 0):
        raise EnpcgError(f"simulate.max_force must be >= 0 kJ/mol/nm (0 = no limit); you supplied {max_force!r}")
    return HealthLimits(min_distance=limit, max_force=float(max_force) or None, check_displacement=True,
                        excluded_pairs=topology.excluded_pairs(), min_distance_source=source)


def _model_sha256(model_dir):
    """sha256 of a model folder's model.json and model.pt: a resumed simulation must run the same model."""
    import hashlib

    h = hashlib.sha256()
    for name in ("model.json", "model.pt"):
        path = Path(model_dir) / name
        h.update(name.encode() + (path.read_bytes() if path.is_file() else b""))
    return h.hexdigest()


def run_simulate(model, backend, pdb, out, time_ps, timestep, temperature, friction, report_ps, platform, seed,
                 positions=None, dynamics="", checkpoint_ps=10.0, resume=True, min_distance="auto", max_force=1e6):
    """CG Langevin simulation of a fitted model: ``out/trajectory.dcd``, ``out/log.csv``, ``out/final_state.xml``.

    ``dynamics``: a ``dynamics.json`` from :func:`run_calibrate`; its per-bead-type frictions (1/ps) replace
    ``friction`` and its time scale adds the column "Mapped time (ps)" to the log.

    Checkpoints every ``checkpoint_ps`` (ps, rounded to whole reports; 0 = none) into ``out/checkpoint.chk``;
    with ``resume`` an interrupted run (kill -9 included) continues from its last checkpoint with no gap or
    duplicate frame (:func:`openmm_plugin.simulate.run_simulation`). Health checks at every report stop the run
    with an error naming the step and the beads: non-bonded beads closer than ``min_distance`` ('auto':
    ``MIN_DISTANCE_FACTOR`` x :func:`fitted_pair_range`; 'off'; or nm), a force above ``max_force`` kJ/mol/nm
    (0 = no limit), a NaN energy, or a bead that moved more than a box width between reports.
    """
    from openmm_plugin.simulate import run_simulation
    from openmm_plugin.system import CGPotential

    pot = CGPotential(model)
    pdb_pos, box = _read_pdb(pdb)
    pot.check_topology(pdb)  # refuse a structure of other beads than the model was trained for
    pos = pdb_pos if positions is None else positions
    system = pot.create_system(pot.topology, box=box, backend=backend)
    # a TorchForce with fixed-capacity cell lists: restarted with larger ones if they overflow (else None)
    cell_lists = pot.cell_lists(pot.topology, box=box, backend=backend)
    steps = int(round(time_ps / timestep))
    report = max(1, int(round(report_ps / timestep)))
    if not (np.isfinite(checkpoint_ps) and checkpoint_ps >= 0):
        raise EnpcgError(f"simulate.checkpoint_ps must be >= 0 ps (0 = no checkpoints); you supplied {checkpoint_ps!r}")
    checkpoint = None if checkpoint_ps == 0 else report * max(1, int(round(checkpoint_ps / (report * timestep))))
    limits = _health_limits(model, pot.topology, min_distance, max_force)
    time_scale = 1.0
    if dynamics:
        from openmm_plugin.cg_dynamics import DynamicsCalibration

        cal = DynamicsCalibration.load(dynamics)
        if abs(cal.temperature - temperature) > 1e-6 * temperature:
            import warnings

            warnings.warn(f"{dynamics}: calibrated at {cal.temperature} K but this run is at {temperature} K; "
                          "the friction is applied as is (CG speed-ups change with temperature)", stacklevel=2)
        friction = cal.particle_frictions(pot.topology.bead_types)
        time_scale = cal.time_scale
    res = run_simulation(system, pot.topology.to_openmm_topology(box), pos, box, out, steps=steps,
                         timestep=timestep, temperature=temperature, friction=friction, report_interval=report,
                         platform=None if platform == "auto" else platform, seed=seed, time_scale=time_scale,
                         checkpoint_interval=checkpoint, resume=resume, health=limits,
                         identity={"model_sha256": _model_sha256(model)}, cell_lists=cell_lists)
    pot.topology.write_pdb(Path(out) / "cg.pdb", pos, box)
    return res


def _fit_oriented(data, out, temperature, cutoff, epochs, batch_size, lr, device, seed, resume, max_minutes,
                  length_scale, prior=""):
    """Force-and-torque matching of an ``oriented_neural`` model to an oriented CG dataset (enpcg map of a
    mapping whose beads declare ``orientation``); saves the model and ``training/history.json``.

    prior : "" (the network alone), "gay_berne" (uniaxial beads: a Gay-Berne prior fitted first, then the
    network as a correction on top of it, :func:`enpcg.oriented.fit.fit_prior_and_correction`; saved as an
    ``oriented_sum``) or the folder of a fitted oriented model to use as the frozen prior."""
    import shutil

    import numpy as np
    import torch

    from .models import create_model, save_model
    from .oriented.data import read_oriented
    from .oriented.fit import chiral_energy_fraction, fit_oriented, oriented_errors
    from .oriented.pairs import nonbonded_pairs, pair_displacements

    d = read_oriented(data)
    # A weak repulsive core just inside the closest approach seen in the data keeps CG runs from overlapping.
    sub = d.select(slice(0, min(d.n_frames, 20)))
    pairs = nonbonded_pairs(d.topology)
    box = None if sub.box is None else torch.as_tensor(sub.box)
    r_min = float(torch.linalg.norm(pair_displacements(torch.as_tensor(sub.positions), pairs, box), dim=-1).min())
    kt = 0.0083144626 * temperature
    train_dir = Path(out) / "training"
    if not resume and train_dir.exists():
        shutil.rmtree(train_dir)
    t0 = time.time()
    if prior:
        net, history = _fit_oriented_with_prior(d, prior, data, cutoff, kt, r_min, epochs, batch_size, lr, device,
                                                seed, length_scale, train_dir, max_minutes)
    else:
        # The learned, orientation-dependent contact distance starts at the closest approach in the data.
        net = create_model("oriented_neural", d.topology, cutoff=cutoff, core_radius=round(0.9 * r_min, 4),
                           contact=True, contact_init=round(r_min, 4), contact_width=round(r_min, 4),
                           energy_scale=2 * kt, seed=seed).double()
        history = fit_oriented(net, d, epochs=epochs, lr=lr, batch_size=batch_size,
                               length_scale=length_scale or None, seed=seed,
                               max_seconds=(max_minutes * 60) or None, out_dir=train_dir, device=_device(device),
                               progress=True)
    check = d.select(np.asarray(history["val_frames"], dtype=np.int64))   # frames the fit held out
    net.to("cpu")
    from .h5md import read_h5md

    meta = {"training_data": str(data), "n_frames": d.n_frames, "temperature": temperature,
            "mapping_hash": read_h5md(data, frames=[0]).metadata.get("mapping_hash"),
            "training_data_hash": _training_data_hash(data),
            "fit_seconds": round(time.time() - t0, 2), "length_scale": history["length_scale"],
            "validation_errors": oriented_errors(net, check),
            "chiral_energy_fraction": chiral_energy_fraction(net, check)}
    save_model(net, out, metadata=meta)
    return {"model": Path(out)}


def _fit_oriented_with_prior(d, prior, data, cutoff, kt, r_min, epochs, batch_size, lr, device, seed, length_scale,
                             train_dir, max_minutes):
    """(oriented_sum model, correction history) of ``enpcg fit --model oriented_neural --prior ...``; stages
    checkpointed below ``train_dir`` (a rerun with ``--resume`` goes on from them)."""
    from .fileio import write_json
    from .models import create_model, load_model
    from .models.base import check_model_matches
    from .oriented.base import OrientedModel
    from .oriented.fit import fit_prior_and_correction

    kinds = set(d.topology.orientations)
    correction = create_model("oriented_neural", d.topology, cutoff=cutoff, n_rbf=16, hidden=32, depth=2,
                              chiral=True, energy_scale=0.4 * kt, seed=seed,
                              switch_distance=round(cutoff - 0.2, 4) if cutoff > 0.4 else None,
                              apolar=kinds == {"director"}).float()
    common = dict(epochs=epochs, lr=lr, batch_size=batch_size, length_scale=length_scale or None, seed=seed,
                  device=_device(device), progress=True, out_dir=train_dir,
                  max_seconds=(max_minutes * 60) or None)
    if prior == "gay_berne":
        if kinds != {"director"} or len(set(d.topology.bead_types)) != 1:
            raise EnpcgError(f"fit.prior: 'gay_berne' needs uniaxial beads of one type; {data} has orientations "
                             f"{sorted(kinds)} and bead types {sorted(set(d.topology.bead_types))}. Fix: map "
                             "with 'orientation: director' beads of one type, or leave --prior empty")
        # Start: a prolate ellipsoid as wide as the closest approach in the data, kT deep; Adam then L-BFGS
        # converge it (the known-answer test starts 25-150 % off the truth).
        start = create_model("gay_berne", d.topology, sigma=r_min, epsilon=kt, s_par=2.5 * r_min, s_perp=r_min,
                             e_par=0.5, e_perp=1.0, cutoff=cutoff,
                             switch_distance=round(cutoff - 0.2, 4) if cutoff > 0.4 else None).double()
        model, hist = fit_prior_and_correction(start, correction, d, **common)
    else:
        fixed = load_model(prior)
        if not isinstance(fixed, OrientedModel):
            raise EnpcgError(f"fit.prior: {prior} holds a {fixed.kind} model, not an oriented one. Fix: pass "
                             "'gay_berne' or the folder of an oriented model fitted on this mapping")
        check_model_matches(fixed, topology=d.topology, source=data)
        model, hist = fit_prior_and_correction(fixed, correction, d, prior_epochs=0, lbfgs_epochs=0, **common)
    write_json(Path(train_dir) / "history.json", hist)
    return model, hist["correction"]


# ------------------------------------------------------------------------------------------------ analyze
def _parse_trajectories(spec):
    items = []
    for part in [s.strip() for s in str(spec).split(",") if s.strip()]:
        label, _, path = part.rpartition("=")
        items.append((label or Path(path).parent.name or Path(path).stem, path))
    if not items:
        raise EnpcgError("analyze.trajectories is empty. Fix: pass --trajectories LABEL=PATH[,LABEL=PATH]")
    return items


def load_reference_trajectory(reference, topology):
    """mdtraj trajectory of the reference: a CG H5MD dataset or any mdtraj-readable file."""
    from .analysis import trajectory_from_arrays
    from .h5md import read_h5md

    ref = Path(reference)
    if ref.suffix in (".h5", ".h5md", ".hdf5"):
        fr = read_h5md(ref, require_forces=False)
        return trajectory_from_arrays(fr.positions, fr.box, topology, time=fr.time)
    return _load_traj(ref, topology)


def _load_traj(path, topology, skip_ps=0.0):
    import mdtraj as md

    path = Path(path)
    if not path.exists():
        raise EnpcgError(f"{path}: trajectory not found")
    mdtop = md.Topology.from_openmm(topology.to_openmm_topology())
    traj = md.load(str(path), top=mdtop)
    if traj.n_atoms != topology.n_beads:
        raise EnpcgError(f"{path}: {traj.n_atoms} particles, but the CG topology has {topology.n_beads} beads")
    if skip_ps > 0 and traj.n_frames > 1:
        t = traj.time - traj.time[0]
        traj = traj[t >= skip_ps] if np.any(t >= skip_ps) else traj
    return traj


def run_analyze(reference, topology, trajectories, out, skip_ps, criteria_for=None, baseline=None):
    """Compare trajectories with the reference; writes ``out/report.md``, ``out/metrics.json`` and plots."""
    from . import analysis
    from .topology import CGTopology

    top = CGTopology.load_json(topology)
    ref = load_reference_trajectory(reference, top)
    results = {}
    for label, path in _parse_trajectories(trajectories):
        traj = _load_traj(path, top, skip_ps)
        results[label] = analysis.compare_structure(ref, traj, top)
    criteria = {}
    base = results.get(baseline) if baseline else None
    for label in (criteria_for or list(results)):
        if label != baseline:
            criteria[label] = analysis.structure_criteria(results[label], base)
    out = Path(out)
    plots = analysis.plot_comparison(list(results.values()), out, labels=list(results),
                                     reference_label="mapped atomistic")
    report = analysis.write_report(results, plots, out, "enpcg: CG structure against the mapped reference",
                                   criteria=criteria)
    return {"report": report, "metrics": out / "metrics.json"}


# ------------------------------------------------------------------------------------------------ properties
PROPERTY_KINDS = ("modes", "phonons", "elastic", "equivariance")


def _properties_potential(model, system):
    """The potential of ``enpcg properties``: (Potential, description dict, periodic flag of the model:
    True, False or None when it does not say)."""
    import torch  # before openmm deserialises a TorchForce: openmm-torch needs libtorch loaded

    from .properties import OpenMMPotential, TorchPotential

    if system:
        from openmm_plugin.system import load_system

        sys_ = load_system(system)
        return (OpenMMPotential(sys_), {"system": str(system), "kind": "openmm", "platform": "Reference"},
                bool(sys_.usesPeriodicBoundaryConditions()))
    import warnings

    from .models import load_model

    path = BUNDLED_ENP if model == "enp" else Path(model)
    if not (path / "model.json").is_file():
        raise EnpcgError(f"properties.model {model!r}: no model.json in {path}. Fix: pass a model folder written by "
                         "`enpcg fit` or `enpcg train`, 'enp' for the shipped equivariant potential, or --system "
                         "for an OpenMM System XML")
    with warnings.catch_warnings():  # the shipped ENP predates some metadata fields: irrelevant to properties
        warnings.filterwarnings("ignore", message=".*metadata lacks", category=UserWarning)
        m = load_model(path, dtype=torch.float64)  # float64: Hessians and audits need double round-off
    cfg = m.config

    def declared(c):
        if "periodic" in c:
            return bool(c["periodic"])
        flags = [declared(t.get("config", {})) for t in c.get("terms", [])]
        flags = [f for f in flags if f is not None]
        return any(flags) if flags else None

    return TorchPotential.from_model(m), {"model": str(path), "kind": m.kind}, declared(cfg)


def _parse_supercell(spec):
    try:
        reps = tuple(int(v) for v in str(spec).replace(" ", "").split(","))
    except ValueError:
        reps = ()
    if len(reps) != 3 or min(reps) < 1:
        raise EnpcgError(f"properties.supercell must be three whole numbers >= 1 like 3,3,3; you supplied {spec!r}")
    return reps


def _parse_k_path(spec):
    """'G:0,0,0;X:0.5,0,0' -> [('G', (0, 0, 0)), ('X', (0.5, 0, 0))] (fractional reciprocal coordinates)."""
    corners = []
    for part in [p.strip() for p in str(spec).split(";") if p.strip()]:
        label, _, q = part.rpartition(":")
        try:
            v = tuple(float(c) for c in q.split(","))
        except ValueError:
            v = ()
        if len(v) != 3 or not np.all(np.isfinite(v)):
            raise EnpcgError(f"properties.k_path: corner {part!r} must be LABEL:q1,q2,q3 with three numbers. Fix: e.g. "
                             "--k-path 'G:0,0,0;X:0.5,0,0;M:0.5,0.5,0'")
        corners.append((label or f"q{len(corners)}", v))
    if len(corners) < 2:
        raise EnpcgError(f"properties.k_path needs at least two corners separated by ';'; you supplied {spec!r}")
    return corners


def _unit_cell(x, box, reps, tol=0.02):
    """The unit cell (first m particles, cell rows box / n) of a structure that is ``reps`` cells ordered cell
    by cell; refuses a structure more than ``tol`` nm (minimum image) away from that supercell."""
    from .properties.crystals import supercell

    n_cells = int(np.prod(reps))
    if len(x) % n_cells:
        raise EnpcgError(f"properties.supercell {reps}: {len(x)} particles are not a whole number of {n_cells} cells")
    m = len(x) // n_cells
    cell = box / np.asarray(reps, dtype=np.float64)[:, None]
    ideal, _, _ = supercell(x[:m], cell, reps)
    d = x - ideal
    d -= np.round(d @ np.linalg.inv(box)) @ box
    worst = float(np.max(np.linalg.norm(d, axis=1)))
    if worst > tol:
        raise EnpcgError(f"properties.supercell {reps}: the structure is not {n_cells} copies of its first {m} "
                         f"particles (a particle is {worst:.3g} nm from its lattice site; {tol} nm allowed). Fix: "
                         "write the crystal cell by cell as enpcg.properties.crystals.supercell orders it, or leave "
                         "phonons out of --what")
    return x[:m], cell


def _plot_equivariance(summary, path):
    """Bar chart of the worst leakages of an equivariance audit (log scale, tolerance dashed); PNG, atomic."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .fileio import atomic_path

    keys = ["so3_force_leakage", "so3_energy_leakage", "o3_force_leakage", "o3_energy_leakage",
            "translation_leakage"]
    labels = ["SO(3)\nforce", "SO(3)\nenergy", "O(3)\nforce", "O(3)\nenergy", "translation"]
    vals = [max(float(summary[k]), 1e-18) for k in keys]  # exact zeros drawn at 1e-18 on the log axis
    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(labels, vals, color=["tab:blue" if v <= summary["tolerance"] else "tab:red" for v in vals])
    ax.axhline(summary["tolerance"], color="grey", linestyle="--", linewidth=0.8, label="tolerance")
    ax.set_yscale("log")
    ax.set(ylabel="worst relative leakage", title=f"equivariance audit: SO(3) {'ok' if summary['so3_ok'] else 'BROKEN'}"
           f", O(3) {'ok' if summary['o3_ok'] else 'broken'}")
    ax.legend(fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else None  # JSON has no NaN; null marks an undefined number
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def run_properties(model, system, pdb, what, out, periodic, minimize, force_tolerance, supercell, k_path,
                   n_rotations, seed):
    """Properties of a model (or an OpenMM System) at one structure: ``out/properties.json`` and plots.

    ``what`` (comma list): "equivariance" (:func:`enpcg.properties.audit_equivariance` at the structure as
    given; ``equivariance.png``), "modes" (normal modes of the Hessian: autograd for a model, finite differences
    for a System; ``modes.png``), "phonons" (force constants of the ``supercell`` structure, dispersion along
    ``k_path``; ``dispersion.png``), "elastic" (elastic tensor at a mechanical equilibrium, analytic for a model,
    finite-difference stress-strain for a System; ``elastic.png``). ``minimize`` relaxes the positions at the
    fixed box first (for modes, phonons and elastic constants). Units: nm, amu, kJ/mol; omega rad/ps
    (wavenumbers cm^-1), elastic constants kJ/mol/nm^3 and GPa.
    """
    import time as _time

    from . import properties as props
    from .fileio import atomic_path, write_json

    kinds = [w.strip() for w in str(what).split(",") if w.strip()]
    bad = [w for w in kinds if w not in PROPERTY_KINDS]
    if bad or not kinds:
        raise EnpcgError(f"properties.what has unknown or no properties {bad or what!r}; allowed: "
                         f"{list(PROPERTY_KINDS)}. Fix: e.g. --what modes,equivariance")
    if "phonons" in kinds and not str(supercell).strip():
        raise EnpcgError("properties: phonons need --supercell n1,n2,n3 (the structure as unit cells). Fix: give it, "
                         "or leave phonons out of --what")
    reps = _parse_supercell(supercell) if "phonons" in kinds else None
    path_corners = _parse_k_path(k_path) if "phonons" in kinds else None
    force_tolerance = float(force_tolerance)
    if not force_tolerance > 0:
        raise EnpcgError(f"properties.force_tolerance must be > 0 kJ/mol/nm; you supplied {force_tolerance}")
    from .errors import check_int

    check_int("properties.seed", seed, 0, 0)  # numpy's generator refuses negative seeds with a bare ValueError
    check_int("properties.n_rotations", n_rotations, 1, 4)
    pot, source, model_periodic = _properties_potential(model, system)
    if str(pdb) in ("auto", "") and model == "enp" and not system:
        from systems.polyethylene import default_melt

        melt = default_melt()
        pdb = "bundled melt"
        x, box = np.asarray(melt.positions, dtype=np.float64), np.asarray(melt.box, dtype=np.float64)
    else:
        pdb = "out/cg/cg.pdb" if str(pdb) in ("auto", "") else pdb
        x, box = _read_pdb(pdb)
    if len(x) != pot.n_particles:
        raise EnpcgError(f"{pdb}: {len(x)} particles but the {source['kind']} potential has "
                         f"{pot.n_particles}. Fix: pass the structure of this model's topology")
    use_box = {"true": True, "false": False}.get(periodic, model_periodic is not False)
    b = box if use_box else None
    if b is None and ("phonons" in kinds or "elastic" in kinds):
        raise EnpcgError("properties: phonons and elastic constants need a periodic box, but --periodic false or the "
                         "model's periodic: false leaves it out. Fix: --periodic true with a periodic model")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"potential": source, "n_particles": int(pot.n_particles), "periodic": b is not None,
              "box_nm": None if b is None else b, "structure": str(pdb),
              "units": {"length": "nm", "mass": "amu", "energy": "kJ/mol", "omega": "rad/ps",
                        "wavenumber": "cm^-1", "elastic": "kJ/mol/nm^3 (and GPa)", "leakage": "relative"}}
    outputs = {"properties": out / "properties.json"}
    timings = {}
    if "equivariance" in kinds:  # first: cheap, and it needs the forces of the structure as given
        t0 = _time.time()
        audit = props.audit_equivariance(pot, x, b, n_rotations=n_rotations, seed=seed)
        result["equivariance"] = audit.summary()
        outputs["equivariance_plot"] = _plot_equivariance(result["equivariance"], out / "equivariance.png")
        timings["equivariance"] = _time.time() - t0
        _say(f"equivariance: worst SO(3) force leakage {audit.so3_force_leakage:.2e}, O(3) "
             f"{audit.o3_force_leakage:.2e}, translation {audit.translation_leakage:.2e} "
             f"({'ok' if audit.o3_ok else 'FLAGGED'} at tolerance {audit.tolerance:g})")
    xs = x
    if minimize and any(k in kinds for k in ("modes", "phonons", "elastic")):
        from .properties.elastic import minimize as relax

        t0 = _time.time()
        mres = relax(pot, x, b, tolerance=force_tolerance)
        xs = mres.positions
        result["minimization"] = {"energy_kj_mol": mres.energy, "rms_force_kj_mol_nm": mres.rms_force,
                                  "max_force_kj_mol_nm": mres.max_force, "converged": mres.converged,
                                  "method": mres.method}
        timings["minimization"] = _time.time() - t0
        _say(f"minimised: E = {mres.energy:.6g} kJ/mol, RMS force {mres.rms_force:.2e} kJ/mol/nm"
             + ("" if mres.converged else f" (tolerance {force_tolerance:g} not reached)"))
    if "modes" in kinds:
        t0 = _time.time()
        _say(f"modes: Hessian of {3 * len(xs)} coordinates ...")
        modes = props.normal_modes(pot, xs, b)
        result["modes"] = {**modes.summary(), "omega_rad_ps": modes.omega, "wavenumber_cm": modes.wavenumber_cm,
                           "rigid_body": modes.rigid_body}
        outputs["modes_plot"] = props.plot_mode_spectrum(modes, out / "modes.png")
        timings["modes"] = _time.time() - t0
        s = result["modes"]
        _say(f"modes: {s['n_modes']} ({s['n_rigid']} rigid-body, residual {s['rigid_body_max_abs_omega']:.2e} "
             f"rad/ps), {s['n_imaginary_internal']} imaginary, lowest internal omega {s['lowest_internal_omega']:.4g}"
             f" rad/ps, highest {s['highest_omega']:.4g} rad/ps")
    if "phonons" in kinds:
        t0 = _time.time()
        x0, cell = _unit_cell(xs, b, reps)
        disp = props.phonon_dispersion(pot, x0, cell, reps, path=path_corners)
        fc = disp.force_constants
        gamma = np.flatnonzero(np.linalg.norm(disp.k, axis=1) == 0)
        result["phonons"] = {"supercell": list(reps), "unit_cell_particles": int(len(x0)), "cell_nm": cell,
                             "asr_violation": fc.asr_violation, "boundary_fraction": fc.boundary_fraction,
                             "ticks": [[float(d), lab] for d, lab in disp.ticks], "distance_inv_nm": disp.distance,
                             "q_fractional": disp.q, "omega_rad_ps": disp.omega,
                             "max_omega_rad_ps": float(np.max(disp.omega)),
                             "min_omega_rad_ps": float(np.min(disp.omega)),
                             "gamma_omega_rad_ps": disp.omega[gamma[0]] if len(gamma) else None}
        outputs["dispersion_plot"] = props.plot_dispersion(disp, out / "dispersion.png")
        timings["phonons"] = _time.time() - t0
        _say(f"phonons: {disp.omega.shape[1]} branches, max omega {np.max(disp.omega):.4g} rad/ps, ASR violation "
             f"{fc.asr_violation:.1e}")
    if "elastic" in kinds:
        from .properties import elastic as el

        t0 = _time.time()
        if isinstance(pot, props.OpenMMPotential):
            res = el.elastic_tensor_fd(pot, xs, b)
        else:
            res = el.elastic_tensor(pot, xs, b, force_tolerance=force_tolerance)
        gpa = props.KJ_MOL_NM3_IN_GPA
        result["elastic"] = {"method": res.method, "voigt_kj_mol_nm3": res.voigt, "voigt_gpa": res.voigt * gpa,
                             "stress_kj_mol_nm3": res.stress, "volume_nm3": res.volume,
                             "moduli_kj_mol_nm3": res.moduli(), "symmetry": res.symmetry()}
        import matplotlib.pyplot as plt

        fig = el.plot_elastic_comparison({f"{source['kind']} model": res}, None, unit="GPa", difference=False)
        with atomic_path(out / "elastic.png") as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        outputs["elastic_plot"] = out / "elastic.png"
        timings["elastic"] = _time.time() - t0
        mod = res.moduli()
        _say(f"elastic ({res.method}): bulk modulus K_H {mod['K_H'] * gpa:.4g} GPa, shear G_H "
             f"{mod['G_H'] * gpa:.4g} GPa")
    result["timings_s"] = timings
    write_json(out / "properties.json", _jsonable(result))
    return outputs


# ------------------------------------------------------------------------------------------------ demo
# neural: the priors as OpenMM's own forces and the network as a TorchForce ("mixed"; 1.5x faster per step on
# 2 CPU cores than one TorchForce of both)
DEMO_BACKENDS = {"priors": "native", "mscg": "native", "spline": "native", "neural": "mixed"}
DEMO_LABELS = {"priors": "priors only", "mscg": "spline (MS-CG)", "spline": "spline (MS-CG + IBI)",
               "neural": "neural"}
DEMO_FIT = {"priors": {"model": "priors"}, "mscg": {"model": "spline", "refine_iterations": 0},
            "spline": {"model": "spline", "refine_iterations": 4}, "neural": {"model": "neural"}}


def run_demo(out, reference, models, n_frames, interval_steps, cg_time_ps, cg_timestep, epochs, platform, seed):
    """Every stage on the bundled polyethylene melt, into one folder; ends with report.md and metrics.json."""
    from .fileio import write_yaml
    from .h5md import read_h5md

    out = Path(out)
    kinds = [m.strip() for m in str(models).split(",") if m.strip()]
    bad = [m for m in kinds if m not in DEMO_BACKENDS]
    if bad:
        raise EnpcgError(f"demo.models has unknown model(s) {bad}; allowed: {list(DEMO_BACKENDS)}")
    if "priors" not in kinds:
        kinds.insert(0, "priors")  # the baseline every other model is judged against
    temperature = 450.0
    timings = {}

    def stage(name, fn, **kw):
        t0 = time.time()
        _say(f"{name} ...")
        res = fn(**kw)
        timings[name] = round(time.time() - t0, 1)
        write_yaml(out / "configs" / f"{name}.yaml",
                   {k: str(v) if isinstance(v, Path) else ("last mapped frame" if isinstance(v, np.ndarray) else v)
                    for k, v in kw.items()})
        _say(f"{name} done in {timings[name]} s")
        return res

    if reference == "enp":
        steps = (10 + n_frames) * interval_steps
        _say(f"reference 'enp': {steps} MD steps of the 1,008-atom melt with the equivariant potential; about "
             f"0.1 s per step on 2 CPU cores (~{steps * 0.1 / 60:.0f} min), milliseconds on a GPU")
    # The classical reference is the bundled TraPPE-UA melt; "enp" samples with the bundled equivariant
    # potential, whose frames and forces then are the force-matching data (one Hamiltonian for both).
    stage("sample", run_sample, reference={"classical": "default", "enp": "enp"}[reference],
          out=out / "atomistic.h5", n_frames=n_frames, interval_steps=interval_steps,
          equilibration_steps=10 * interval_steps, temperature=temperature, timestep=0.002, friction=1.0,
          platform=platform, seed=seed)
    stage("map", run_map, mapping="default", input=out / "atomistic.h5", atom_pdb="", out=out / "cg")
    last = read_h5md(out / "cg" / "cg.h5", frames=[-1], require_forces=False)
    start = last.positions[0]
    trajectories = []
    for kind in kinds:
        model_dir = out / "models" / kind
        prior = str(out / "models" / "priors") if kind == "neural" and "priors" in kinds else ""
        fit_kw = {"refine_iterations": 0, "refine_ps": 20.0, **DEMO_FIT[kind]}
        stage(f"fit-{kind}", run_fit, data=out / "cg" / "cg.h5", out=model_dir, temperature=temperature,
              cutoff=1.2, prior=prior, epochs=epochs, batch_size=8, lr=3e-3, patience=10, device="auto",
              seed=seed, resume=True, max_minutes=4.0, **fit_kw)
        stage(f"simulate-{kind}", run_simulate, model=model_dir, backend=DEMO_BACKENDS[kind],
              pdb=out / "cg" / "cg.pdb", out=out / "sims" / kind, time_ps=cg_time_ps, timestep=cg_timestep,
              temperature=temperature, friction=1.0, report_ps=0.5, platform=platform, seed=seed,
              positions=start)
        trajectories.append(f"{DEMO_LABELS[kind]}={out / 'sims' / kind / 'trajectory.dcd'}")
    res = stage("analyze", run_analyze, reference=out / "cg" / "cg.h5", topology=out / "cg" / "cg_topology.json",
                trajectories=",".join(trajectories), out=out / "report", skip_ps=min(10.0, cg_time_ps / 5),
                criteria_for=[DEMO_LABELS[k] for k in kinds if k != "priors"], baseline=DEMO_LABELS["priors"])
    write_yaml(out / "timings.yaml", timings)
    _print_headline(res["metrics"], DEMO_LABELS["spline"] if "spline" in kinds else None, timings)
    return {"report": res["report"], "metrics": res["metrics"], "timings": out / "timings.yaml"}


def _print_headline(metrics_path, headline, timings):
    """Print every model's structural checks, the headline (production) model first."""
    checks = json.loads(Path(metrics_path).read_text()).get("checks", {})
    labels = sorted(checks, key=lambda k: k != headline)
    for label in labels:
        rows = checks[label]
        n_pass = sum(bool(r["pass"]) for r in rows.values())
        tag = "headline model" if label == headline else "model"
        print(f"[enpcg] {tag} {label!r}: {n_pass}/{len(rows)} structure checks pass")
        for name, r in rows.items():
            print(f"    {name:40s} {r['value']!s:>24.24s}  limit {r['threshold']:.4g}  "
                  f"{'pass' if r['pass'] else 'FAIL'}")
    print(f"[enpcg] stage times (s): {timings}")
