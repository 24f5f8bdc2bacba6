"""Stage configuration: defaults, YAML files and command-line overrides.

Each stage of the pipeline (``build``, ``sample``, ``map``, ``fit``, ``train``, ``export``, ``calibrate``,
``simulate``, ``analyze``, ``demo``) has a flat table of options with defaults (:data:`STAGES`). A stage's configuration is
resolved as defaults < YAML file < command-line options; unknown keys are rejected with the list of allowed
ones, and the resolved configuration is written beside the stage's outputs (``<stage>.yaml``).

Units: lengths nm, times ps, temperatures K, energies kJ/mol.
"""
from __future__ import annotations

from pathlib import Path

from .errors import EnpcgError


def _opt(default, help, type=None, choices=None):
    return {"default": default, "help": help, "type": type or (type_of(default)), "choices": choices}


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
        "input": _opt("out/atomistic.h5", "atomistic H5MD file with forces"),
        "atom_pdb": _opt("", "atomistic PDB (needed to resolve atom names of VOTCA XML mappings)"),
        "out": _opt("out/cg", "output folder: cg.h5, cg_topology.json, cg.pdb"),
    },
    "fit": {
        "data": _opt("out/cg/cg.h5", "CG H5MD dataset (mapped positions and forces)"),
        "model": _opt("spline", "model kind (oriented_neural: oriented beads, force-and-torque matching)",
                      choices=["priors", "spline", "neural", "oriented_neural"]),
        "out": _opt("out/model", "output model folder (model.json + model.pt)"),
        "temperature": _opt(450.0, "temperature of the data, K (Boltzmann inversion)"),
        "cutoff": _opt(1.2, "nonbonded cutoff, nm"),
        "prior": _opt("", "priors model folder the neural model is fitted on top of ('' = fit priors first)"),
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
        "backend": _opt("torch", "force backend", choices=["torch", "python", "native"]),
        "topology": _opt("out/cg/cg_topology.json", "CG topology JSON (from `enpcg map`)"),
        "pdb": _opt("out/cg/cg.pdb", "CG structure whose box sets the periodic box"),
        "out": _opt("out/export", "output folder: system.xml, cg.pdb"),
    },
    "calibrate": {
        "model": _opt("out/model", "model folder"),
        "backend": _opt("torch", "force backend", choices=["torch", "python", "native"]),
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
        "backend": _opt("torch", "force backend", choices=["torch", "python", "native"]),
        "pdb": _opt("out/cg/cg.pdb", "starting CG structure (PDB with box)"),
        "out": _opt("out/sim", "output folder: trajectory.dcd, log.csv, final.xml"),
        "time_ps": _opt(100.0, "simulated time, ps"),
        "timestep": _opt(0.01, "time step, ps"),
        "temperature": _opt(450.0, "temperature, K"),
        "friction": _opt(1.0, "Langevin friction, 1/ps"),
        "dynamics": _opt("", "dynamics.json from `enpcg calibrate`: its per-type frictions replace --friction "
                         "and its time scale adds mapped atomistic time to the log ('' = none)"),
        "report_ps": _opt(1.0, "trajectory and log interval, ps"),
        "platform": _opt("auto", "OpenMM platform: auto, Reference, CPU, CUDA, OpenCL"),
        "seed": _opt(0, "random seed"),
    },
    "analyze": {
        "reference": _opt("out/cg/cg.h5", "reference: mapped CG H5MD or any mdtraj-readable trajectory"),
        "topology": _opt("out/cg/cg_topology.json", "CG topology JSON"),
        "trajectories": _opt("out/sim/trajectory.dcd", "comma-separated LABEL=PATH (or PATH) of "
                             "mdtraj-readable trajectories to compare"),
        "out": _opt("out/analysis", "output folder: report.md, metrics.json, PNG plots"),
        "skip_ps": _opt(0.0, "simulation time to skip at the start of each trajectory, ps"),
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


def _coerce(stage, key, value, source):
    spec = STAGES[stage][key]
    typ = spec["type"]
    try:
        if typ is bool and isinstance(value, str):
            low = value.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            value = low in ("true", "1", "yes")
        elif typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            value = typ(value)
    except (TypeError, ValueError):
        raise EnpcgError(f"{source}: {stage}.{key} must be {typ.__name__}; you supplied {value!r}") from None
    if spec["choices"] and value not in spec["choices"]:
        raise EnpcgError(f"{source}: {stage}.{key} must be one of {spec['choices']}; you supplied {value!r}")
    return value


def resolve_config(stage: str, config_file=None, overrides: dict | None = None) -> dict:
    """Defaults < YAML ``config_file`` < ``overrides`` (keys with value None are ignored)."""
    if stage not in STAGES:
        raise EnpcgError(f"unknown stage {stage!r}; stages: {list(STAGES)}")
    cfg = {k: v["default"] for k, v in STAGES[stage].items()}
    if config_file:
        import yaml

        path = Path(config_file)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise EnpcgError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise EnpcgError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise EnpcgError(f"{path}: a config file must be a mapping of option: value; got {type(data).__name__}")
        if stage in data and isinstance(data[stage], dict) and set(data) <= set(STAGES):
            data = data[stage]  # a file holding several stages' sections
        unknown = sorted(set(data) - set(cfg))
        if unknown:
            raise EnpcgError(f"{path}: unknown {stage} option(s) {unknown}; allowed: {sorted(cfg)}")
        for k, v in data.items():
            cfg[k] = _coerce(stage, k, v, str(path))
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in cfg:
            raise EnpcgError(f"unknown {stage} option {k!r}; allowed: {sorted(cfg)}")
        cfg[k] = _coerce(stage, k, v, "command line")
    return cfg
