"""Oriented beads in OpenMM: cost per MD step of the CG ortho-terphenyl (one rigid-site bead per molecule,
TorchForce) against the native atomistic model (three LJ sites per molecule, OpenMM NonbondedForce), and a
physics check that both give the same energy and per-molecule forces and torques on one configuration.

    python bench/oriented.py [--platform CPU|CUDA] [--molecules 64,216] [--steps 200] [--fit]

Prints a table: ms/step of native atomistic OTP, of the CG model exported as float32 and float64 TorchForce,
their ratio to native, and the energy/force/torque agreement (||d||/||ref||). Units: nm, ps, kJ/mol.
``--fit`` also times force-and-torque matching (Gay-Berne and oriented_neural, 64 beads x 40 frames of the
Gay-Berne known-answer data) on the CPU and, when there is one, on the GPU.
The CG model is the exact representation (``rigid_sites`` with the true Lewis-Wahnstrom parameters), so the
comparison is like for like: same physics, one bead per molecule instead of three atoms.
"""
from __future__ import annotations

import argparse
import platform as _platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openmm  # noqa: E402
from openmm import unit  # noqa: E402

from enpcg.mapping import load_mapping  # noqa: E402
from enpcg.models import create_model  # noqa: E402
from enpcg.oriented.fit import mean_body_coordinates  # noqa: E402
from openmm_plugin.oriented import create_oriented_system  # noqa: E402
from systems import otp  # noqa: E402


def _time_steps(system, positions, platform, steps, dt):
    props = {"Precision": "mixed"} if platform == "CUDA" else ({"Threads": "2"} if platform == "CPU" else {})
    integ = openmm.LangevinMiddleIntegrator(346.0, 1.0, dt)
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName(platform), props)
    ctx.setPositions(positions)
    ctx.computeVirtualSites()
    ctx.setVelocitiesToTemperature(346.0, 1)
    integ.step(20)
    ctx.getState(getEnergy=True)
    t = time.perf_counter()
    integ.step(steps)
    ctx.getState(getEnergy=True)
    return (time.perf_counter() - t) / steps * 1e3, ctx


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--platform", default="CPU")
    p.add_argument("--molecules", default="64,216")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--fit", action="store_true", help="also time fitting on CPU and GPU")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for n in [int(x) for x in args.molecules.split(",")]:
        liquid = otp.build_liquid(n_molecules=n, equilibration_ps=2.0, seed=1)
        box = liquid.box
        mapping = load_mapping(otp.MAPPING, n_atoms=liquid.n_particles, masses=liquid.masses)
        pos = mapping.map_positions(liquid.positions, box)
        axes = mapping.map_axes(liquid.positions, box)
        topo = mapping.topology
        topo.body_moments = {"OTP": mapping.body_second_moments(liquid.positions, box).mean(axis=0).tolist()}
        model = create_model("rigid_sites", topo, sites=mean_body_coordinates(mapping, liquid.positions, box),
                             sigma=otp.SIGMA, epsilon=otp.EPSILON, cutoff=otp.CUTOFF,
                             switch_distance=otp.SWITCH_DISTANCE).double()
        native_ms, ctx = _time_steps(liquid.system, liquid.positions, args.platform, args.steps, 0.005)
        # physics check on the starting configuration: per-molecule force and torque, native vs CG
        ctx.setPositions(liquid.positions)
        st = ctx.getState(getEnergy=True, getForces=True)
        f_atoms = st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        e_native = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        f_ref = mapping.map_forces(f_atoms)
        t_ref = mapping.map_torques(liquid.positions, f_atoms, box)
        row = {"molecules": n, "native_ms": native_ms}
        for dtype in ("float32", "float64"):
            osys = create_oriented_system(model, pos, axes, box, dtype=dtype)
            ms, cctx = _time_steps(osys.system, osys.positions, args.platform, args.steps, 0.005)
            cctx.setPositions(osys.positions)
            cctx.computeVirtualSites()
            st = cctx.getState(getEnergy=True, getForces=True, getPositions=True)
            x = st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            fb, tb = osys.bead_forces_torques(x, st.getForces(asNumpy=True).value_in_unit(
                unit.kilojoule_per_mole / unit.nanometer), box)
            row[f"{dtype}_ms"] = ms
            row[f"{dtype}_dE"] = abs(st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) - e_native) / abs(e_native)
            row[f"{dtype}_dF"] = np.linalg.norm(fb - f_ref) / np.linalg.norm(f_ref)
            row[f"{dtype}_dtau"] = np.linalg.norm(tb - t_ref) / np.linalg.norm(t_ref)
        rows.append(row)
    print(f"# oriented OTP, platform {args.platform}, {args.steps} steps of 5 fs, {_platform.node()}, "
          f"torch {torch.__version__}, OpenMM {openmm.__version__}")
    print("| molecules | native atomistic ms/step | CG float32 ms/step (x native) | CG float64 ms/step (x native) "
          "| dE/E f32 | dF/F f32 | dtau/tau f32 | dE/E f64 | dF/F f64 | dtau/tau f64 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['molecules']} | {r['native_ms']:.3f} | {r['float32_ms']:.3f} ({r['float32_ms'] / r['native_ms']:.1f}x) "
              f"| {r['float64_ms']:.3f} ({r['float64_ms'] / r['native_ms']:.1f}x) | {r['float32_dE']:.1e} "
              f"| {r['float32_dF']:.1e} | {r['float32_dtau']:.1e} | {r['float64_dE']:.1e} | {r['float64_dF']:.1e} "
              f"| {r['float64_dtau']:.1e} |")

    if args.fit:
        _time_fits()


def _time_fits():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from known_answer_oriented import gay_berne_data

    from enpcg.oriented.data import OrientedData
    from enpcg.oriented.fit import fit_oriented

    d = gay_berne_data(n_beads=64, n_frames=40, noise=0.1)
    data = OrientedData(*(np.array(d[k]) for k in ("positions", "axes", "forces", "torques", "box")), d["topology"])
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("| model | device | s/epoch (32 frames, batch 8) |")
    print("|---|---|---|")
    for kind, cfg in (("gay_berne", {k: d["params"][k] for k in ("sigma", "epsilon", "s_par", "s_perp", "e_par",
                                                                    "cutoff", "switch_distance")}),
                      ("oriented_neural", {"cutoff": 1.4, "hidden": 32, "depth": 2, "energy_scale": 5.0})):
        for dev in devices:
            model = create_model(kind, data.topology, **cfg).double()
            fit_oriented(model, data, epochs=1, batch_size=8, length_scale=0.3, device=dev)  # warm-up
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fit_oriented(model, data, epochs=3, batch_size=8, length_scale=0.3, device=dev)
            if dev == "cuda":
                torch.cuda.synchronize()
            print(f"| {kind} | {dev} | {(time.perf_counter() - t) / 3:.3f} |")


if __name__ == "__main__":
    main()
