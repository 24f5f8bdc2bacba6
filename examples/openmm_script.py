"""Use a fitted CG model from a plain OpenMM script, in the manner of openmm-ml's MLPotential.

    python examples/openmm_script.py --model out/demo/models/neural --pdb out/demo/cg/cg.pdb --steps 1000

The model becomes a TorchForce (``backend="torch"``), OpenMM's PythonForce (``"python"``) or native
tabulated forces (``"native"``, priors and spline models). Units: nm, ps, kJ/mol, amu, K.
"""
import argparse
import sys

import torch  # noqa: F401  (torch before openmmtorch; openmm_plugin takes care of it too)
import openmm
from openmm import app, unit

from openmm_plugin import CGPotential
from openmm_plugin.reporters import H5MDReporter


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder (model.json + model.pt)")
    p.add_argument("--pdb", required=True, help="CG structure with box (cg.pdb from `enpcg map`)")
    p.add_argument("--backend", default="torch", choices=["torch", "python", "native"])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--out", default="cg_forces.h5", help="H5MD file of positions and forces")
    args = p.parse_args(argv)

    pdb = app.PDBFile(args.pdb)
    potential = CGPotential(args.model)
    system = potential.create_system(pdb.topology, backend=args.backend)

    integrator = openmm.LangevinMiddleIntegrator(450 * unit.kelvin, 1 / unit.picosecond, 0.01 * unit.picoseconds)
    simulation = app.Simulation(pdb.topology, system, integrator)
    simulation.context.setPositions(pdb.positions)
    simulation.minimizeEnergy(maxIterations=200)
    simulation.reporters.append(app.StateDataReporter(sys.stdout, max(1, args.steps // 5), step=True,
                                                      potentialEnergy=True, temperature=True))
    simulation.reporters.append(H5MDReporter(args.out, max(1, args.steps // 10)))
    simulation.step(args.steps)
    for r in simulation.reporters:
        if hasattr(r, "close"):
            r.close()
    print(f"platform {simulation.context.getPlatform().getName()}; frames with forces in {args.out}")


if __name__ == "__main__":
    main()
