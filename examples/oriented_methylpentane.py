"""3-methylpentane with one oriented bead per molecule, end to end: atomistic sampling, mapping with torques,
force-and-torque matching, an OpenMM CG run of rigid oriented beads, orientational structure and torques.

    python examples/oriented_methylpentane.py --out out/oriented_mp            # default settings, minutes
    python examples/oriented_methylpentane.py --out /tmp/omp --quick           # tiny settings (the test)

Stages (each writes into ``--out``; a rerun reuses finished stages whose inputs and settings are unchanged,
and interrupted sampling and fitting resume; ``stages.json`` records the settings of each stage):

1. ``systems.methylpentane.build_liquid``: TraPPE-UA 3-methylpentane (flexible bonds), 0.75 g/cm^3, 200 K.
2. ``openmm_plugin.sampling.sample``: Langevin (LangevinMiddleIntegrator, 2 fs, friction 1/ps), a frame with
   forces every 0.5 ps -> ``atomistic.h5``.
3. ``enpcg.mapping.map_trajectory`` with ``systems/mappings/methylpentane_frame.yaml`` (one frame bead per
   molecule at its centre of mass; e_x along the backbone, e_y towards the methyl branch) -> ``mapped/cg.h5``
   with bead forces, torques tau_I = sum_i (r_i - R_I) x f_i and body axes.
4. ``enpcg.oriented.fit.fit_oriented``: an ``oriented_neural`` model of frame beads (cutoff 1.0 nm, two
   32-wide hidden layers, a repulsive core at 0.45 nm, energy unit 2.5 kJ/mol, float32) fitted by force and
   torque matching (Adam, lr 0.02, 4 frames a batch) on the first 80 % of the frames within a wall-time
   budget; the last 20 % are a held-out test block -> ``model/`` (model.json, model.pt). The training frames
   have the axes of a random half of the beads turned by the mapping's label symmetry (the two ethyl groups
   are identical: (e_x, e_y, e_z) -> (-e_x, e_y, -e_z), see :func:`relabel_augment`). 3-methylpentane is
   achiral (C3 carries two identical ethyl groups), so the pseudoscalar channel is left out by default; with
   ``--chiral`` it is fitted too and its share of the energy variance is reported (it should be near zero).
5. ``openmm_plugin.oriented``: each bead is 4 rigid massive sites (a tetrahedron with the bead's mass,
   86.178 amu, and mapped inertia) and a virtual-site centre; LangevinMiddleIntegrator at 200 K, 5 fs step,
   friction 2/ps, the model as a TorchForce (float32), starting from the last mapped frame; after a short
   equilibration ``OrientedForceReporter`` writes centres, axes, forces and torques -> ``cg_run.h5``.
   The 5 fs step: the mapped torque fluctuations (RMS about 30 kJ/mol at 200 K) give a libration frequency
   sqrt(<tau^2>/(kT I)) of about 24 rad/ps about the stiffest (smallest-inertia, I_xx ~ 0.9 amu nm^2) axis,
   a period of about 260 fs, so 50 steps per period; the translational rattling (RMS force about 190
   kJ/mol/nm, 86 amu) has a period near 400 fs. The run records the translational and rotational kinetic
   temperatures (the default run gives about 198 K and 204 K; a separate 80 ps run at 5 fs gave T_rot
   202 +- 2 K) and stops if they turn non-finite.
6. ``enpcg.oriented.analysis``: Jensen-Shannon divergences (nats, ``enpcg.analysis.js_divergence``) of the
   pair distributions of e_a.e_a, e_a.r_hat (a = x, y, z) and r, CG run against the mapped reference, for
   neighbours closer than 0.85 nm (the first minimum of the centre-centre g(r)) and for close contacts
   (r < 0.6 nm), with the project's acceptance threshold max(0.02, 3 x the reference's half-split JS). The
   liquid's orientational order is weak: over the whole first shell these distributions are nearly flat, so
   each table also gives the JS of an isotropic control (the reference positions with random orientations),
   the value a model without orientational structure would get; the contact shell is where the metric
   discriminates. Torque statistics (RMS per body axis, kJ/mol) of the reference, of the model on the
   reference frames and of the CG run -> ``summary.json``, ``orientational.png``,
   ``orientational_contact.png``, ``torques.png``, ``fit_history.png``.

Units: nm, ps, kJ/mol, amu, K; torques kJ/mol.
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch  # before openmm: openmm-torch's plugin needs libtorch loaded

KB = 0.008314462618  # kJ/mol/K
TEMPERATURE = 200.0  # K
AA_TIMESTEP = 0.002  # ps
AA_INTERVAL = 250    # steps: 0.5 ps between atomistic frames
CG_TIMESTEP = 0.005  # ps
CG_FRICTION = 2.0    # 1/ps
SHELLS = {"first_shell": 0.85,  # nm, first minimum of the mapped centre-centre g(r)
          "contact": 0.6}       # nm, close contacts (g(r) rising to its first peak at about 0.6 nm)
N_BINS = 50
MODEL_CONFIG = {"cutoff": 1.0, "n_rbf": 8, "hidden": 32, "depth": 2, "core_radius": 0.45, "energy_scale": 2.5,
                "chiral": False, "seed": 0}
FIT = {"lr": 2e-2, "batch_size": 4, "val_fraction": 0.2}  # Adam, cosine decay to 5 % over the time budget


def _settings(args):
    if args.quick:  # seconds: the smallest liquid the 1 nm cutoff allows and a few frames
        s = {"molecules": 48, "equilibration_ps": 2.0, "frames": 40, "fit_seconds": 20.0, "cg_steps": 1000,
             "cg_equilibration_steps": 100, "report_steps": 20}
    else:
        s = {"molecules": 64, "equilibration_ps": 20.0, "frames": 300, "fit_seconds": 150.0, "cg_steps": 10000,
             "cg_equilibration_steps": 400, "report_steps": 100}
    for key in ("molecules", "frames", "fit_seconds", "cg_steps"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    s["seed"] = args.seed
    s["chiral"] = bool(args.chiral)
    return s


def _newer(path, *sources):
    """True if ``path`` exists and is at least as new as every source file."""
    path = Path(path)
    return path.exists() and all(path.stat().st_mtime >= Path(src).stat().st_mtime for src in sources)


def _stamp(out, stage, values=None):
    """The settings a stage's outputs were made with (``stages.json``); with ``values``, record them."""
    path = out / "stages.json"
    stamps = json.loads(path.read_text()) if path.exists() else {}
    if values is None:
        return stamps.get(stage)
    stamps[stage] = values
    path.write_text(json.dumps(stamps, indent=2))
    return values


def _stage(name):
    print(f"-- {name}", flush=True)
    return time.perf_counter()


def sample_atomistic(out, s, progress):
    """Stages 1-2: the liquid and the atomistic trajectory with forces (resumable)."""
    from enpcg.h5md import n_frames
    from openmm_plugin.sampling import sample
    from systems import methylpentane as mp

    path = out / "atomistic.h5"
    stamp = {"molecules": s["molecules"], "seed": s["seed"]}
    if path.exists() and _stamp(out, "sample") not in (None, stamp):
        raise SystemExit(f"{path} was sampled with {_stamp(out, 'sample')}, not {stamp}; use another --out")
    _stamp(out, "sample", stamp)
    if path.exists() and n_frames(path) >= s["frames"]:
        print(f"   {path} holds {n_frames(path)} frames; reusing it")
        return path, mp.box_length_for_density(s["molecules"], mp.DEFAULT_DENSITY)
    liq = mp.build_liquid(s["molecules"], TEMPERATURE, seed=s["seed"], equilibration_ps=s["equilibration_ps"],
                          progress=progress)
    print(f"   {s['molecules']} molecules, box {liq.box[0, 0]:.3f} nm, {liq.density():.3f} g/cm^3")
    sample(liq.system, liq.topology, liq.positions, path, n_frames=s["frames"], interval_steps=AA_INTERVAL,
           temperature=TEMPERATURE, timestep=AA_TIMESTEP, friction=1.0, seed=s["seed"] + 1,
           equilibration_steps=0, progress=progress, box=liq.box)
    return path, float(liq.box[0, 0])


def map_atomistic(out, aa_path, s):
    """Stage 3: bead positions, axes, forces and torques."""
    from enpcg.h5md import n_frames
    from enpcg.mapping import load_mapping, map_trajectory
    from systems import methylpentane as mp

    path = out / "mapped" / "cg.h5"
    if _newer(path, aa_path) and n_frames(path) == n_frames(aa_path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    n_atoms = 6 * s["molecules"]
    masses = np.array([mp.SITES[t][0] for t in mp.SITE_TYPES] * s["molecules"])
    mapping = load_mapping(mp.MAPPING, n_atoms=n_atoms, masses=masses)
    return map_trajectory(mapping, aa_path, path, progress=False)


def relabel_augment(data, seed):
    """The frames with the body axes of a random half of the beads turned by the mapping's label symmetry.

    3-methylpentane's two ethyl groups are identical, so relabelling C1-C2 <-> C5-C4 is a symmetry of the force
    field; it turns the mapped frame by 180 deg about e_y: (e_x, e_y, e_z) -> (-e_x, e_y, -e_z). Bead forces and
    torques (lab vectors, sums over the same atoms) are unchanged. The model does not build this symmetry in;
    training on frames relabelled at random teaches it (without it the CG run over-weights e_x,i.e_x,j -> +1,
    a preference for parallel *labels* that the physical ensemble cannot have).
    """
    from enpcg.oriented.data import OrientedData

    flip = np.random.default_rng(seed).random(data.positions.shape[:2]) < 0.5
    axes = data.axes.copy()
    axes[flip, :, 0] *= -1.0
    axes[flip, :, 2] *= -1.0
    return OrientedData(data.positions, axes, data.forces, data.torques, data.box, data.topology, data.energies)


def fit_model(out, data, s, progress):
    """Stage 4: force-and-torque matching (resumable through ``fit/checkpoint.pt``)."""
    from enpcg.models import create_model, load_model, save_model
    from enpcg.oriented.fit import chiral_energy_fraction, fit_oriented, oriented_errors

    n_test = max(1, int(round(0.2 * data.n_frames)))
    train, test = data.select(slice(0, data.n_frames - n_test)), data.select(slice(data.n_frames - n_test, None))
    model_dir = out / "model"
    history_path = out / "fit" / "history.json"
    stamp = {"chiral": s["chiral"], "fit_seconds": s["fit_seconds"], "frames": data.n_frames,
             "relabel_augment": True}
    mapped = out / "mapped" / "cg.h5"
    if _newer(model_dir / "model.pt", mapped) and history_path.exists() and _stamp(out, "fit") == stamp:
        model = load_model(model_dir)
        history = json.loads(history_path.read_text())
        print(f"   reusing the model in {model_dir}")
    else:
        if (model_dir / "model.pt").exists() or _stamp(out, "fit") != stamp:  # stale: a finished or other fit
            for stale in (out / "fit" / "checkpoint.pt", history_path, model_dir / "model.pt"):
                stale.unlink(missing_ok=True)
        _stamp(out, "fit", stamp)  # an interrupted fit with these settings resumes from fit/checkpoint.pt
        config = {**MODEL_CONFIG, "chiral": s["chiral"]}
        model = create_model("oriented_neural", data.topology, **config).float()
        history = fit_oriented(model, relabel_augment(train, s["seed"] + 4), epochs=100000, **FIT, seed=s["seed"],
                               max_seconds=s["fit_seconds"], out_dir=out / "fit", device="auto", progress=progress)
        model.cpu()
        save_model(model, model_dir, metadata={"example": "examples/oriented_methylpentane.py",
                                               "temperature_K": TEMPERATURE, "train_frames": train.n_frames})
    result = {"train_frames": train.n_frames, "test_frames": test.n_frames,
              "epochs": len(history["epoch"]), "seconds": history["seconds"][-1] if history["seconds"] else 0.0,
              "length_scale_nm": history["length_scale"], "best_val_loss": history.get("best_val_loss"),
              "train": oriented_errors(model, train), "test": oriented_errors(model, test),
              "chiral_energy_fraction": chiral_energy_fraction(model, test) if model.chiral else None,
              "config": model.config, "precision": "float32", "relabel_augment": True, **FIT}
    return model, history, result


def run_cg(out, model, data, s):
    """Stage 5: Langevin dynamics of rigid oriented beads in OpenMM with the fitted model."""
    import openmm
    from openmm import app, unit

    from enpcg.h5md import n_frames
    from openmm_plugin.oriented import OrientedForceReporter, create_oriented_system
    from openmm_plugin.sampling import best_platform, openmm_seed, platform_properties

    path = out / "cg_run.h5"
    info_path = out / "cg_run.json"
    n_reports = s["cg_steps"] // s["report_steps"]
    if _newer(info_path, out / "model" / "model.pt") and path.exists() and n_frames(path) == n_reports:
        print(f"   {path} holds {n_reports} frames; reusing it")
        return path, json.loads(info_path.read_text())
    t0 = time.perf_counter()
    osys = create_oriented_system(model, data.positions[-1], data.axes[-1], data.box[-1], dtype="float32")
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, CG_FRICTION / unit.picosecond,
                                                 CG_TIMESTEP * unit.picosecond)
    integrator.setRandomNumberSeed(openmm_seed(s["seed"] + 2))
    platform = best_platform()
    props = platform_properties(platform)
    if platform.getName() == "CPU":
        props = {"Threads": str(torch.get_num_threads())}
    sim = app.Simulation(osys.topology, osys.system, integrator, platform, props)
    sim.context.setPositions(osys.positions)
    sim.context.computeVirtualSites()
    sim.context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, openmm_seed(s["seed"] + 3))
    n = osys.site_index.shape[0]
    masses = np.array([[osys.system.getParticleMass(int(p)).value_in_unit(unit.dalton) for p in row]
                       for row in osys.site_index])

    def temperatures():
        st = sim.context.getState(getVelocities=True, getEnergy=True)
        v = st.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
        vc = (masses[..., None] * v[osys.site_index]).sum(1) / masses.sum(1)[:, None]
        k_trans = 0.5 * float(np.sum(masses.sum(1)[:, None] * vc ** 2))
        k_rot = float(osys.rotational_kinetic_energy(v).sum())
        return (2 * k_trans / ((3 * n - 3) * KB), 2 * k_rot / (osys.rotational_dof * n * KB),
                st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))

    sim.step(s["cg_equilibration_steps"])
    reporter = OrientedForceReporter(path, s["report_steps"], osys)
    sim.currentStep = 0
    sim.reporters.append(reporter)
    t_trans, t_rot, energy = [], [], []
    t1 = time.perf_counter()
    try:
        for _ in range(n_reports):
            sim.step(s["report_steps"])
            a, b, e = temperatures()
            t_trans.append(a)
            t_rot.append(b)
            energy.append(e)
            if not all(math.isfinite(x) for x in (a, b, e)):
                raise RuntimeError(f"the CG run blew up at step {sim.currentStep}: T_trans {a}, T_rot {b}, "
                                   f"E {e}; try a smaller time step")
    finally:
        reporter.close()
    wall = time.perf_counter() - t1
    info = {"platform": platform.getName(), "timestep_ps": CG_TIMESTEP, "friction_per_ps": CG_FRICTION,
            "temperature_K": TEMPERATURE, "equilibration_steps": s["cg_equilibration_steps"],
            "steps": n_reports * s["report_steps"], "report_steps": s["report_steps"], "frames": n_reports,
            "simulated_ps": n_reports * s["report_steps"] * CG_TIMESTEP, "model_precision": "float32",
            "sites_per_bead": int(osys.site_index.shape[1]), "bead_mass_amu": float(masses[0].sum()),
            "T_trans_K": {"mean": float(np.mean(t_trans)), "std": float(np.std(t_trans))},
            "T_rot_K": {"mean": float(np.mean(t_rot)), "std": float(np.std(t_rot))},
            "potential_energy_kJ_mol": {"mean": float(np.mean(energy)), "std": float(np.std(energy)),
                                        "all_finite": bool(np.all(np.isfinite(energy)))},
            "steps_per_second": n_reports * s["report_steps"] / wall, "wall_s": time.perf_counter() - t0}
    info_path.write_text(json.dumps(info, indent=2))
    return path, info


def plot_history(history, path):
    from enpcg.analysis import _grid, _save

    fig, (ax,) = _grid(1)
    ax.semilogy(history["seconds"], history["train_loss"], label="train")
    ax.semilogy(history["seconds"], history["val_loss"], label="validation")
    ax.set(xlabel="wall time (s)", ylabel="loss ((kJ/mol/nm)^2)", title="force + torque matching")
    ax.legend()
    return _save(fig, path)


def _isotropic_control(reference, seed):
    """The reference's positions with uniformly random orientations: what the JS shows for a model that
    learned no orientational structure (frames of an OrientedData-like namespace)."""
    from types import SimpleNamespace

    from enpcg.oriented import random_rotations

    f, n = reference.positions.shape[:2]
    axes = random_rotations(f * n, np.random.default_rng(seed)).reshape(f, n, 3, 3)
    return SimpleNamespace(positions=reference.positions, axes=axes, box=reference.box)


def analyse(out, reference, cg, model, seed):
    """Stage 6: orientational JS (two neighbour shells), torque statistics and plots."""
    from enpcg.oriented.analysis import (orientational_js, js_thresholds, plot_orientational, plot_torques,
                                         torque_statistics)
    from enpcg.oriented.fit import predict

    control = _isotropic_control(reference, seed)
    js_tables = {}
    for shell, r_max in SHELLS.items():
        js = orientational_js(reference, cg, r_max, N_BINS, self_js=True)
        iso = orientational_js(reference, control, r_max, N_BINS)
        thresholds = js_thresholds(js)
        js_tables[shell] = {k: {"js": js[k], "self_js": js[f"{k}_self"], "threshold": thresholds[k],
                                "pass": bool(js[k] <= thresholds[k]), "isotropic_control_js": iso[k]}
                            for k in thresholds}
        name = "orientational.png" if shell == "first_shell" else f"orientational_{shell}.png"
        plot_orientational(reference, cg, out / name, r_max=r_max, n_bins=N_BINS,
                           labels=("mapped atomistic", "CG run"))
    _, _, t_model = predict(model, reference)
    torques = {"reference": torque_statistics(reference.torques, reference.axes),
               "model_on_reference": torque_statistics(t_model, reference.axes),
               "cg_run": torque_statistics(cg.torques, cg.axes)}
    plot_torques(reference, [(t_model, reference.axes), cg], out / "torques.png",
                 labels=("mapped atomistic", "model on mapped frames", "CG run"))
    return js_tables, torques


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/oriented_methylpentane", help="output folder")
    p.add_argument("--molecules", type=int, default=None, help="molecules (default 64; at least 42)")
    p.add_argument("--frames", type=int, default=None, help="atomistic frames, 0.5 ps apart (default 300)")
    p.add_argument("--fit-seconds", type=float, default=None, help="fit wall-time budget, s (default 150)")
    p.add_argument("--cg-steps", type=int, default=None, help="CG production steps of 5 fs (default 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chiral", action="store_true",
                   help="add the model's pseudoscalar (chiral) channel; 3-methylpentane is achiral, so its share "
                        "of the energy variance (reported) should come out near zero")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small sizes)")
    p.add_argument("--quick", action="store_true", help="tiny settings, about a minute (used by the tests)")
    p.add_argument("--progress", action="store_true", help="progress bars")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args):
    s = _settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    t = _stage("atomistic liquid and sampling")
    aa_path, box_length = sample_atomistic(out, s, args.progress)
    timings["sample_s"] = time.perf_counter() - t

    t = _stage("mapping")
    from enpcg.oriented.data import read_oriented
    mapped = read_oriented(map_atomistic(out, aa_path, s))
    timings["map_s"] = time.perf_counter() - t

    t = _stage(f"fitting oriented_neural ({s['fit_seconds']:g} s budget)")
    model, history, fit = fit_model(out, mapped, s, args.progress)
    plot_history(history, out / "fit_history.png")
    timings["fit_s"] = time.perf_counter() - t

    t = _stage(f"CG run ({s['cg_steps']} steps of {CG_TIMESTEP * 1000:g} fs)")
    cg_path, cg_info = run_cg(out, model, mapped, s)
    cg = read_oriented(cg_path)
    timings["cg_run_s"] = time.perf_counter() - t

    t = _stage("analysis")
    js_tables, torques = analyse(out, mapped, cg, model, s["seed"])
    timings["analysis_s"] = time.perf_counter() - t

    summary = {"settings": {**s, "temperature_K": TEMPERATURE, "aa_timestep_ps": AA_TIMESTEP,
                            "aa_frame_interval_ps": AA_INTERVAL * AA_TIMESTEP, "box_nm": box_length,
                            "shells_r_max_nm": SHELLS, "n_bins": N_BINS},
               "fit": fit, "cg_run": cg_info, "orientational_js": js_tables, "torques": torques,
               "cg_run_finite": {"torques": bool(np.all(np.isfinite(cg.torques))),
                                 "forces": bool(np.all(np.isfinite(cg.forces))),
                                 "energy": bool(cg.energies is not None and np.all(np.isfinite(cg.energies)))},
               "timings": timings,
               "files": {"atomistic": "atomistic.h5", "mapped": "mapped/cg.h5", "model": "model",
                         "cg_run": "cg_run.h5",
                         "plots": ["orientational.png", "orientational_contact.png", "torques.png", "fit_history.png"]}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"\nfit ({fit['epochs']} epochs, {fit['seconds']:.0f} s): relative RMS error force / torque "
          f"train {fit['train']['force']:.3f} / {fit['train']['torque']:.3f}, "
          f"test {fit['test']['force']:.3f} / {fit['test']['torque']:.3f}"
          + (f"; chiral energy fraction {fit['chiral_energy_fraction']:.2e}" if s["chiral"] else ""))
    print(f"CG run: {cg_info['simulated_ps']:g} ps, T_trans {cg_info['T_trans_K']['mean']:.1f} K, "
          f"T_rot {cg_info['T_rot_K']['mean']:.1f} K (set {TEMPERATURE:g} K), "
          f"{cg_info['steps_per_second']:.0f} steps/s on {cg_info['platform']}")
    for shell, table in js_tables.items():
        title = f"{shell} (r < {SHELLS[shell]:g} nm)"
        print(f"{title:<26}{'JS':>8}{'self JS':>9}{'thresh.':>9}{'isotropic':>11}  pass")
        for k, v in table.items():
            print(f"  {k:<24}{v['js']:>8.4f}{v['self_js']:>9.4f}{v['threshold']:>9.4f}"
                  f"{v['isotropic_control_js']:>11.4f}  {v['pass']}")
    print(f"{'torque RMS':<22}{'total':>8}{'x':>8}{'y':>8}{'z':>8}   (kJ/mol, body axes)")
    for k, v in torques.items():
        print(f"{k:<22}{v['rms']:>8.2f}{v['rms_x']:>8.2f}{v['rms_y']:>8.2f}{v['rms_z']:>8.2f}")
    print(f"summary: {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
