"""Benchmark: cost per MD step of the demo's CG models in OpenMM, side by side, with ratios.

Rows (same machine, same run): native tabulated spline export (the baseline), the same spline model as a
TorchForce, the neural model (priors + network) as a TorchForce, an empty TorchForce (zero energy: the
fixed cost of the plugin), and the united-atom reference with native OpenMM forces. Sizes: the demo's 252
beads and an 8x replica (2,016 beads). Per simulated nanosecond: CG at 10 fs, atomistic at 2 fs.

Before timing, each export's forces on the chosen platform are checked against the Reference platform
(||dF||/||F||, printed in the table). On CUDA, TorchForce rows are timed with CUDA graphs off and on.

Needs the demo's models: run `make demo` first.
Usage: python bench/run_bench.py [--platform CPU|CUDA] [--demo out/demo] [--steps 200] [--sizes 1,2]
(`make bench` runs the CPU version.) Units: ms per step, ns/day.
"""
import argparse
import platform
import time
from datetime import date
from pathlib import Path
from typing import Optional

import numpy as np
import torch  # before openmm, for the openmm-torch kernels
import openmm
from openmm import unit

from enpcg.h5md import read_h5md
from enpcg.models import create_model, load_model
from enpcg.models.base import CGModel
from enpcg.topology import CGTopology
from openmm_plugin.export import export_forces


class Zero(CGModel):
    """E = 0: measures the fixed cost of a TorchForce."""

    @torch.jit.export
    def batch_energy(self, positions: torch.Tensor, box: Optional[torch.Tensor] = None) -> torch.Tensor:
        return (positions * 0.0).sum(dim=(1, 2))


def replicate(top: CGTopology, positions, box, n):
    """n x n x n periodic images: a topology, positions (nm) and box (nm) n times larger per side."""
    reps, pos = [], []
    shifts = [(i, j, k) for i in range(n) for j in range(n) for k in range(n)]
    nb = top.n_beads
    for c, (i, j, k) in enumerate(shifts):
        pos.append(positions + i * box[0] + j * box[1] + k * box[2])
        reps.append(c)
    m = len(shifts)
    big = CGTopology(top.bead_names * m, top.bead_types * m, np.tile(top.masses, m),
                     np.concatenate([top.molecule_index + c * top.n_molecules for c in reps]),
                     bonds=np.concatenate([top.bonds + c * nb for c in reps]),
                     angles=np.concatenate([top.angles + c * nb for c in reps]),
                     dihedrals=np.concatenate([top.dihedrals + c * nb for c in reps]),
                     residue_names=top.residue_names * m, exclusion_bonds=top.exclusion_bonds)
    return big, np.concatenate(pos), box * n


def rebuild(model, top):
    """The same model (config and weights) on another topology with the same bead types."""
    new = create_model(model.kind, top, **model.config).to(torch.float64)
    # weights are per type (topology-independent); per-term buffers are rebuilt from the config
    mine = new.state_dict()
    new.load_state_dict({k: v for k, v in model.state_dict().items() if k in mine and mine[k].shape == v.shape},
                        strict=False)
    return new


def make_system(forces, top, box):
    system = openmm.System()
    for m in top.masses:
        system.addParticle(float(m))
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*b) for b in box])
    for f in forces:
        system.addForce(f)
    return system


def forces_on(platform, make, top, positions, box):
    ctx = openmm.Context(make_system(make(), top, box), openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName(platform))
    ctx.setPositions(positions * unit.nanometer)
    f = ctx.getState(getForces=True).getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return np.asarray(f)


def time_forces(make, top, positions, box, steps, dt, platform):
    system = make_system(make(), top, box)
    integ = openmm.LangevinMiddleIntegrator(450 * unit.kelvin, 1 / unit.picosecond, dt * unit.picoseconds)
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName(platform))
    ctx.setPositions(positions * unit.nanometer)
    integ.step(20)  # warm-up (TorchScript profiling executor, neighbour lists, CUDA graph capture)
    ctx.getState(getEnergy=True)
    t0 = time.perf_counter()
    integ.step(steps)
    ctx.getState(getEnergy=True)  # waits for the device
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="out/demo")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--platform", default="CPU")
    p.add_argument("--sizes", default="1,2", help="replicas per box side, comma-separated")
    args = p.parse_args(argv)
    gpu = args.platform in ("CUDA", "OpenCL", "HIP")
    demo = Path(args.demo)
    if not (demo / "models" / "spline" / "model.json").exists():
        raise SystemExit(f"{demo}/models/spline not found: run `make demo` first (or pass --demo)")
    torch.set_num_threads(1)
    spline = load_model(demo / "models" / "spline")
    neural = load_model(demo / "models" / "neural")
    last = read_h5md(demo / "cg" / "cg.h5", frames=[-1], require_forces=False)
    rows = []
    for n in [int(k) for k in args.sizes.split(",")]:
        top, pos, box = replicate(spline.topology, last.positions[0], last.box[0], n)
        s, nn = rebuild(spline, top), rebuild(neural, top)
        zero = Zero(top)
        cases = [("native spline", lambda: export_forces(s, "native")),
                 ("TorchForce spline", lambda: export_forces(s, "torch")),
                 ("TorchForce neural", lambda: export_forces(nn, "torch")),
                 ("TorchForce empty", lambda: export_forces(zero, "torch"))]
        if gpu:
            cases += [("TorchForce spline, CUDA graphs", lambda: export_forces(s, "torch", cuda_graphs=True)),
                      ("TorchForce neural, CUDA graphs", lambda: export_forces(nn, "torch", cuda_graphs=True))]
        base = None
        for name, make in cases:
            err = float("nan")
            try:
                if "empty" not in name and top.n_beads <= 2016:
                    ref = forces_on("Reference", make, top, pos, box)
                    err = np.linalg.norm(forces_on(args.platform, make, top, pos, box) - ref) / np.linalg.norm(ref)
                steps = args.steps if ("native" in name or gpu) else max(20, args.steps // 4)
                ms = time_forces(make, top, pos, box, steps, 0.01, args.platform)
            except openmm.OpenMMException as e:  # e.g. a model that CUDA graphs cannot capture
                print(f"{top.n_beads} beads, {name}: failed ({str(e).splitlines()[0]})", flush=True)
                ms = float("nan")
            base = base or ms
            rows.append((top.n_beads, name, ms, ms / base, err))
    from systems.polyethylene import default_melt

    melt = default_melt()
    aa = openmm.LangevinMiddleIntegrator(450 * unit.kelvin, 1 / unit.picosecond, 0.002 * unit.picoseconds)
    ctx = openmm.Context(melt.system, aa, openmm.Platform.getPlatformByName(args.platform))
    ctx.setPeriodicBoxVectors(*[openmm.Vec3(*b) for b in melt.box])
    ctx.setPositions(melt.positions * unit.nanometer)
    aa.step(50)
    t0 = time.perf_counter()
    aa.step(args.steps)
    ms_aa = (time.perf_counter() - t0) / args.steps * 1e3
    device = torch.cuda.get_device_name(0) if gpu and torch.cuda.is_available() else platform.machine()
    print(f"# enpcg benchmark, {date.today()}, {device}, OpenMM {openmm.__version__} {args.platform} platform, "
          f"torch {torch.__version__} ({torch.get_num_threads()} CPU thread)")
    print("| beads | force | ms/step | x native | ns/day (10 fs) | ||dF||/||F|| vs Reference |")
    print("|---|---|---|---|---|---|")
    for n, name, ms, ratio, err in rows:
        print(f"| {n} | {name} | {ms:.3f} | {ratio:.1f} | {0.01 * 86400 / ms:.1f} | {err:.1e} |")
    cg_native = rows[0][2]
    print(f"\nunited-atom reference, 1,008 sites, native forces: {ms_aa:.3f} ms/step at 2 fs "
          f"= {0.002 * 86400 / ms_aa:.1f} ns/day")
    print(f"CG (252 beads, native spline, 10 fs) vs atomistic per simulated ns: "
          f"{(0.01 / cg_native) / (0.002 / ms_aa):.1f}x faster")


if __name__ == "__main__":
    main()
