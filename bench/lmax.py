"""Benchmark: the l_max trade-off of the equivariant atomistic potential (cost against accuracy).

For l_max = 0, 1, 2, 3 the same model (channels, layers, cutoff) is trained on the same atomistic data with the
same wall-time budget (`enpcg train`, float32 training), then measured:

* accuracy on an independent trajectory: force RMSE / RMS on atoms, mapped 4:1 beads and whole chains
  (:mod:`enpcg.equivariant.validate`);
* cost of MD in OpenMM with the exported TorchForce (float32): ms per step and atom-steps per second on the
  chosen platform, after a warm-up;
* training throughput: frames per second of force-matching steps (forward + double backward).

Equal wall time is the fair comparison: a higher l_max buys expressiveness per parameter but costs time per
step, so within a fixed budget it sees fewer epochs. Results go to ``OUT/lmax.json`` and ``OUT/lmax.md``.

Usage: python bench/lmax.py [--data out/enp/train.h5] [--validation out/enp/validation.h5]
       [--minutes 5] [--lmax 0,1,2,3] [--platform CPU] [--out out/bench-lmax]
(`make bench-lmax` makes the data with `enpcg sample` first.) Units: ms per step, atom-steps/s, frames/s.
"""
import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch  # before openmm, for the openmm-torch kernels
import openmm

from enpcg.h5md import read_h5md
from enpcg.models import load_model
from enpcg.pipeline import run_train
from openmm_plugin.export import export_forces


def md_cost(model, positions, box, platform_name, steps):
    """ms per MD step (Langevin, 1 fs) of ``model`` as a float32 TorchForce on ``platform_name``."""
    system = openmm.System()
    for m in model.topology.masses:
        system.addParticle(float(m))
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
    for f in export_forces(model, "torch", periodic=True, dtype="float32"):
        system.addForce(f)
    integ = openmm.LangevinMiddleIntegrator(450.0, 1.0, 0.001)
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName(platform_name))
    ctx.setPositions(positions)
    integ.step(max(5, steps // 4))  # warm-up: TorchScript profiling executor, allocations
    ctx.getState(getEnergy=True)
    t0 = time.perf_counter()
    integ.step(steps)
    ctx.getState(getEnergy=True)
    return 1000.0 * (time.perf_counter() - t0) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="out/enp/train.h5")
    p.add_argument("--validation", default="out/enp/validation.h5")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall time per l_max")
    p.add_argument("--lmax", default="0,1,2,3")
    p.add_argument("--platform", default="CPU")
    p.add_argument("--steps", type=int, default=20, help="timed MD steps per l_max")
    p.add_argument("--out", default="out/bench-lmax")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    val = read_h5md(args.validation, frames=[0])
    rows = []
    for lmax in [int(v) for v in args.lmax.split(",")]:
        model_dir = out / f"lmax{lmax}"
        # The shipped model's settings (systems/models/train_enp.yaml) except l_max and the time budget.
        run_train(data=args.data, out=model_dir, cutoff=0.5, l_max=lmax, n_layers=2, mul=16, epochs=1000,
                  batch_size=1, lr=1e-2, energy_weight=1.0, force_weight=1.0, patience=1000,
                  max_minutes=args.minutes, device="auto", seed=0, resume=False, precision="float32",
                  validation=args.validation, mapping="default", cg_force_weight=1.0)
        meta = json.loads((model_dir / "model.json").read_text())["metadata"]
        errors = meta["validation"]
        history = json.loads((model_dir / "training" / "history.json").read_text())
        n_train = int(round(meta["n_frames"] * 0.8))
        frames_per_s = len(history["epoch"]) * n_train / meta["fit_seconds"]
        model = load_model(model_dir)
        ms = md_cost(model, val.positions[0], val.box[0], args.platform, args.steps)
        n_params = sum(p.numel() for p in model.parameters())
        rows.append({"l_max": lmax, "parameters": n_params, "epochs": len(history["epoch"]),
                     "train_seconds": meta["fit_seconds"],
                     "train_frames_per_s": frames_per_s, "md_ms_per_step": ms,
                     "atom_steps_per_s": model.topology.n_beads / (ms / 1000.0),
                     "atom_relative": errors["atom"]["relative"], "bead_relative": errors["bead"]["relative"],
                     "chain_relative": errors["chain_intermolecular"]["relative"]})
        print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name(0) if args.platform == "CUDA" else f"{platform.machine()} CPU"
    head = (f"l_max trade-off, {date.today()}, {device}, {torch.get_num_threads()} torch threads, OpenMM "
            f"{openmm.__version__} {args.platform}, torch {torch.__version__}; {val.n_particles} atoms, cutoff 0.5 "
            f"nm, 2 layers x 16 channels, {args.minutes:g} min of training each")
    lines = [f"# {head}", "",
             "| l_max | params | train s | epochs | train frames/s | MD ms/step | atom-steps/s | atom err | "
             "bead err | chain err |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['l_max']} | {r['parameters']} | {r['train_seconds']:.0f} | {r['epochs']} | "
                     f"{r['train_frames_per_s']:.2f} | "
                     f"{r['md_ms_per_step']:.1f} | {r['atom_steps_per_s']:.3g} | {r['atom_relative']:.1%} | "
                     f"{r['bead_relative']:.1%} | {r['chain_relative']:.1%} |")
    lines.append("")
    lines.append("Errors: force RMSE / RMS on an independent trajectory; chain = whole-chain (intermolecular) "
                 "force.")
    (out / "lmax.json").write_text(json.dumps({"header": head, "rows": rows}, indent=1))
    (out / "lmax.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
