"""Glass transition of a bead-spring polymer from NPT quenches at two cooling rates.

    python examples/polymer_glass_transition.py --out out/polymer_tg                # default, about 30 min CPU
    python examples/polymer_glass_transition.py --out /tmp/tg --quick               # tiny settings (the test)

Model: ``systems.bead_spring.create_polymer_glass`` (FENE bonds with bonded WCA, Lennard-Jones 2.5 sigma cut and
shifted between non-bonded pairs), reduced units mapped to OpenMM as sigma = 1 nm, epsilon = 1 kJ/mol,
m = 1 amu, tau = 1 ps, so T* = 1 is 120.27 K and P* = 1 is 16.6054 bar.

Protocol, per quench (``openmm_plugin.protocols``): an independent melt (its own random-walk chains and seed)
equilibrated in NPT at T* = 1.0, P* = 0 with checks (``equilibrate``), then cooled linearly to T* = 0.2 at
P* = 0 (``quench``: Langevin, friction 0.5/tau, dt 0.005 tau, Monte Carlo barostat), the density recorded on
the way. Each rate gets ``--quenches`` independent quenches (default 3). T_g per quench: a continuous
two-line fit of the enthalpy (default; ``--observable density`` for the density) against the set temperature
over 0.25 <= T* <= 0.75 (``enpcg.glass_transition.two_line_fit``); per rate the mean and its standard error
over quenches; then ``compare_rates``: the faster rate must give the higher T_g by more than two combined
standard errors. Both observables' T_g are reported. Quenches checkpoint, so an interrupted run resumes.

Why the enthalpy by default, and a volume move every 5 steps: the Monte Carlo barostat relaxes the volume
slowly. With a move every 25 steps, a 2,000-bead melt cooled at 0.01/tau lagged its equilibrium density by
about 0.06 in T* even in the liquid (measured on an H100, 2026-11-26: the fast-rate density curve lay below
the slow one at every temperature), which moved the density T_g of the fast rate *down* by more than the
physical rate effect. The potential energy follows the temperature without that lag.

Outputs: ``quench_<rate>_<k>.npz`` (records), ``glass_transition.png``, ``summary.json``.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

T_HIGH, T_LOW = 1.0, 0.2  # reduced
PRESSURE = 0.0            # reduced
TIMESTEP = 0.005          # tau = ps
FRICTION = 0.5            # 1/tau
BAROSTAT_FREQUENCY = 5    # steps between Monte Carlo volume moves (see the module docstring)
FIT_WINDOW = (0.25, 0.75)  # reduced T: the two-line fit's range, away from the curved high-T liquid branch


def settings(args):
    if args.quick:
        return {"chains": 20, "length": 10, "rates": [0.05, 0.005], "quenches": [2, 2], "equilibration_steps": 2000,
                "records": 60}
    counts = [int(x) for x in str(args.quenches).split(",")]
    return {"chains": args.chains, "length": args.length, "rates": [args.fast_rate, args.fast_rate / args.rate_ratio],
            "quenches": counts * 2 if len(counts) == 1 else counts, "equilibration_steps": 40000, "records": 200}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/polymer_tg")
    p.add_argument("--fast-rate", type=float, default=1e-2, help="fast cooling rate, reduced (1/tau)")
    p.add_argument("--rate-ratio", type=float, default=10.0, help="fast / slow rate (>= 10)")
    p.add_argument("--quenches", default="3", help="independent quenches per rate (>= 3): one number, or two "
                   "comma-separated (fast,slow)")
    p.add_argument("--chains", type=int, default=40, help="chains per melt")
    p.add_argument("--length", type=int, default=10, help="beads per chain")
    p.add_argument("--only", default=None, metavar="RATE:K",
                   help="run only quench K of cooling rate RATE (reduced) and stop: for parallel runs; a later "
                        "run without --only reuses the saved quenches and fits")
    p.add_argument("--observable", default="enthalpy", choices=["enthalpy", "density"],
                   help="observable of the two-line fit that decides the comparison")
    p.add_argument("--platform", default=None, help="OpenMM platform (default: the fastest)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    s = settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from enpcg.glass_transition import compare_rates, glass_transition, plot_glass_transition
    from openmm_plugin.protocols import ProtocolRecords, equilibrate, quench
    from systems import bead_spring as bs

    kelvin = bs.temperature_kelvin(1.0)  # K per reduced temperature unit
    props = {"Threads": "1"} if (args.platform or "CPU") == "CPU" else None
    t0 = time.perf_counter()
    by_rate, fits = {}, {}
    for rate, n_quenches in zip(s["rates"], s["quenches"]):
        rate_k = rate * kelvin  # K/ps
        records = []
        for k in range(n_quenches):
            if args.only is not None and args.only != f"{rate:g}:{k}":
                continue
            path = out / f"quench_{rate:g}_{k}.npz"
            if path.exists():
                records.append(ProtocolRecords.load(path))
                continue
            seed = 1000 * k + 7
            model = bs.create_polymer_glass(s["chains"], s["length"], seed=seed)
            eq = equilibrate(model.system, model.positions, model.box, temperature=T_HIGH * kelvin,
                             pressure=bs.pressure_bar(PRESSURE), timestep=TIMESTEP, friction=FRICTION,
                             steps=s["equilibration_steps"], seed=seed, barostat_frequency=BAROSTAT_FREQUENCY,
                             platform=args.platform, properties=props, progress=args.progress)
            n_steps = int(np.ceil((T_HIGH - T_LOW) / (rate * TIMESTEP)))
            res = quench(model.system, eq.positions, eq.box, t_start=T_HIGH * kelvin, t_end=T_LOW * kelvin,
                         cooling_rate=rate_k, pressure=bs.pressure_bar(PRESSURE), timestep=TIMESTEP,
                         friction=FRICTION, record_interval=max(1, n_steps // s["records"]),
                         checkpoint=out / f"checkpoint_{rate:g}_{k}.npz", seed=seed + 1, velocities=eq.velocities,
                         barostat_frequency=BAROSTAT_FREQUENCY, platform=args.platform, properties=props,
                         progress=args.progress)
            res.records.save(path)
            records.append(res.records)
            print(f"rate {rate:g}/tau quench {k}: density {res.records.density[0]:.5g} -> "
                  f"{res.records.density[-1]:.5g} g/cm^3", flush=True)
        if args.only is not None:
            continue
        by_rate[rate_k] = records
        window = dict(t_min=FIT_WINDOW[0] * kelvin, t_max=FIT_WINDOW[1] * kelvin)
        fits[rate] = {obs: glass_transition(records, observable=obs, **window) for obs in ("enthalpy", "density")}
        for obs, fit in fits[rate].items():
            print(f"rate {rate:g}/tau, {obs}: T_g = {fit.t_g / kelvin:.4f} +- {fit.t_g_se / kelvin:.4f} (reduced)",
                  flush=True)
    if args.only is not None:
        return None
    fast, slow = s["rates"]
    cmp = {obs: compare_rates(fits[fast][obs], fits[slow][obs]) for obs in ("enthalpy", "density")}
    for obs in ("enthalpy", "density"):
        plot_glass_transition(by_rate, out / f"glass_transition_{obs}.png", observable=obs,
                              t_min=FIT_WINDOW[0] * kelvin, t_max=FIT_WINDOW[1] * kelvin)
    summary = {"settings": {**s, "t_high": T_HIGH, "t_low": T_LOW, "pressure": PRESSURE, "timestep": TIMESTEP,
                            "friction": FRICTION, "barostat_frequency": BAROSTAT_FREQUENCY, "fit_window": FIT_WINDOW,
                            "observable": args.observable,
                            "units": "reduced (sigma = 1 nm, epsilon = 1 kJ/mol, m = 1 amu)"},
               "observables": {obs: {
                   "rates": {f"{rate:g}": {"t_g": fits[rate][obs].t_g / kelvin, "t_g_se": fits[rate][obs].t_g_se / kelvin,
                                           "per_quench": [float(x) / kelvin for x in fits[rate][obs].t_g_values]}
                             for rate in s["rates"]},
                   "difference": cmp[obs].difference / kelvin, "combined_se": cmp[obs].se / kelvin, "z": cmp[obs].z,
                   "faster_is_higher": bool(cmp[obs].faster_is_higher)} for obs in ("enthalpy", "density")},
               "wall_s": time.perf_counter() - t0}
    summary["faster_is_higher"] = summary["observables"][args.observable]["faster_is_higher"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for obs, r in summary["observables"].items():
        print(f"{obs}: T_g(fast) - T_g(slow) = {r['difference']:.4f} +- {r['combined_se']:.4f} (z = {r['z']:.2f}); "
              f"faster rate higher by > 2 SE: {r['faster_is_higher']}")
    return summary


if __name__ == "__main__":
    main()
