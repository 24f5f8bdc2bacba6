"""Analyse any mdtraj-readable CG trajectory against a mapped reference with enpcg.analysis.

    python examples/analyze_trajectory.py --reference out/demo/cg/cg.h5 --topology out/demo/cg/cg_topology.json \
        --trajectory out/demo/sims/neural/trajectory.dcd

Prints bonded Jensen-Shannon divergences (nats) and the intermolecular RDF first peak (nm). Units: nm, ps.
"""
import argparse

import mdtraj as md

from enpcg import analysis
from enpcg.h5md import read_h5md
from enpcg.topology import CGTopology


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="mapped CG H5MD dataset")
    p.add_argument("--topology", required=True, help="cg_topology.json")
    p.add_argument("--trajectory", required=True, help="any mdtraj-readable trajectory of the same beads")
    args = p.parse_args(argv)

    top = CGTopology.load_json(args.topology)
    frames = read_h5md(args.reference, require_forces=False)
    ref = analysis.trajectory_from_arrays(frames.positions, frames.box, top, time=frames.time)
    traj = md.load(args.trajectory, top=ref.topology)

    bonds_ref = analysis.bond_lengths(ref, top.bonds)
    bonds_cg = analysis.bond_lengths(traj, top.bonds)
    print(f"bond length: reference {bonds_ref.mean():.4f} nm, CG {bonds_cg.mean():.4f} nm, "
          f"JS {analysis.js_divergence(bonds_ref.ravel(), bonds_cg.ravel()):.4f} nats")
    angles_ref, angles_cg = analysis.bond_angles(ref, top.angles), analysis.bond_angles(traj, top.angles)
    print(f"angle JS {analysis.js_divergence(angles_ref.ravel(), angles_cg.ravel()):.4f} nats")
    t = top.type_names()[0]
    r_range = (0.0, analysis.max_rdf_range(ref, traj))  # same bins for both, within half the box
    r, g_ref = analysis.intermolecular_rdf(ref, top, t, t, r_range=r_range)
    _, g_cg = analysis.intermolecular_rdf(traj, top, t, t, r_range=r_range)
    print(f"RDF {t}-{t} first peak: reference {analysis.rdf_first_peak(r, g_ref)}, "
          f"CG {analysis.rdf_first_peak(r, g_cg)}; IAE {analysis.rdf_iae(r, g_ref, g_cg):.4f} nm")


if __name__ == "__main__":
    main()
