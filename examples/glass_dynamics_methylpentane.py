"""CG dynamics of a molecular glass former in atomistic time: 3-methylpentane, one oriented bead per molecule.

    python examples/glass_dynamics_methylpentane.py --out out/glass_dynamics          # default, about 40 min
    python examples/glass_dynamics_methylpentane.py --out /tmp/gd --quick             # tiny settings (the test)

At two temperatures T1 > T2 (default 200 K and 170 K):

1. atomistic TraPPE-UA liquid (``systems.methylpentane``), sampled with a *weak* Langevin thermostat
   (0.1/ps per united atom: its own contribution to a molecule's friction, k_B T/(M gamma) ~ 0.2 nm^2/ps, is
   two orders of magnitude above the measured D, so it leaves the dynamics nearly untouched; stated, not
   hidden) at 2 fs, a frame with forces every 0.2 ps -> ``T<T>/atomistic.h5``;
2. mapped to oriented beads (``systems/mappings/methylpentane_frame.yaml``) -> ``T<T>/mapped/cg.h5``;
3. an ``oriented_neural`` model fitted by force and torque matching at that temperature (the settings of
   ``examples/oriented_methylpentane.py``, whose stages this script reuses) -> ``T<T>/model``;
4. the mapped atomistic dynamics of the bead centres and body axes with :mod:`enpcg.dynamics`: D from the
   MSD, F_s(q*, t) at the first peak q* of the centres' S(q) and its 1/e time tau_alpha, the non-Gaussian
   parameter, C_2(t) of the backbone axis e_x and its 1/e time tau_2;
5. the CG friction: :func:`openmm_plugin.cg_dynamics.fit_friction` on the bead centres' D at T1 ONLY (the
   friction acts on the rigid bead's massive sites, so it damps translation and rotation together) ->
   ``dynamics.json`` with the raw speed-up at 2/ps (the plain CG friction of the oriented example);
6. CG Langevin runs at T1 and T2 with that friction and each temperature's model; the same analysis; CG
   against mapped atomistic side by side -> ``dynamics_T<T>.png`` and ``summary.json`` with the ratios
   CG / mapped of D, tau_alpha and tau_2 and whether they are within 20 %.

Units: nm, ps, K, kJ/mol, amu; D in nm^2/ps; frictions 1/ps. Stages are resumable (finished files are reused;
sampling and fitting resume).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch  # before openmm: openmm-torch's plugin needs libtorch loaded

sys.path.insert(0, str(Path(__file__).resolve().parent))
import oriented_methylpentane as om  # noqa: E402  (the sampling, mapping and fitting stages)

AA_TIMESTEP = 0.002    # ps
AA_FRAME_STEPS = 100   # 0.2 ps between atomistic frames
AA_FRICTION = 0.1      # 1/ps, weak: see the docstring
CG_TIMESTEP = 0.005    # ps (the oriented example's stability argument)
CG_FRAME_STEPS = 40    # 0.2 ps between CG frames
CG_INITIAL_FRICTION = 2.0  # 1/ps: the oriented example's plain friction, where the raw speed-up is measured
TOLERANCE = 0.20       # the acceptance: CG / mapped within 20 %


def settings(args):
    if args.quick:
        s = {"molecules": 48, "equilibration_ps": 2.0, "frames": 150, "fit_seconds": 15.0, "fit_stride": 2,
             "calibration_steps": 1200, "cg_steps": 1600, "max_runs": 2}
    else:
        s = {"molecules": 64, "equilibration_ps": 40.0, "frames": 1500, "fit_seconds": 200.0, "fit_stride": 5,
             "calibration_steps": 20000, "cg_steps": 60000, "max_runs": 5}
    if args.fit_seconds is not None:
        s["fit_seconds"] = args.fit_seconds
    s.update(seed=args.seed, chiral=False, temperatures=[args.t1, args.t2])
    return s


def sample(folder, temperature, s, progress):
    from enpcg.h5md import n_frames
    from openmm_plugin.sampling import sample as run_sample
    from systems import methylpentane as mp

    path = folder / "atomistic.h5"
    if path.exists() and n_frames(path) >= s["frames"]:
        return path
    liq = mp.build_liquid(s["molecules"], temperature, seed=s["seed"], equilibration_ps=s["equilibration_ps"],
                          progress=progress)
    run_sample(liq.system, liq.topology, liq.positions, path, n_frames=s["frames"], interval_steps=AA_FRAME_STEPS,
               temperature=temperature, timestep=AA_TIMESTEP, friction=AA_FRICTION, seed=s["seed"] + 1,
               equilibration_steps=0, progress=progress, box=liq.box)
    return path


def trajectory(positions, box, topology, times):
    from enpcg.analysis import trajectory_from_arrays

    return trajectory_from_arrays(positions, box, topology, time=times)


def analyse(positions, axes, box, topology, times, q=None):
    """Dynamics of bead centres (nm) and backbone axes e_x; q in 1/nm (None: first peak of S(q))."""
    from enpcg.dynamics import diffusion_coefficient_or_bound, dynamics_summary

    traj = trajectory(positions, box, topology, times)
    result = dynamics_summary(traj, q=q, vectors=axes[..., 0], progress=False)
    if result["D"] is None:  # too short for the automatic diffusive window (quick settings)
        result["D"] = diffusion_coefficient_or_bound(*result["msd"], label="bead centres")["D"]
        result["D_window"] = "lags from a quarter to half the longest (lower bound)"
    return result


def cg_run(model, start, temperature, frictions, steps, seed, progress):
    """Langevin run of rigid oriented beads; returns centres (F, n, 3) nm, axes (F, n, 3, 3), times ps, box."""
    import openmm
    from openmm import unit
    from tqdm import tqdm

    from openmm_plugin.integrators import attach, langevin_integrator
    from openmm_plugin.oriented import create_oriented_system
    from openmm_plugin.sampling import best_platform, openmm_seed

    positions, axes, box = start
    osys = create_oriented_system(model, positions, axes, box, dtype="float32")
    integrator = langevin_integrator(temperature, frictions(osys), CG_TIMESTEP,
                                     n_particles=osys.system.getNumParticles())
    integrator.setRandomNumberSeed(openmm_seed(seed))
    platform = best_platform()
    props = {"Threads": str(torch.get_num_threads())} if platform.getName() == "CPU" else {}
    context = openmm.Context(osys.system, integrator, platform, props)
    attach(integrator)
    context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
    context.setPositions(osys.positions)
    context.computeVirtualSites()
    context.setVelocitiesToTemperature(temperature * unit.kelvin, openmm_seed(seed + 1))
    integrator.step(steps // 10)  # equilibration at the new friction
    n_rec = steps // CG_FRAME_STEPS + 1
    centres = np.empty((n_rec, osys.centre_index.size, 3))
    frames_axes = np.empty((n_rec, osys.centre_index.size, 3, 3))
    for k in tqdm(range(n_rec), desc=f"CG run {temperature:g} K", disable=not progress, leave=False):
        if k:
            integrator.step(CG_FRAME_STEPS)
        x = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        c, q = osys.beads(x, box)
        centres[k] = x[osys.centre_index]  # continuous (OpenMM never wraps unless asked)
        frames_axes[k] = q
        if not np.all(np.isfinite(c)):
            raise RuntimeError(f"the CG run at {temperature} K blew up at frame {k}; try a smaller time step")
    return centres, frames_axes, np.arange(n_rec) * CG_FRAME_STEPS * CG_TIMESTEP, osys


def _scalars(d):
    return {k: (None if d.get(k) is None else float(d[k])) for k in ("q", "D", "tau_alpha", "tau_2",
                                                                       "alpha2_max", "t_alpha2_max")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/glass_dynamics")
    p.add_argument("--t1", type=float, default=200.0, help="calibration temperature, K")
    p.add_argument("--t2", type=float, default=170.0, help="lower test temperature, K")
    p.add_argument("--fit-seconds", type=float, default=None, help="fit wall-time budget per temperature, s "
                   "(default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny settings (minutes; the test)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from enpcg.dynamics import plot_dynamics
    from enpcg.h5md import read_h5md
    from enpcg.oriented.data import read_oriented
    from openmm_plugin.cg_dynamics import DynamicsCalibration, fit_friction

    t_start = time.perf_counter()
    per_t = {}
    for temperature in s["temperatures"]:
        folder = out / f"T{temperature:g}"
        folder.mkdir(exist_ok=True)
        print(f"-- {temperature:g} K: atomistic sampling, mapping, fitting", flush=True)
        aa = sample(folder, temperature, s, args.progress)
        mapped_path = om.map_atomistic(folder, aa, s)
        mapped = read_oriented(mapped_path)
        times = read_h5md(mapped_path, require_forces=False).time
        times = times - times[0]
        om.TEMPERATURE = temperature  # the reused fitting stage records the temperature in the model metadata
        fit_data = mapped.select(slice(0, None, s["fit_stride"]))
        model, _, fit = om.fit_model(folder, fit_data, s, args.progress)
        ref = analyse(mapped.positions, mapped.axes, mapped.box, mapped.topology, times)
        per_t[temperature] = {"mapped": mapped, "model": model, "fit": fit, "reference": ref}
        print(f"   mapped atomistic: D {ref['D']}, tau_alpha {ref['tau_alpha']} ps (q {ref['q']:.2f}/nm), "
              f"tau_2 {ref['tau_2']} ps; fit test errors force {fit['test']['force']:.3f} torque "
              f"{fit['test']['torque']:.3f}", flush=True)

    t1, t2 = s["temperatures"]
    cal_path = out / "dynamics.json"
    first = per_t[t1]
    start = (first["mapped"].positions[-1], first["mapped"].axes[-1], first["mapped"].box[-1])
    if cal_path.exists():
        cal = DynamicsCalibration.load(cal_path)
    else:
        print(f"-- friction fit on D at {t1:g} K", flush=True)
        from openmm_plugin.oriented import create_oriented_system

        osys = create_oriented_system(first["model"], *start, dtype="float32")
        bead_type = first["mapped"].topology.type_names()[0]
        cal = fit_friction(osys.system, osys.positions, start[2], {bead_type: osys.centre_index},
                           {bead_type: first["reference"]["D"]}, friction_groups={bead_type: osys.site_index.ravel()},
                           temperature=t1, timestep=CG_TIMESTEP, steps=s["calibration_steps"],
                           record_interval=CG_FRAME_STEPS, equilibration_steps=s["calibration_steps"] // 10,
                           initial_friction=CG_INITIAL_FRICTION, rel_tol=0.05, max_iter=s["max_runs"],
                           seed=s["seed"] + 10, progress=args.progress)
        cal.save(cal_path)
    bead_type = next(iter(cal.frictions))
    gamma = cal.frictions[bead_type]
    print(f"   raw CG speed-up at {CG_INITIAL_FRICTION:g}/ps: {cal.raw_speed_up[bead_type]:.2f}x; fitted friction "
          f"{gamma:.4g}/ps", flush=True)

    results = {}
    for temperature in s["temperatures"]:
        entry = per_t[temperature]
        mapped = entry["mapped"]
        print(f"-- CG run at {temperature:g} K with the friction fitted at {t1:g} K", flush=True)

        def frictions(osys):
            return np.full(osys.system.getNumParticles(), gamma)

        centres, axes, times, osys = cg_run(entry["model"], (mapped.positions[-1], mapped.axes[-1], mapped.box[-1]),
                                            temperature, frictions, s["cg_steps"], s["seed"] + 20, args.progress)
        ref = entry["reference"]
        cg = analyse(centres, axes, mapped.box[-1], mapped.topology, times, q=ref["q"])
        plot_dynamics([ref, cg], out / f"dynamics_T{temperature:g}.png",
                      [f"mapped atomistic {temperature:g} K", f"CG {temperature:g} K (friction {gamma:.3g}/ps)"])
        ratios = {}
        for key in ("D", "tau_alpha", "tau_2"):
            ratios[key] = None if ref[key] is None or cg[key] is None else float(cg[key] / ref[key])
        results[f"{temperature:g}"] = {
            "mapped": _scalars(ref), "cg": _scalars(cg), "cg_over_mapped": ratios,
            "within_tolerance": {k: (v is not None and abs(v - 1) <= TOLERANCE) for k, v in ratios.items()
                                 if k != "D"},
            "fit_test_errors": {"force": entry["fit"]["test"]["force"], "torque": entry["fit"]["test"]["torque"]}}
        print(f"   CG / mapped: D {ratios['D']}, tau_alpha {ratios['tau_alpha']}, tau_2 {ratios['tau_2']}",
              flush=True)

    summary = {"settings": {**s, "aa_timestep_ps": AA_TIMESTEP, "aa_frame_ps": AA_FRAME_STEPS * AA_TIMESTEP,
                            "aa_friction_per_ps": AA_FRICTION, "cg_timestep_ps": CG_TIMESTEP,
                            "cg_frame_ps": CG_FRAME_STEPS * CG_TIMESTEP, "tolerance": TOLERANCE},
               "calibration": {"temperature_K": t1, "friction_per_ps": gamma,
                               "raw_speed_up": cal.raw_speed_up[bead_type],
                               "initial_friction_per_ps": CG_INITIAL_FRICTION, "runs": cal.history},
               "temperatures": results, "wall_s": time.perf_counter() - t_start}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"summary: {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
