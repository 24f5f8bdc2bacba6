"""The whole pipeline from Python: sample a polyethylene melt, map it, fit, simulate in OpenMM, compare.

Every stage is a plain function in ``enpcg.pipeline`` (the command line calls the same functions).
Units: nm, ps, kJ/mol, amu, K.

    python examples/pipeline_python.py --out out/example            # the bundled 1,008-site melt
    python examples/pipeline_python.py --out /tmp/ex --small         # a few chains, priors, seconds (tests)
"""
import argparse
from pathlib import Path

from enpcg import pipeline


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/example")
    p.add_argument("--small", action="store_true", help="tiny melt and short runs (for tests)")
    args = p.parse_args(argv)
    out = Path(args.out)

    if args.small:  # 6 chains of 48 sites, packed and equilibrated briefly
        pipeline.run_build(out=out / "melt", n_chains=6, chain_length=48, temperature=450.0,
                           equilibration_ps=4.0, seed=1)
        reference, n_frames, interval, cg_ps = out / "melt", 30, 100, 2.0
        # 30 frames of 6 chains are too few for stable MS-CG splines (angle tables with their minimum at
        # pi, bond wells; the run's health checks stop such a model within 0.1 ps): fit Boltzmann-inverted
        # priors instead, which need only the distributions.
        model = "priors"
    else:
        reference, n_frames, interval, cg_ps = "default", 200, 500, 50.0
        model = "spline"

    pipeline.run_sample(reference=reference, out=out / "atomistic.h5", n_frames=n_frames, interval_steps=interval,
                        equilibration_steps=500, temperature=450.0, timestep=0.002, friction=1.0,
                        platform="auto", seed=0)
    pipeline.run_map(mapping="default", input=out / "atomistic.h5", atom_pdb="", out=out / "cg")
    pipeline.run_fit(data=out / "cg" / "cg.h5", model=model, out=out / "model", temperature=450.0,
                     cutoff=1.0 if args.small else 1.2, prior="", epochs=0, batch_size=8, lr=1e-3, patience=5,
                     device="auto", seed=0, resume=True, refine_iterations=0 if args.small else 4)
    pipeline.run_simulate(model=out / "model", backend="native", pdb=out / "cg" / "cg.pdb", out=out / "sim",
                          time_ps=cg_ps, timestep=0.01, temperature=450.0, friction=1.0, report_ps=0.1,
                          platform="auto", seed=0)
    res = pipeline.run_analyze(reference=out / "cg" / "cg.h5", topology=out / "cg" / "cg_topology.json",
                               trajectories=f"{model}={out / 'sim' / 'trajectory.dcd'}", out=out / "report",
                               skip_ps=0.0)
    print(f"report: {res['report']}")


if __name__ == "__main__":
    main()
