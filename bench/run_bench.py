"""Benchmark: cost per MD step of the demo's CG models in OpenMM, side by side in one run, with ratios.

Rows per size (same machine, same run): the native tabulated spline export (the baseline), the same spline
model as a TorchForce, the neural model (priors + network) as a TorchForce, and an empty TorchForce (zero
energy: the plugin's fixed cost); on a GPU also the TorchForce rows with CUDA graphs (fixed-shape cell list).
Sizes are replicas of the demo's 252-bead melt cell: 1k = 2x2x1 (1,008 beads), 4k = 4x2x2 (4,032),
8k = 4x4x2 (8,064), 64k = 8x8x4 (64,512), 256k = 16x8x8 (258,048).

Then: the marginal cost per bead-step, (t_big - t_mid) / (n_big - n_mid) against (t_mid - t_small) /
(n_mid - n_small), after subtracting the empty TorchForce; eager against scripted model time on the CPU;
wall time per simulated nanosecond of the CG melt (252 beads; native spline at ``CG_TIMESTEP_PS`` = 15 fs,
validated against 5 fs by tests/test_cg_timestep.py; neural at 10 fs) against the united-atom reference
(1,008 sites, native forces, 2 fs) and of the neural CG against the equivariant atomistic reference
(`systems/models/polyethylene_enp`, 2 fs), also per atomistic-equivalent nanosecond when a dynamics
calibration (`enpcg calibrate`, time_scale mode) is given; fitting throughput in bead-frames per second.

Before timing, each export's forces on the chosen platform are checked against the Reference platform
(||dF||/||F||, up to 8k beads).

Needs the demo's models: run `make demo` first.
Usage: python bench/run_bench.py [--platform CPU|CUDA] [--demo out/demo] [--sizes 1k,4k,8k,64k]
       [--seconds 2] [--dynamics out/demo/dynamics/dynamics.json]
(`make bench` runs the CPU version.) Units: ms per step, ns/day, bead-frames/s.
"""
import argparse
import json
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
from enpcg.models import batch_forces, create_model, load_model
from enpcg.models.base import CGModel
from enpcg.topology import CGTopology
from openmm_plugin.export import export_forces

SHAPES = {"1k": (2, 2, 1), "4k": (4, 2, 2), "8k": (4, 4, 2), "64k": (8, 8, 4), "256k": (16, 8, 8)}
CHECK_MAX_BEADS = 8100  # Reference-platform force checks up to 8k beads (larger ones take minutes)
# Time step (ps) of the native spline CG melt in the per-nanosecond rows: tests/test_cg_timestep.py checks that
# it samples as 5 fs does (kinetic temperature, bond and angle distributions; Langevin 450 K, 1/ps). 20 fs
# runs 1-2 % hot and broke a chain in one of three 300 ps runs, so it is not used. The neural CG keeps 10 fs
# (not checked at larger steps).
CG_TIMESTEP_PS = 0.015
NEURAL_TIMESTEP_PS = 0.01


class Zero(CGModel):
    """E = 0: measures the fixed cost of a TorchForce."""

    @torch.jit.export
    def batch_energy(self, positions: torch.Tensor, box: Optional[torch.Tensor] = None) -> torch.Tensor:
        return (positions * 0.0).sum(dim=(1, 2))


def replicate(top: CGTopology, positions, box, shape):
    """Periodic images (nx, ny, nz) of an orthorhombic cell: topology, positions (nm), box (nm)."""
    if isinstance(shape, int):
        shape = (shape, shape, shape)
    shifts = [(i, j, k) for i in range(shape[0]) for j in range(shape[1]) for k in range(shape[2])]
    nb, m = top.n_beads, len(shifts)
    pos = [positions + i * box[0] + j * box[1] + k * box[2] for i, j, k in shifts]
    big = CGTopology(top.bead_names * m, top.bead_types * m, np.tile(top.masses, m),
                     np.concatenate([top.molecule_index + c * top.n_molecules for c in range(m)]),
                     bonds=np.concatenate([top.bonds + c * nb for c in range(m)]),
                     angles=np.concatenate([top.angles + c * nb for c in range(m)]),
                     dihedrals=np.concatenate([top.dihedrals + c * nb for c in range(m)]),
                     residue_names=top.residue_names * m, exclusion_bonds=top.exclusion_bonds)
    return big, np.concatenate(pos), box * np.asarray(shape, dtype=float)[:, None]


def rebuild(model, top):
    """The same model (config and weights) on another topology with the same bead types."""
    new = create_model(model.kind, top, **model.config).to(torch.float64)
    # weights are per type (topology-independent); per-term buffers are rebuilt from the config
    mine = new.state_dict()
    new.load_state_dict({k: v for k, v in model.state_dict().items() if k in mine and mine[k].shape == v.shape},
                        strict=False)
    return new


def make_system(forces, masses, box):
    system = openmm.System()
    for m in masses:
        system.addParticle(float(m))
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*b) for b in box])
    for f in forces:
        system.addForce(f)
    return system


def forces_on(platform_name, make, masses, positions, box):
    ctx = openmm.Context(make_system(make(), masses, box), openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName(platform_name))
    ctx.setPositions(positions * unit.nanometer)
    f = ctx.getState(getForces=True).getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return np.asarray(f)


def time_steps(system, positions, dt_ps, platform_name, seconds, warmup=5, temperature=450.0):
    """ms per Langevin step of ``system``, timed over at least ``seconds`` after ``warmup`` steps."""
    integ = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 1 / unit.picosecond, dt_ps * unit.picoseconds)
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName(platform_name))
    ctx.setPositions(positions * unit.nanometer)
    integ.step(warmup)  # TorchScript profiling executor, neighbour lists, CUDA graph capture
    ctx.getState(getPositions=True)
    steps, elapsed, chunk = 0, 0.0, 1
    while elapsed < seconds or steps < 3:
        t0 = time.perf_counter()
        integ.step(chunk)
        # waits for the device; positions, not the energy: an energy query runs one more force evaluation
        # (a TorchForce forward), which inflated the slow rows by ~15% over their few timed steps
        ctx.getState(getPositions=True)
        elapsed += time.perf_counter() - t0
        steps += chunk
        chunk = min(2 * chunk, 1000)
    return elapsed / steps * 1e3


def eager_vs_scripted_ms(model, positions, box, calls=20, rounds=10):
    """ms per energy + forces call (forward, then autograd of the positions, as TorchForce does) of the eager
    TorchForce module (``torch_module``) and of the scripted one as openmm-torch runs it (``script_model``,
    frozen: openmm-torch calls ``torch.jit.freeze`` on it), after ``calls`` warm-up calls each; the two
    alternate, best of ``rounds``."""
    from openmm_plugin.export import script_model, torch_module

    x = torch.tensor(positions)
    b = torch.tensor(box)
    modules = [torch_module(model), torch.jit.freeze(script_model(model))]

    def call(m):
        xx = x.clone().requires_grad_(True)
        torch.autograd.grad(m(xx, b), xx)

    for _ in range(calls):
        for m in modules:
            call(m)
    best = [float("inf")] * len(modules)
    for _ in range(rounds):
        for k, m in enumerate(modules):
            t0 = time.perf_counter()
            call(m)
            best[k] = min(best[k], (time.perf_counter() - t0) * 1e3)
    return best[0], best[1]


def fitting_throughput(demo: Path, neural_template, seconds: float, device: str):
    """Bead-frames per second of MS-CG (the spline fit) and of neural force-matching steps (Adam, batch 8) on
    ``device``; on a GPU also the largest relative difference of the MS-CG tables from the CPU solve."""
    from enpcg.fitting.mscg import fit_spline

    data = read_h5md(demo / "cg" / "cg.h5")
    top = neural_template.topology
    n_frames, n_beads = data.positions.shape[:2]

    def mscg(dev):
        t0 = time.perf_counter()
        model = fit_spline(data.positions, data.forces, data.box, top, cutoff=1.2, temperature=450.0, device=dev,
                           progress=False)
        return model, n_frames * n_beads / (time.perf_counter() - t0)

    fitted, mscg_rate = mscg(device)
    mscg_gap = float("nan")
    if device != "cpu":
        on_cpu, _ = mscg("cpu")
        a = fitted.pairs_values.cpu().numpy()
        b = on_cpu.pairs_values.cpu().numpy()
        mscg_gap = float(np.abs(a - b).max() / np.abs(b).max())
    model = create_model(neural_template.kind, top, **neural_template.config).double().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.tensor(data.positions, device=device)
    f = torch.tensor(data.forces, device=device)
    b = torch.tensor(data.box, device=device)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        idx = torch.randint(0, n_frames, (8,), device=device)
        opt.zero_grad()
        _, pred = batch_forces(model, x[idx], b[idx], create_graph=True)
        loss = ((pred - f[idx]) ** 2).mean()
        loss.backward()
        opt.step()
        done += 8 * n_beads
    if device != "cpu":
        torch.cuda.synchronize()
    return mscg_rate, done / (time.perf_counter() - t0), mscg_gap


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="out/demo")
    p.add_argument("--platform", default="CPU")
    p.add_argument("--sizes", default=None, help="comma-separated among 1k,4k,8k,64k,256k (default: "
                                                 "1k,4k,8k,64k on CPUs, 1k,8k,64k,256k on GPUs)")
    p.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per row")
    p.add_argument("--dynamics", default=None, help="dynamics.json of `enpcg calibrate` (time_scale mode)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--dtype", default=None, choices=["float32", "float64"], help="precision of the TorchForce and "
                   "PythonForce rows (default: the models' own, float64); the GPU script uses float32")
    p.add_argument("--rows", default=None, help="comma-separated substrings: time only the per-size rows whose "
                   "name contains one (e.g. 'native,graphs,empty'); default all")
    p.add_argument("--skip-fit", action="store_true", help="skip the fitting-throughput rows")
    p.add_argument("--skip-ns", action="store_true", help="skip the per-simulated-nanosecond rows (for a short "
                   "rerun of the per-size rows)")
    p.add_argument("--dry-run", action="store_true", help="run the GPU rows (CUDA graphs, mixed export) on this "
                   "platform, to check the GPU script's code paths without a GPU; their times mean nothing")
    args = p.parse_args(argv)
    gpu = args.platform in ("CUDA", "OpenCL", "HIP")
    gpu_rows = gpu or args.dry_run
    sizes = (args.sizes or ("1k,8k,64k,256k" if gpu else "1k,4k,8k,64k")).split(",")
    demo = Path(args.demo)
    if not (demo / "models" / "spline" / "model.json").exists():
        raise SystemExit(f"{demo}/models/spline not found: run `make demo` first (or pass --demo)")
    torch.set_num_threads(1)
    spline = load_model(demo / "models" / "spline")
    neural = load_model(demo / "models" / "neural")
    last = read_h5md(demo / "cg" / "cg.h5", frames=[-1], require_forces=False)
    rows, timing, extras = [], {}, {}

    def dump():
        # after every row, so that a run stopped by a time limit (a lent GPU machine) keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, **extras}, indent=1))

    # ------------------------------------------------------------------ per simulated nanosecond
    # (first: on a lent GPU machine with a time limit, these few rows matter more than the largest sizes)
    from systems.polyethylene import default_melt

    def guarded(label, fn):
        """fn() or NaN, printing the failure: one failed row must not cost the rest of a lent GPU run."""
        try:
            value = fn()
        except Exception as e:
            print(f"{label}: failed ({type(e).__name__}: {' | '.join(str(e).splitlines())[:1500]})", flush=True)
            value = float("nan")
        print(f"{label}: {value:.4g}", flush=True)
        extras[label] = value
        dump()
        return value

    melt = default_melt()
    nan = float("nan")
    ms_aa = ms_enp = ms_cg_native = ms_cg_neural = nan
    big = None
    if not args.skip_ns:
        ms_aa = guarded("ms_aa", lambda: time_steps(melt.system, melt.positions, 0.002, args.platform, args.seconds))
        enp = load_model("systems/models/polyethylene_enp")
        ms_enp = guarded("ms_enp", lambda: time_steps(
            make_system(export_forces(enp, "torch", dtype="float32"), enp.topology.masses, melt.box),
            melt.positions, 0.002, args.platform, args.seconds))
        ms_cg_native = guarded("ms_cg_native", lambda: time_steps(
            make_system(export_forces(spline, "native"), spline.topology.masses, last.box[0]),
            last.positions[0], CG_TIMESTEP_PS, args.platform, args.seconds))
        # "mixed": the priors as OpenMM's own forces, the network as one TorchForce (how the demo runs it); on a
        # GPU with CUDA graphs as well (the faster of the two counts)
        ms_cg_neural = guarded("ms_cg_neural", lambda: time_steps(
            make_system(export_forces(neural, "mixed", dtype=args.dtype), neural.topology.masses, last.box[0]),
            last.positions[0], NEURAL_TIMESTEP_PS, args.platform, args.seconds))
        if gpu_rows:
            ms_graphs = guarded("ms_cg_neural_graphs", lambda: time_steps(
                make_system(export_forces(neural, "mixed", cuda_graphs=True, box=last.box[0],
                                          positions=last.positions[0], dtype=args.dtype),
                            neural.topology.masses, last.box[0]),
                last.positions[0], NEURAL_TIMESTEP_PS, args.platform, args.seconds))
            ms_cg_neural = float(np.nanmin([ms_cg_neural, ms_graphs]))
            # The same comparison at scale: at 252 beads a GPU step is launch-bound for both systems, so the CG
            # speed-up there says little about large melts. Both melts replicated 8 x 8 x 4 (periodic images of
            # the equilibrated cells): 64,512 CG beads against 258,048 united atoms.
            from systems.polyethylene import create_system

            shape = (1, 1, 1) if args.dry_run else SHAPES["64k"]
            reps = shape[0] * shape[1] * shape[2]
            ua_pos = np.concatenate([melt.positions + a * melt.box[0] + b * melt.box[1] + c * melt.box[2]
                                     for a in range(shape[0]) for b in range(shape[1]) for c in range(shape[2])])
            ua_box = melt.box * np.asarray(shape, dtype=float)[:, None]
            n_chains = melt.topology.getNumChains()
            ua_system, _ = create_system(n_chains * reps, melt.n_particles // n_chains, float(ua_box.max()))
            ua_system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*v) for v in ua_box])
            ms_aa_big = guarded("ms_aa_big", lambda: time_steps(ua_system, ua_pos, 0.002, args.platform, args.seconds))
            top_b, pos_b, box_b = replicate(spline.topology, last.positions[0], last.box[0], shape)
            ms_cg_big = guarded("ms_cg_native_big", lambda: time_steps(
                make_system(export_forces(rebuild(spline, top_b), "native"), top_b.masses, box_b), pos_b,
                CG_TIMESTEP_PS, args.platform, args.seconds))
            big = (len(ua_pos), top_b.n_beads, ms_aa_big, ms_cg_big)
    time_scale = None
    if args.dynamics:
        cal = json.loads(Path(args.dynamics).read_text())
        time_scale = float(cal.get("time_scale", 1.0)) if cal.get("mode") == "time_scale" else None
    fit_device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    try:
        if args.skip_fit:
            raise RuntimeError("skipped (--skip-fit)")
        mscg_rate, neural_rate, mscg_gap = fitting_throughput(demo, neural, args.seconds * 5, fit_device)
    except Exception as e:
        print(f"fitting throughput: failed ({type(e).__name__}: {str(e)[:300]})", flush=True)
        mscg_rate = neural_rate = mscg_gap = float("nan")
    print(f"fitting ({fit_device}): MS-CG {mscg_rate:.3g} bead-frames/s, neural {neural_rate:.3g} bead-frames/s, "
          f"GPU vs CPU MS-CG tables {mscg_gap:.1e}", flush=True)
    extras.update(mscg_bead_frames_per_s=mscg_rate, neural_bead_frames_per_s=neural_rate, mscg_gpu_vs_cpu=mscg_gap)
    dump()

    # ------------------------------------------------------------------ cost per step against size
    for k, size in enumerate(sizes):
        top, pos, box = replicate(spline.topology, last.positions[0], last.box[0], SHAPES[size])
        s, nn, zero = rebuild(spline, top), rebuild(neural, top), Zero(top)
        dt = args.dtype
        cases = [("native spline", lambda: export_forces(s, "native")),
                 ("TorchForce spline", lambda: export_forces(s, "torch", dtype=dt)),
                 ("TorchForce neural", lambda: export_forces(nn, "torch", dtype=dt)),
                 ("TorchForce empty", lambda: export_forces(zero, "torch", dtype=dt))]
        if gpu_rows:
            # graph-safe exports size their cell lists on the starting positions (export_forces(positions=...))
            cases += [(f"{name}, CUDA graphs", lambda m=m: export_forces(m, "torch", cuda_graphs=True, box=box,
                                                                         positions=pos, dtype=dt))
                      for name, m in (("TorchForce spline", s), ("TorchForce neural", nn), ("TorchForce empty", zero))]
            # the neural model as the demo runs it: priors native, network as one TorchForce
            cases += [("mixed neural", lambda: export_forces(nn, "mixed", dtype=dt)),
                      ("mixed neural, CUDA graphs", lambda: export_forces(nn, "mixed", cuda_graphs=True, box=box,
                                                                         positions=pos, dtype=dt))]
        if k == 0 and hasattr(openmm, "PythonForce"):
            cases += [("PythonForce neural", lambda: export_forces(nn, "python", dtype=dt))]
        if args.rows:
            wanted = args.rows.split(",")
            cases = [(name, make) for name, make in cases if any(w in name for w in wanted)]
        base = None
        for name, make in cases:
            err = float("nan")
            try:
                if "empty" not in name and top.n_beads <= CHECK_MAX_BEADS:
                    ref = forces_on("Reference", make, top.masses, pos, box)
                    err = np.linalg.norm(forces_on(args.platform, make, top.masses, pos, box) - ref) / np.linalg.norm(ref)
                ms = time_steps(make_system(make(), top.masses, box), pos, 0.01, args.platform, args.seconds)
            except Exception as e:  # e.g. a model that CUDA graphs cannot capture: report it, go on
                print(f"{top.n_beads} beads, {name}: failed ({type(e).__name__}: "
                      f"{' | '.join(str(e).splitlines())[:1500]})", flush=True)
                ms = float("nan")
            base = base or ms
            rows.append({"size": size, "beads": top.n_beads, "force": name, "ms_per_step": ms, "x_native": ms / base,
                         "rel_force_error": err})
            timing[(size, name)] = ms
            print(f"{top.n_beads} beads, {name}: {ms:.3f} ms/step ({ms / base:.1f}x native), "
                  f"||dF||/||F|| {err:.1e}", flush=True)
            dump()
        if size == "4k" and not gpu:
            eager, scripted = eager_vs_scripted_ms(nn, pos, box)
            timing["eager_vs_scripted"] = (top.n_beads, eager, scripted)

    # ------------------------------------------------------------------ report
    device = torch.cuda.get_device_name(0) if gpu and torch.cuda.is_available() else platform.machine()
    from importlib.metadata import PackageNotFoundError, version

    def version_of(*names):
        # openmm-torch ships as "openmmtorch" on PyPI and as "acellera-openmmtorch-cu13" (CUDA 13) elsewhere
        for name in names:
            try:
                return version(name)
            except PackageNotFoundError:
                pass
        return "?"

    print(f"\n# enpcg benchmark, {date.today()}, {device}, OpenMM {openmm.__version__} {args.platform} platform, "
          f"openmmtorch {version_of('openmmtorch', 'acellera-openmmtorch-cu13')}, torch {torch.__version__} ({torch.get_num_threads()} thread)")
    print("| beads | force | ms/step | x native | ns/day (10 fs) | ||dF||/||F|| vs Reference |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['beads']} | {r['force']} | {r['ms_per_step']:.3f} | {r['x_native']:.1f} | "
              f"{0.01 * 86400 / r['ms_per_step']:.1f} | {r['rel_force_error']:.1e} |")

    if gpu_rows:
        print("\nGPU goals (CUDA graphs rows against the native export of the same run): spline within 5x / 3x "
              "and neural within 10x / 6x of native at 64k / 256k beads")
        for size, goal_spline, goal_neural in (("64k", 5, 10), ("256k", 3, 6)):
            if (size, "native spline") not in timing:
                continue
            native = timing[(size, "native spline")]
            sp = timing.get((size, "TorchForce spline, CUDA graphs"), float("nan")) / native
            nn_x = np.nanmin([timing.get((size, k), float("nan")) for k in
                              ("TorchForce neural, CUDA graphs", "mixed neural, CUDA graphs")]) / native
            print(f"  {size}: spline {sp:.1f}x (goal <= {goal_spline}: {'holds' if sp <= goal_spline else 'open'}), "
                  f"neural {nn_x:.1f}x (goal <= {goal_neural}: {'holds' if nn_x <= goal_neural else 'open'}); "
                  f"empty TorchForce {timing.get((size, 'TorchForce empty, CUDA graphs'), float('nan')):.3f} ms/step "
                  f"with graphs, {timing.get((size, 'TorchForce empty'), float('nan')):.3f} without")
    print("\nMarginal cost per bead-step (ms, after subtracting the empty TorchForce; native as is):")
    print("| force | small -> mid | mid -> big | ratio (goal <= 1.5) |")
    print("|---|---|---|---|")
    trio = ("8k", "64k", "256k") if gpu else ("1k", "8k", "64k")
    if all(any(r["size"] == t for r in rows) for t in trio):
        n = {r["size"]: r["beads"] for r in rows}
        suffixes = ["", ", CUDA graphs"] if gpu_rows else [""]
        for suffix in suffixes:
            names = ("native spline", "TorchForce spline", "TorchForce neural") + (("mixed neural",) if gpu_rows else ())
            for name in names:
                if "native" in name and suffix:
                    continue
                key = name + suffix

                def t(size):
                    empty = 0.0 if "native" in name else timing[(size, "TorchForce empty" + suffix)]
                    return timing[(size, key)] - empty

                m1 = (t(trio[1]) - t(trio[0])) / (n[trio[1]] - n[trio[0]])
                m2 = (t(trio[2]) - t(trio[1])) / (n[trio[2]] - n[trio[1]])
                print(f"| {key} | {m1:.2e} | {m2:.2e} | {m2 / m1:.2f} |")
    if "eager_vs_scripted" in timing:
        nb, eager, scripted = timing["eager_vs_scripted"]
        print(f"\nNeural model at {nb} beads, energy + forces outside OpenMM: eager {eager:.1f} ms, scripted "
              f"{scripted:.1f} ms after 20 warm-up calls: scripted / eager = {scripted / eager:.2f} (goal <= 1.2)")

    print("\nWall time per simulated nanosecond (same machine):")
    print("| system | sites | dt (fs) | ms/step | hours per ns | CG speed-up |")
    print("|---|---|---|---|---|---|")
    h = lambda ms, dt: ms / 1e3 * (1e3 / dt) / 3600  # noqa: E731  (ms/step, dt in ps -> hours per ns)
    print(f"| united-atom reference, native forces | 1008 | 2 | {ms_aa:.3f} | {h(ms_aa, 0.002):.3f} | 1 |")
    dt_cg, dt_nn = CG_TIMESTEP_PS, NEURAL_TIMESTEP_PS
    print(f"| CG, native spline | 252 | {dt_cg * 1e3:g} | {ms_cg_native:.3f} | {h(ms_cg_native, dt_cg):.3f} | "
          f"{h(ms_aa, 0.002) / h(ms_cg_native, dt_cg):.1f}x (goal >= 10) |")
    print(f"| equivariant atomistic reference (TorchForce, float32) | 1008 | 2 | {ms_enp:.3f} | "
          f"{h(ms_enp, 0.002):.3f} | 1 |")
    print(f"| CG, neural (priors native + network TorchForce) | 252 | {dt_nn * 1e3:g} | {ms_cg_neural:.3f} | {h(ms_cg_neural, dt_nn):.3f} | "
          f"{h(ms_enp, 0.002) / h(ms_cg_neural, dt_nn):.1f}x (goal >= 100) |")
    if big is not None:
        n_ua, n_cg, ms_a, ms_c = big
        print(f"| united-atom reference x {n_ua // 1008}, native forces | {n_ua} | 2 | {ms_a:.3f} | {h(ms_a, 0.002):.3f} | 1 |")
        print(f"| CG, native spline x {n_cg // 252} | {n_cg} | {dt_cg * 1e3:g} | {ms_c:.3f} | {h(ms_c, dt_cg):.3f} | "
              f"{h(ms_a, 0.002) / h(ms_c, dt_cg):.1f}x (goal >= 10) |")
    if time_scale:
        print(f"Per atomistic-equivalent nanosecond (time scale {time_scale:.3f} from {args.dynamics}): "
              f"native spline {h(ms_aa, 0.002) / h(ms_cg_native, dt_cg) * time_scale:.1f}x, neural "
              f"{h(ms_enp, 0.002) / h(ms_cg_neural, dt_nn) * time_scale:.1f}x")
    else:
        print("Per atomistic-equivalent nanosecond: pending (pass --dynamics from `enpcg calibrate`, time_scale mode)")
    print(f"\nFitting throughput on {demo / 'cg' / 'cg.h5'} ({fit_device}, 1 CPU thread): MS-CG spline "
          f"{mscg_rate:.3g} bead-frames/s; neural force matching (batch 8, Adam) {neural_rate:.3g} bead-frames/s")
    if fit_device != "cpu":
        print(f"MS-CG pair tables, GPU solve vs CPU solve: max |dU| / max |U| = {mscg_gap:.1e} (goal <= 1e-6)")
    extras.update(ms_cg_neural=ms_cg_neural, device=device)
    dump()


if __name__ == "__main__":
    main()
