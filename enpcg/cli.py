"""The ``enpcg`` command line: one sub-command per pipeline stage.

Every stage takes ``--config FILE.yaml`` and per-option flags (flags override the file, the file overrides
the defaults); the resolved configuration is written beside the stage's outputs as ``<stage>.yaml`` once the
stage has succeeded. Bad input exits with status 2 and a one-line message naming the file and field.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .config import STAGES, resolve_config
from .errors import EnpcgError

DESCRIPTIONS = {
    "build": "Build and equilibrate a united-atom polyethylene melt as an OpenMM System.",
    "sample": "Run atomistic MD and write positions, forces, box and energies to H5MD.",
    "map": "Map atomistic frames to beads: CG H5MD (positions, forces), CG topology and PDB.",
    "fit": "Fit a CG model (priors by Boltzmann inversion, MS-CG splines, or a neural model) by force matching.",
    "train": "Train the equivariant atomistic potential on atomistic H5MD energies and forces.",
    "export": "Export a fitted model as an OpenMM System (TorchForce, PythonForce or native tabulated forces).",
    "calibrate": "Fit CG dynamics to mapped atomistic time: a Langevin friction per bead type (or a time "
                 "scale) from diffusion coefficients.",
    "simulate": "Run a CG simulation in OpenMM (Langevin, DCD trajectory, CSV log); checkpointed and resumable "
                "(kill -9 included), stopped with an error naming the step and the beads when it goes unhealthy.",
    "analyze": "Compare CG trajectories with the mapped reference: distributions, RDFs, report and plots.",
    "properties": "Physical properties of a model (or OpenMM System) at a structure: normal modes, phonon "
                  "dispersion, elastic constants, equivariance audit; properties.json and plots.",
    "demo": "Run every stage on the bundled polyethylene melt into one output folder.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enpcg", description="Multiscale coarse-graining for OpenMM. "
                                     "Units: nm, ps, kJ/mol, amu, K.")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    sub.required = True
    for stage, options in STAGES.items():
        p = sub.add_parser(stage, help=DESCRIPTIONS[stage], description=DESCRIPTIONS[stage])
        p.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (flags override it)")
        for key, spec in options.items():
            flag = "--" + key.replace("_", "-")
            default = " ".join(spec["default"]) if spec["paths"] else spec["default"]
            kw = {"dest": key, "default": None, "help": f"{spec['help']} (default: {default})"}
            if spec["type"] is bool:
                kw["type"] = str
                kw["metavar"] = "true|false"
            else:
                kw["type"] = spec["type"]
            if spec["choices"]:
                kw["choices"] = spec["choices"]
            if spec["paths"]:  # one file, a quoted glob, or several files
                kw.update(nargs="+", metavar="PATH", type=str)
            p.add_argument(flag, **kw)
    return parser


def _config_path(stage: str, cfg: dict) -> Path:
    out = Path(cfg["out"])
    if out.suffix:  # a file output (sample): config beside it
        return out.with_name(out.stem + f".{stage}.yaml")
    return out / f"{stage}.yaml"


def main(argv=None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    stage = args.pop("stage")
    config_file = args.pop("config")
    # Under torchrun (enpcg fit) every rank runs this; rank 0 alone writes the resolved config and reports.
    worker = os.environ.get("RANK", "0") not in ("", "0")
    try:
        if stage != "fit" and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
            raise EnpcgError(f"WORLD_SIZE={os.environ['WORLD_SIZE']}: only `enpcg fit` runs data-parallel under "
                             f"torchrun. Fix: run `enpcg {stage}` as one process (without torchrun)")
        cfg = resolve_config(stage, config_file, args)
        from . import pipeline
        from .fileio import write_yaml

        t0 = time.time()
        result = getattr(pipeline, f"run_{stage}")(**cfg)
        cfg_path = _config_path(stage, cfg)
        if not worker:
            write_yaml(cfg_path, cfg)
    except EnpcgError as e:
        print(f"enpcg {stage}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"enpcg {stage}: interrupted; completed outputs are kept and the stage resumes when run again",
              file=sys.stderr)
        return 130
    if worker:
        return 0
    print(f"enpcg {stage}: done in {time.time() - t0:.1f} s")
    for name, path in (result or {}).items():
        print(f"  {name}: {path}")
    print(f"  config: {cfg_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
