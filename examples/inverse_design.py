"""Inverse design with rigid-body motions projected out: reshape a small Lennard-Jones cluster until a
property reaches a target, without moving its centre of mass or turning it.

The cluster: 8 argon atoms (sigma 0.34 nm, epsilon 0.996 kJ/mol, cut at 1.5 nm, shifted), an isotope mixture
(4 x Ar-36, 35.968 amu, and 4 x Ar-40, 39.962 amu: one potential, two masses, so the mass weighting
matters), relaxed to a local minimum. Two designs, each by projected L-BFGS (enpcg.properties.design):

1. one that needs the model: the lowest vibrational frequency omega_min of the cluster (rad/ps; the
   projected Hessian of the LJ energy through autograd, its lowest eigenvalue through torch.linalg.eigvalsh,
   and the gradient of that, a third derivative of the energy) raised by 20 %;
2. a simple one: the mass-weighted radius of gyration (nm) shrunk by 5 %.

Prints each result (initial, final and target values, steps, the largest centre-of-mass shift and the
largest relative linear and angular momentum of any step) and writes the histories as ``design.png``.

    python examples/inverse_design.py [--out out/inverse_design] [--quick]

Units: nm, amu, kJ/mol, rad/ps (1 rad/ps = 5.3088 cm^-1).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

from enpcg.properties import TorchPotential
from enpcg.properties.crystals import lj_energy_fn
from enpcg.properties.design import design, lowest_frequency, plot_design_history, radius_of_gyration
from enpcg.properties.normal_modes import CM_PER_RAD_PS

SIGMA, EPSILON, CUTOFF = 0.34, 0.996, 1.5  # nm, kJ/mol, nm
MASSES = np.array([35.968, 39.962] * 4)  # amu: Ar-36 and Ar-40
FREQUENCY_FACTOR, RG_FACTOR = 1.20, 0.95
# |P - target| accepted: 1e-6 relative (the run reaches ~1e-9; --quick accepts 1e-4 relative)
TOLERANCE, QUICK_TOLERANCE = 1e-6, 1e-4


def relaxed_cluster(seed: int = 0):
    """A local minimum of the 8-atom LJ cluster (E = -18.766 kJ/mol for seed 0; its lowest mode is
    non-degenerate, so omega_min is a smooth function of the positions), positions (8, 3) nm."""
    pot = TorchPotential(lj_energy_fn(SIGMA, EPSILON, CUTOFF), MASSES)
    x0 = np.random.default_rng(seed).normal(scale=0.25, size=(len(MASSES), 3))

    def fun(z):
        e, f = pot.energy_and_forces(z.reshape(-1, 3))
        return e, -f.reshape(-1)

    res = minimize(fun, x0.reshape(-1), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-10, "ftol": 1e-300, "maxiter": 5000})
    return pot, res.x.reshape(-1, 3)


def run(quick: bool = False, out=None) -> dict:
    """Both designs; returns {name: DesignResult} and writes ``out/design.png`` when ``out`` is given."""
    torch.set_num_threads(1)
    pot, x = relaxed_cluster()
    tol = QUICK_TOLERANCE if quick else TOLERANCE
    omega = lowest_frequency(pot, MASSES)
    rg = radius_of_gyration(MASSES)
    w0 = float(omega(torch.tensor(x)).detach())
    r0 = float(rg(torch.tensor(x)).detach())
    results = {
        "omega_min (rad/ps)": design(omega, FREQUENCY_FACTOR * w0, x, MASSES, steps=60, tolerance=tol * w0),
        "R_g (nm)": design(rg, RG_FACTOR * r0, x, MASSES, steps=60, tolerance=tol * r0),
    }
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        plot_design_history({"omega_min / initial": _scaled(results["omega_min (rad/ps)"]),
                             "R_g / initial": _scaled(results["R_g (nm)"])}, Path(out) / "design.png",
                            unit="relative to the initial value")
    return results


def _scaled(r):
    """The history of a DesignResult in units of its initial value (two properties on one axis)."""
    from dataclasses import replace

    h = dict(r.history)
    h["value"] = np.asarray(h["value"]) / r.initial_value
    return replace(r, history=h, target=r.target / r.initial_value, tolerance=r.tolerance / r.initial_value)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/inverse_design", help="output folder for design.png")
    p.add_argument("--quick", action="store_true", help="looser tolerance (1e-4 relative) for a fast check")
    args = p.parse_args(argv)
    results = run(args.quick, args.out)
    for name, r in results.items():
        s = r.summary()
        extra = f" ({r.value * CM_PER_RAD_PS:.3f} cm^-1)" if "omega" in name else ""
        print(f"{name}: {r.initial_value:.6f} -> {r.value:.6f}{extra}, target {r.target:.6f}, "
              f"{'reached' if r.converged else 'NOT reached'} in {r.n_steps} steps (|P - target| "
              f"{abs(r.value - r.target):.2e} <= {r.tolerance:.1e}: {r.converged}); max centre-of-mass shift "
              f"{s['max_com_shift_nm']:.1e} nm, max relative momentum of a step {s['max_relative_momentum']:.1e}, "
              f"angular momentum {s['max_relative_angular_momentum']:.1e}")
    print(f"plot: {Path(args.out) / 'design.png'}")
    if not all(r.converged for r in results.values()):
        raise SystemExit("a design did not reach its target")


if __name__ == "__main__":
    main()
