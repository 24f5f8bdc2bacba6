"""Stage configuration: defaults, YAML files and command-line overrides.

Each stage of the pipeline (``build``, ``sample``, ``map``, ``fit``, ``train``, ``export``, ``calibrate``,
``simulate``, ``analyze``, ``properties``, ``demo``) has a flat table of options with defaults (:data:`STAGES`). A stage's configuration is
resolved as defaults < YAML file < command-line options; unknown keys are rejected with the list of allowed
ones, and the resolved configuration is written beside the stage's outputs (``<stage>.yaml``).

Units: lengths nm, times ps, temperatures K, energies kJ/mol.
"""
from __future__ import annotations

from pathlib import Path

from .errors import EnpcgError


def _opt(default, help, type=None, choices=None, paths=False):
    """An option. ``paths=True`` (type list): one path or glob pattern, or several (a YAML list, or several
    values after the flag); resolved to a list of str."""
    return {"default": default, "help": help, "type": type or (type_of(default)), "choices": choices,
            "paths": paths}


def type_of(value):
    if isinstance(value, bool):
        return bool
    if isinstance(value, int):
        return int
    if isinstance(value, float):
        return float
    return str


# Each option: default, help (with unit), type, choices. None defaults are strings (paths) unless typed.
STAGES = {
    "build": {
        "out": _opt("out/melt", "output folder for system.xml, system.pdb and build.json"),
        "n_chains": _opt(21, "number of polyethylene chains"),
        "chain_length": _opt(48, "united-atom sites per chain"),
        "temperature": _opt(450.0, "temperature, K"),
        "equilibration_ps": _opt(200.0, "NPT then NVT equilibration time, ps"),
        "seed": _opt(0, "random seed"),
    },
    "sample": {
        "reference": _opt("default", "reference: 'default' (bundled polyethylene melt), 'enp' (the bundled "
                          "equivariant potential driving that melt), a build folder, "
                          "'XML,PDB' for any serialized OpenMM System and its PDB, or an equivariant model "
                          "folder (`enpcg train`) that drives the bundled melt"),
        "out": _opt("out/atomistic.h5", "output H5MD file of positions and forces"),
        "n_frames": _opt(200, "frames to write"),
        "interval_steps": _opt(500, "MD steps between frames"),
        "equilibration_steps": _opt(5000, "MD steps before the first frame"),
        "temperature": _opt(450.0, "temperature, K"),
        "timestep": _opt(0.002, "time step, ps"),
        "friction": _opt(1.0, "Langevin friction, 1/ps"),
        "platform": _opt("auto", "OpenMM platform: auto, Reference, CPU, CUDA, OpenCL"),
        "seed": _opt(0, "random seed"),
    },
    "map": {
        "mapping": _opt("default", "mapping file (YAML, or VOTCA XML); 'default' = polyethylene 4:1"),
        "input": _opt(["out/atomistic.h5"], "atomistic H5MD file with forces; several files or a quoted glob "
                      "('out/replicas/*.h5') are replicas mapped into one dataset", type=list, paths=True),
        "atom_pdb": _opt("", "atomistic PDB (needed to resolve atom names of VOTCA XML mappings)"),
        "out": _opt("out/cg", "output folder: cg.h5, cg_topology.json, cg.pdb"),
    },
    "fit": {
        "data": _opt(["out/cg/cg.h5"], "CG H5MD dataset (mapped positions and forces); several files or a "
                     "quoted glob ('out/cg_*/cg.h5') of one mapping are fitted as one dataset", type=list,
                     paths=True),
        "model": _opt("spline", "model kind (oriented_neural: oriented beads, force-and-torque matching)",
                      choices=["priors", "spline", "neural", "oriented_neural"]),
        "out": _opt("out/model", "output model folder (model.json + model.pt)"),
        "temperature": _opt(450.0, "temperature of the data, K (Boltzmann inversion)"),
        "cutoff": _opt(1.2, "nonbonded cutoff, nm"),
        "prior": _opt("", "priors model folder the neural model is fitted on top of ('' = fit priors first); "
                          "oriented_neural: 'gay_berne' (fit a Gay-Berne prior first, uniaxial beads), an oriented "
                          "model folder, or '' (the network alone)"),
        "refine_iterations": _opt(0, "spline: iterative Boltzmann inversion steps after MS-CG (0 = pure MS-CG)"),
        "refine_ps": _opt(20.0, "spline: CG simulation time per refinement step, ps"),
        "epochs": _opt(60, "neural: maximum epochs"),
        "batch_size": _opt(8, "neural: frames per minibatch"),
        "lr": _opt(3e-3, "neural: learning rate"),
        "patience": _opt(10, "neural: early-stopping patience, epochs"),
        "max_minutes": _opt(0.0, "neural: stop training after this many minutes (0 = no limit)"),
        "length_scale": _opt(0.0, "oriented_neural: torque length scale l of the loss dF^2 + dtau^2 / l^2, nm "
                             "(0 = the beads' radius of gyration)"),
        "device": _opt("auto", "fitting device: auto, cpu, cuda"),
        "seed": _opt(0, "random seed"),
        "resume": _opt(True, "resume an interrupted fit from its checkpoint"),
    },
    "train": {
        "data": _opt("out/atomistic.h5", "atomistic H5MD file with forces and energies (from `enpcg sample`)"),
        "out": _opt("out/equivariant", "output model folder (model.json + model.pt, training/)"),
        "cutoff": _opt(0.5, "equivariant model cutoff, nm"),
        "l_max": _opt(1, "highest rotation order of the features (0-3)"),
        "n_layers": _opt(2, "interaction blocks"),
        "mul": _opt(16, "channels per irrep"),
        "precision": _opt("float32", "training arithmetic; the saved model is float64 either way",
                          choices=["float32", "float64"]),
        "epochs": _opt(50, "maximum epochs"),
        "batch_size": _opt(1, "frames per minibatch (one 1,000-atom frame per step trains fastest per minute)"),
        "lr": _opt(1e-2, "learning rate (Adam; decays to 1e-3 of it)"),
        "energy_weight": _opt(1.0, "weight of the squared energy error per atom, per (kJ/mol)^2"),
        "force_weight": _opt(1.0, "weight of the squared force error, per (kJ/mol/nm)^2"),
        "patience": _opt(10, "early-stopping patience, epochs"),
        "max_minutes": _opt(0.0, "training budget, minutes; the learning rate decays on a cosine over it (0 = no "
                            "limit: decay on validation plateaus)"),
        "device": _opt("auto", "training device: auto, cpu, cuda"),
        "seed": _opt(0, "random seed (weights and validation split)"),
        "resume": _opt(True, "resume an interrupted training from its checkpoint"),
        "validation": _opt("", "independent atomistic H5MD (another trajectory) for the atom, bead and chain "
                           "force errors in training/validation.json ('' = none)"),
        "cg_force_weight": _opt(1.0, "weight of the squared errors of mapped bead forces and whole-molecule "
                                "forces, per (kJ/mol/nm)^2 (0 = atom forces only)"),
        "mapping": _opt("default", "mapping that defines beads and molecules (CG force loss, validation)"),
    },
    "export": {
        "model": _opt("out/model", "model folder"),
        "backend": _opt("torch", "force backend (mixed: native forces for the terms that have them, TorchForce for the rest)", choices=["torch", "python", "native", "mixed"]),
        "topology": _opt("out/cg/cg_topology.json", "CG topology JSON (from `enpcg map`)"),
        "pdb": _opt("out/cg/cg.pdb", "CG structure whose box sets the periodic box"),
        "out": _opt("out/export", "output folder: system.xml, cg.pdb"),
    },
    "calibrate": {
        "model": _opt("out/model", "model folder"),
        "backend": _opt("torch", "force backend (mixed: native forces for the terms that have them, TorchForce for the rest)", choices=["torch", "python", "native", "mixed"]),
        "pdb": _opt("out/cg/cg.pdb", "starting CG structure (PDB with box)"),
        "reference": _opt("out/cg/cg.h5", "mapped atomistic H5MD with times (the dynamics to match); frames "
                          "close enough in time to unwrap"),
        "topology": _opt("out/cg/cg_topology.json", "CG topology JSON (bead types)"),
        "out": _opt("out/dynamics", "output folder: dynamics.json, diffusion.png"),
        "mode": _opt("friction", "fit a Langevin friction per bead type, or one time-scaling factor",
                     choices=["friction", "time_scale"]),
        "temperature": _opt(450.0, "temperature of the reference, K"),
        "timestep": _opt(0.01, "CG time step, ps"),
        "friction": _opt(1.0, "Langevin friction of the first CG run (the raw speed-up is measured there; "
                         "kept in time_scale mode), 1/ps"),
        "time_ps": _opt(50.0, "length of each CG run, ps"),
        "report_ps": _opt(0.1, "interval of the CG positions used for the MSD, ps"),
        "tolerance": _opt(0.05, "stop when every bead type's D is within this fraction of the reference"),
        "max_runs": _opt(6, "the most CG runs of the friction fit"),
        "platform": _opt("auto", "OpenMM platform: auto, Reference, CPU, CUDA, OpenCL"),
        "seed": _opt(0, "random seed"),
    },
    "simulate": {
        "model": _opt("out/model", "model folder"),
        "backend": _opt("torch", "force backend (mixed: native forces for the terms that have them, TorchForce for the rest)", choices=["torch", "python", "native", "mixed"]),
        "pdb": _opt("out/cg/cg.pdb", "starting CG structure (PDB with box)"),
        "out": _opt("out/sim", "output folder: trajectory.dcd, log.csv, final_state.xml (checkpoint.chk while it runs)"),
        "time_ps": _opt(100.0, "simulated time, ps"),
        "timestep": _opt(0.01, "time step, ps"),
        "temperature": _opt(450.0, "temperature, K"),
        "friction": _opt(1.0, "Langevin friction, 1/ps"),
        "dynamics": _opt("", "dynamics.json from `enpcg calibrate`: its per-type frictions replace --friction "
                         "and its time scale adds mapped atomistic time to the log ('' = none)"),
        "report_ps": _opt(1.0, "trajectory and log interval, ps"),
        "platform": _opt("auto", "OpenMM platform: auto, Reference, CPU, CUDA, OpenCL"),
        "seed": _opt(0, "random seed"),
        "checkpoint_ps": _opt(10.0, "simulated time between checkpoints (checkpoint.chk), rounded to whole "
                              "reports, ps (0 = no checkpoints)"),
        "resume": _opt(True, "resume an interrupted simulation from its checkpoint (false: start over)"),
        "min_distance": _opt("auto", "stop when two non-bonded beads come closer than this, nm: 'auto' = 0.8 x "
                             "the smallest non-bonded pair distance of the model's training data (its fitted "
                             "range; else the priors' repulsion sigma), a number, or 'off'"),
        "max_force": _opt(1e6, "stop when the force on a bead exceeds this, kJ/mol/nm (0 = no limit)"),
    },
    "analyze": {
        "reference": _opt("out/cg/cg.h5", "reference: mapped CG H5MD or any mdtraj-readable trajectory"),
        "topology": _opt("out/cg/cg_topology.json", "CG topology JSON"),
        "trajectories": _opt("out/sim/trajectory.dcd", "comma-separated LABEL=PATH (or PATH) of "
                             "mdtraj-readable trajectories to compare"),
        "out": _opt("out/analysis", "output folder: report.md, metrics.json, PNG plots"),
        "skip_ps": _opt(0.0, "simulation time to skip at the start of each trajectory, ps"),
    },
    "properties": {
        "model": _opt("out/model", "model folder (any kind: priors, spline, neural, equivariant, ...), or 'enp' "
                      "(the shipped equivariant potential of the bundled melt)"),
        "system": _opt("", "serialized OpenMM System XML (e.g. from `enpcg export`) evaluated instead of --model "
                       "(finite-difference Hessians and elastic constants) ('' = use --model)"),
        "pdb": _opt("auto", "structure: positions and box (CRYST1), in the potential's particle order; 'auto' = "
                    "the bundled melt for --model enp, else out/cg/cg.pdb"),
        "what": _opt("modes,equivariance", "comma-separated properties: modes, phonons, elastic, equivariance"),
        "out": _opt("out/properties", "output folder: properties.json and PNG plots"),
        "periodic": _opt("auto", "use the PDB box: 'auto' (unless the model says periodic: false, or the System "
                         "is not periodic), 'true', or 'false' (an isolated cluster)",
                         choices=["auto", "true", "false"]),
        "minimize": _opt(False, "minimise the energy at the fixed box before modes, phonons and elastic "
                         "constants (the equivariance audit uses the structure as given: it needs forces)"),
        "force_tolerance": _opt(1e-4, "RMS force the minimisation aims at, and the largest accepted for elastic "
                                "constants, kJ/mol/nm"),
        "supercell": _opt("", "phonons: the structure is n1,n2,n3 unit cells (each its box / n along each box "
                          "vector), ordered cell by cell with the unit-cell particles in each, as "
                          "enpcg.properties.crystals.supercell writes them, e.g. 3,3,3"),
        "k_path": _opt("G:0,0,0;X:0.5,0,0;M:0.5,0.5,0;G:0,0,0;R:0.5,0.5,0.5", "phonons: corners of the "
                       "dispersion path, LABEL:q1,q2,q3 in fractional coordinates of the unit cell's reciprocal "
                       "lattice, separated by ';'"),
        "n_rotations": _opt(4, "equivariance: random proper rotations (and as many improper ones) audited"),
        "seed": _opt(0, "random seed of the equivariance audit"),
    },
    "demo": {
        "out": _opt("out/demo", "output folder for every stage"),
        "reference": _opt("classical", "atomistic reference: 'classical' (TraPPE-UA force field) or 'enp' (the "
                          "bundled equivariant potential; slow on CPUs, practical on a GPU)",
                          choices=["classical", "enp"]),
        "models": _opt("priors,mscg,spline,neural", "CG models to fit, simulate and compare: priors, mscg "
                       "(pure MS-CG splines), spline (MS-CG + IBI refinement), neural (priors + network)"),
        "n_frames": _opt(200, "atomistic frames sampled"),
        "interval_steps": _opt(500, "MD steps between frames"),
        "cg_time_ps": _opt(100.0, "CG simulation time per model, ps"),
        "cg_timestep": _opt(0.01, "CG time step, ps"),
        "epochs": _opt(30, "neural: maximum epochs (training also stops after 4 minutes)"),
        "platform": _opt("auto", "OpenMM platform"),
        "seed": _opt(0, "random seed"),
    },
}


def _coerce_paths(stage, key, value, source):
    """A path option's value (one path or glob pattern, or a list of them) as a list of non-empty str."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, (str, Path)) and str(v).strip() for v in values):
        raise EnpcgError(f"{source}: {stage}.{key} must be a path, a glob pattern or a non-empty list of them; you "
                         f"supplied {_short(value)}. Fix: e.g. {key}: a.h5, {key}: [a.h5, b.h5] or {key}: 'runs/*.h5'")
    return [str(v) for v in values]


def _short(value, limit=80) -> str:
    """A bounded repr of a value read from a file (nested or aliased YAML is not expanded)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother, r.maxlong = 3, 6, 6, 40, 40, 40
    return r.repr(value)[:limit]


_TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a text (quote it)"}


def _coerce(stage, key, value, source):
    """``value`` as the option's declared type; no silent coercion of bools to numbers, fractions to integers,
    containers or empty values to text. Raises EnpcgError naming the source, the option and the fix."""
    import math

    spec = STAGES[stage][key]
    if spec["paths"]:  # a path, a glob pattern or a list of them (several files as one dataset)
        return _coerce_paths(stage, key, value, source)
    typ = spec["type"]

    def bad(why=""):
        return EnpcgError(f"{source}: {stage}.{key} must be {typ.__name__}{why}; you supplied {_short(value)}. Fix: "
                          f"give {_TYPE_WORDS[typ]}, e.g. {key}: {spec['default']!r}, or delete the line for the "
                          "default")

    if value is None:
        raise bad(" (the value is empty)")
    if isinstance(value, bool):
        if typ is not bool:
            raise bad(", not true/false")
    elif typ is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            value = value.strip().lower() in ("true", "1", "yes")
        elif isinstance(value, int) and value in (0, 1):
            value = bool(value)
        else:
            raise bad()
    elif typ is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) <= 2**53:
            value = int(value)
        elif isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise bad() from None
        elif not isinstance(value, int):
            raise bad()
    elif typ is float:
        if isinstance(value, (int, float)):
            value = float(value)
        elif isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise bad() from None
        else:
            raise bad()
        if not math.isfinite(value):
            raise bad(" and finite")
    elif typ is str:
        if isinstance(value, (int, float)):
            value = str(value)  # numeric names, e.g. out: 2024
        elif not isinstance(value, str):
            raise bad()
    if spec["choices"] and value not in spec["choices"]:
        raise EnpcgError(f"{source}: {stage}.{key} must be one of {spec['choices']}; you supplied {_short(value)}. "
                         f"Fix: pick one of them")
    return value


def resolve_config(stage: str, config_file=None, overrides: dict | None = None) -> dict:
    """Defaults < YAML ``config_file`` < ``overrides`` (keys with value None are ignored)."""
    if stage not in STAGES:
        raise EnpcgError(f"unknown stage {stage!r}; stages: {list(STAGES)}")
    cfg = {k: list(v["default"]) if v["paths"] else v["default"] for k, v in STAGES[stage].items()}
    if config_file:
        import yaml

        path = Path(config_file)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise EnpcgError(f"{path}: config file not found. Fix: check the path given to --config") from None
        except UnicodeDecodeError as e:
            raise EnpcgError(f"{path}: not a text file ({e}). Fix: pass a YAML config file") from None
        except OSError as e:  # a directory, no permission
            raise EnpcgError(f"{path}: cannot read the config file ({e.strerror or e}). Fix: pass the path of a "
                             "readable YAML file") from None
        except yaml.YAMLError as e:
            raise EnpcgError(f"{path}: not valid YAML ({e}). Fix: correct the YAML syntax") from None
        except RecursionError:
            raise EnpcgError(f"{path}: YAML nested too deeply. Fix: write `option: value` lines") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise EnpcgError(f"{path}: a config file must be a mapping of option: value; got {type(data).__name__}. "
                             "Fix: write one `option: value` line per option")
        if data and all(isinstance(k, str) and k in STAGES for k in data):  # a file of several stages' sections
            if stage not in data:
                raise EnpcgError(f"{path}: the file holds sections {sorted(data)} but none for {stage}. Fix: add a "
                                 f"`{stage}:` section")
            data = {} if data[stage] is None else data[stage]
            if not isinstance(data, dict):
                raise EnpcgError(f"{path}: section {stage} must be a mapping of option: value; got "
                                 f"{type(data).__name__}. Fix: indent `option: value` lines under `{stage}:`")
        unknown = sorted((k for k in data if k not in cfg), key=str)
        if unknown:
            raise EnpcgError(f"{path}: unknown {stage} option(s) {[_short(k) for k in unknown]}; allowed: "
                             f"{sorted(cfg)}. Fix: remove or rename them (options use underscores)")
        for k, v in data.items():
            cfg[k] = _coerce(stage, k, v, str(path))
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in cfg:
            raise EnpcgError(f"unknown {stage} option {k!r}; allowed: {sorted(cfg)}")
        cfg[k] = _coerce(stage, k, v, "command line")
    return cfg
