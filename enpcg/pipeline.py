"""The pipeline's stages as plain functions (keyword arguments in, dict of output paths out).

The command line (:mod:`enpcg.cli`) resolves each stage's options and calls ``run_<stage>(**options)``;
Python users may call these directly. Units: nm, ps, kJ/mol, amu, K.
"""
from __future__ import annotations

import json
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


# ------------------------------------------------------------------------------------------------ map
def run_map(mapping, input, atom_pdb, out):
    """Map atomistic frames to beads: ``out/cg.h5``, ``out/cg_topology.json``, ``out/cg.pdb``."""
    from .h5md import read_h5md
    from .mapping import load_mapping, map_trajectory

    mapping_path = DEFAULT_MAPPING if mapping in ("default", "", None) else Path(mapping)
    head = read_h5md(input, frames=[0], require_forces=True)
    m = load_mapping(mapping_path, atom_topology=atom_pdb or None, n_atoms=head.n_particles, masses=head.masses)
    out = Path(out)
    cg = map_trajectory(m, input, out / "cg.h5", out_topology_json=out / "cg_topology.json", out_pdb=out / "cg.pdb")
    return {"cg_h5md": cg, "topology": out / "cg_topology.json", "pdb": out / "cg.pdb"}


# ------------------------------------------------------------------------------------------------ fit
def load_cg_dataset(path):
    """(frames, topology) of a CG H5MD file written by ``enpcg map``."""
    from .h5md import read_h5md
    from .topology import CGTopology

    fr = read_h5md(path, require_forces=True)
    topo = json.loads(fr.topology_json) if fr.topology_json else None
    if not isinstance(topo, dict) or "bead_types" not in topo:
        raise EnpcgError(f"{path}: /parameters/enpcg/topology_json holds no CG topology (bead_types missing): "
                         "this is not a mapped CG dataset. Fix: map the atomistic trajectory first (enpcg map) "
                         "and fit on its cg.h5")
    try:
        return fr, CGTopology.from_dict(topo)
    except (TypeError, EnpcgError) as e:
        raise EnpcgError(f"{path}: /parameters/enpcg/topology_json: {e}") from None


def _device(device):
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def run_fit(data, model, out, temperature, cutoff, prior, epochs, batch_size, lr, patience, device, seed, resume,
            refine_iterations=0, refine_ps=20.0, max_minutes=0.0, length_scale=0.0):
    """Fit a CG model to a CG dataset by force matching and save it to ``out`` (model.json + model.pt)."""
    from .models import load_model, save_model

    if model == "oriented_neural":
        return _fit_oriented(data, out, temperature, cutoff, epochs, batch_size, lr, device, seed, resume,
                             max_minutes, length_scale)

    fr, topology = load_cg_dataset(data)
    meta = {"mapping_hash": fr.metadata.get("mapping_hash"), "training_data": str(data),
            "n_frames": fr.n_frames, "temperature": temperature}
    t0 = time.time()
    if model == "priors":
        from .fitting.boltzmann import fit_priors

        fitted = fit_priors(fr.positions, fr.box, topology, temperature)
    elif model == "spline":
        from .fitting.mscg import fit_spline

        fitted = fit_spline(fr.positions, fr.forces, fr.box, topology, cutoff=cutoff, temperature=temperature,
                            device=_device(device))
        meta["mscg_force_residual"] = getattr(fitted, "fit_info", {}).get("force_residual")
        if refine_iterations > 0:
            from .fitting.refine import refine_spline

            fitted, history = refine_spline(fitted, fr.positions, fr.box, temperature,
                                            iterations=refine_iterations, sim_ps=refine_ps, seed=seed)
            meta["ibi_history"] = history
    else:
        from .fitting.boltzmann import fit_priors
        from .fitting.trainer import train_force_matching
        from .models import create_model
        from .models.composite import SumModel

        prior_model = load_model(prior) if prior else fit_priors(fr.positions, fr.box, topology, temperature)
        net = create_model("neural", topology, cutoff=min(cutoff, 1.0), seed=seed)
        net, history = train_force_matching(net, fr.positions, fr.forces, fr.box, prior=prior_model,
                                            out_dir=Path(out) / "training", epochs=epochs, batch_size=batch_size,
                                            lr=lr, patience=patience, seed=seed, device=_device(device),
                                            resume=resume, max_minutes=max_minutes or None)
        meta["training"] = {"best_epoch": history.get("best_epoch"), "val_rmse": history["val_rmse"][-1:]}
        fitted = SumModel(topology, [prior_model.double(), net.double()])
    meta["fit_seconds"] = round(time.time() - t0, 2)
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
    meta = {"training_data": str(data), "n_frames": fr.n_frames, "temperature": fr.metadata.get("temperature_K"),
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
    system = CGPotential(model).create_system(top, box=box, backend=backend)
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
    from .topology import CGTopology

    top = CGTopology.load_json(topology)
    frames = read_h5md(reference, require_forces=False)
    if frames.positions.shape[1] != top.n_beads:
        raise EnpcgError(f"{reference}: {frames.positions.shape[1]} beads but {topology} has {top.n_beads}. "
                         "Fix: pass the mapped H5MD of the same mapping")
    ref = reference_diffusion(frames, top)
    target = {t: d for t, (d, _) in ref.items()}
    pot = CGPotential(model)
    pos, box = _read_pdb(pdb)
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
def run_simulate(model, backend, pdb, out, time_ps, timestep, temperature, friction, report_ps, platform, seed,
                 positions=None, dynamics=""):
    """CG Langevin simulation of a fitted model: ``out/trajectory.dcd``, ``out/log.csv``, ``out/final.xml``.

    ``dynamics``: a ``dynamics.json`` from :func:`run_calibrate`; its per-bead-type frictions (1/ps) replace
    ``friction`` and its time scale adds the column "Mapped time (ps)" to the log.
    """
    from openmm_plugin.simulate import run_simulation
    from openmm_plugin.system import CGPotential

    pot = CGPotential(model)
    pdb_pos, box = _read_pdb(pdb)
    pos = pdb_pos if positions is None else positions
    system = pot.create_system(pot.topology, box=box, backend=backend)
    steps = int(round(time_ps / timestep))
    report = max(1, int(round(report_ps / timestep)))
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
                         platform=None if platform == "auto" else platform, seed=seed, time_scale=time_scale)
    pot.topology.write_pdb(Path(out) / "cg.pdb", pos, box)
    return res


def _fit_oriented(data, out, temperature, cutoff, epochs, batch_size, lr, device, seed, resume, max_minutes,
                  length_scale):
    """Force-and-torque matching of an ``oriented_neural`` model to an oriented CG dataset (enpcg map of a
    mapping whose beads declare ``orientation``); saves the model and ``training/history.json``."""
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
    # The learned, orientation-dependent contact distance starts at the closest approach in the data.
    net = create_model("oriented_neural", d.topology, cutoff=cutoff, core_radius=round(0.9 * r_min, 4),
                       contact=True, contact_init=round(r_min, 4), contact_width=round(r_min, 4),
                       energy_scale=2 * kt, seed=seed).double()
    train_dir = Path(out) / "training"
    if not resume and train_dir.exists():
        shutil.rmtree(train_dir)
    t0 = time.time()
    history = fit_oriented(net, d, epochs=epochs, lr=lr, batch_size=batch_size,
                           length_scale=length_scale or None, seed=seed, max_seconds=(max_minutes * 60) or None,
                           out_dir=train_dir, device=_device(device), progress=True)
    check = d.select(np.asarray(history["val_frames"], dtype=np.int64))   # frames the fit held out
    net.to("cpu")
    meta = {"training_data": str(data), "n_frames": d.n_frames, "temperature": temperature,
            "fit_seconds": round(time.time() - t0, 2), "length_scale": history["length_scale"],
            "validation_errors": oriented_errors(net, check),
            "chiral_energy_fraction": chiral_energy_fraction(net, check)}
    save_model(net, out, metadata=meta)
    return {"model": Path(out)}


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


# ------------------------------------------------------------------------------------------------ demo
DEMO_BACKENDS = {"priors": "native", "mscg": "native", "spline": "native", "neural": "torch"}
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
