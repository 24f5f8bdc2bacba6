"""Structural refinement of a fitted spline model by iterative Boltzmann inversion (IBI).

Force matching (MS-CG) projects the many-body potential of mean force onto pair and bonded tables; with a
finite basis the projection leaves small systematic errors in the distributions it was never asked to
match (in a polyethylene melt: a stiffer chain and an outward-shifted first RDF peak). A few IBI iterations
on top of the MS-CG tables remove them, the classical hybrid of VOTCA-style workflows:

    U_{k+1}(x) = U_k(x) + damping * kT * ln(P_k(x) / P_ref(x))

for each bond, angle and dihedral type (P: the distribution of that coordinate; Jacobians cancel in the
ratio) and each pair type (P: the intermolecular g(r)). Each iteration runs a short CG simulation with the
native tabulated forces. Corrections are smoothed, applied only where both distributions are sampled, held
constant outside that region (no force added where the data say nothing), and for pairs tapered to zero at
the cutoff so the table still ends with zero energy and slope.

Units: nm, rad, kJ/mol, K, ps.
"""
from __future__ import annotations

import copy

import numpy as np

from ..errors import EnpcgError

KB = 0.008314462618  # kJ/mol/K


def _smooth(y, width_bins=1.5):
    if width_bins <= 0:
        return y
    k = np.arange(-4, 5)
    w = np.exp(-0.5 * (k / width_bins) ** 2)
    w /= w.sum()
    pad = np.pad(y, 4, mode="edge")
    return np.convolve(pad, w, mode="valid")


def _correction(x_grid, centres, p_cg, p_ref, kT, damping, min_density, periodic=False):
    """Damped, smoothed kT ln(p_cg / p_ref) on ``x_grid``; constant outside the sampled region."""
    ok = (p_cg > min_density) & (p_ref > min_density)
    if ok.sum() < 3:
        return np.zeros_like(x_grid)
    du = np.zeros_like(centres)
    du[ok] = kT * np.log(p_cg[ok] / p_ref[ok])
    # fill unsampled bins with the nearest sampled value, then smooth
    idx = np.where(ok)[0]
    nearest = idx[np.abs(np.arange(len(centres))[:, None] - idx[None, :]).argmin(axis=1)]
    du = _smooth(du[nearest])
    if periodic:
        return damping * np.interp(x_grid, centres, du, period=2 * np.pi)
    lo, hi = centres[idx[0]], centres[idx[-1]]
    return damping * np.interp(np.clip(x_grid, lo, hi), centres, du)


def _hist(samples, edges):
    h, _ = np.histogram(samples, bins=edges, density=True)
    return h


def _sample_cg(model, positions, box, temperature, sim_ps, timestep, seed, platform, frame_ps=0.2, skip_ps=2.0):
    """Positions (F, n, 3) nm of a short native CG Langevin run started from ``positions``."""
    import openmm
    from openmm import unit

    from openmm_plugin.sampling import best_platform, platform_properties
    from openmm_plugin.system import CGPotential

    pot = CGPotential(model)
    system = pot.create_system(pot.topology, box=box, backend="native")
    integ = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 1.0 / unit.picosecond,
                                           timestep * unit.picoseconds)
    integ.setRandomNumberSeed(int(seed) % 2**31 or 1)
    plat = best_platform(platform)
    ctx = openmm.Context(system, integ, plat, platform_properties(plat))
    ctx.setPeriodicBoxVectors(*[openmm.Vec3(*b) for b in box])
    ctx.setPositions(positions * unit.nanometer)
    ctx.setVelocitiesToTemperature(temperature * unit.kelvin, int(seed) % 2**31 or 1)
    every = max(1, int(round(frame_ps / timestep)))
    integ.step(int(round(skip_ps / timestep)))
    frames = []
    for _ in range(max(1, int(round((sim_ps - skip_ps) / frame_ps)))):
        integ.step(every)
        st = ctx.getState(getPositions=True)
        frames.append(st.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    x = np.array(frames)
    if not np.all(np.isfinite(x)):
        raise EnpcgError("IBI refinement: the CG simulation blew up (NaN positions); use a smaller time step")
    return x


def _distributions(positions, box, topology, cfg):
    """Samples of every bonded coordinate (per type) and the intermolecular g(r) per pair type.

    positions (F, n, 3) nm; box (F, 3, 3) nm, each frame's own box. Pair RDFs span [0, cutoff] in 0.01 nm bins.
    """
    from .. import analysis

    traj = analysis.trajectory_from_arrays(positions, box, topology)
    out = {}
    fams = {"bonds": analysis.bond_lengths, "angles": analysis.bond_angles, "dihedrals": analysis.dihedral_angles}
    for fam, fn in fams.items():
        terms = getattr(topology, fam)
        if len(terms) == 0:
            continue
        values = fn(traj, terms)
        keys = np.array(topology.term_keys(fam))
        for key in cfg[fam]:
            out[(fam, key)] = values[:, keys == key].ravel()
    for key in cfg["pairs"]:
        a, b = key.split("-")
        out[("pairs", key)] = analysis.intermolecular_rdf(traj, topology, a, b, r_range=(0.0, cfg["cutoff"]),
                                                          n_bins=int(round(cfg["cutoff"] / 0.01)))
    return out


def _edges(fam, samples_ref):
    if fam == "dihedrals":
        return np.linspace(-np.pi, np.pi, 73)
    lo, hi = np.percentile(samples_ref, [0.05, 99.95])
    pad = 0.1 * (hi - lo)
    return np.linspace(lo - pad, hi + pad, 61)


def refine_spline(model, ref_positions, ref_box, temperature, *, iterations=3, sim_ps=20.0, timestep=0.01,
                  damping=0.7, seed=0, platform=None, progress=True):
    """IBI refinement of a ``"spline"`` model against reference CG frames.

    model : SplineModel (MS-CG fit); ref_positions : (F, n, 3) nm mapped reference; ref_box : (F, 3, 3) nm;
    temperature : K; iterations : IBI steps, each a CG run of ``sim_ps`` ps at ``timestep`` ps.
    Returns (refined model, history) where history lists, per iteration, the JS divergence (nats) of every
    bonded distribution and the RDF integrated absolute error (nm) before the update.
    """
    from tqdm import tqdm

    from .. import analysis
    from ..models import create_model

    if getattr(model, "kind", None) != "spline":
        raise EnpcgError(f"IBI refinement needs a 'spline' model; received kind {getattr(model, 'kind', None)!r}")
    if ref_box is None:
        raise EnpcgError("IBI refinement needs periodic reference frames (ref_box (F, 3, 3) nm); received None")
    top = model.topology
    kT = KB * temperature
    cfg = copy.deepcopy(model.config)
    box = np.asarray(ref_box[-1], dtype=np.float64)
    ref = _distributions(ref_positions, ref_box, top, cfg)
    history = []
    current = model
    bar = tqdm(range(iterations), desc="IBI refinement", disable=not progress)
    for it in bar:
        x = _sample_cg(current, ref_positions[-1], box, temperature, sim_ps, timestep, seed + 1000 * it, platform)
        cg = _distributions(x, np.broadcast_to(box, (len(x), 3, 3)), top, cfg)
        record = {}
        for (fam, key), ref_val in ref.items():
            table = cfg[fam][key]
            values = np.asarray(table["values"], dtype=np.float64)
            grid = np.linspace(table["min"], table["max"], len(values))
            if fam == "pairs":
                r, g_ref = ref_val
                _, g_cg = cg[(fam, key)]
                record[f"pairs/{key}/iae"] = float(analysis.rdf_iae(r, g_ref, g_cg))
                du = _correction(grid, r, g_cg, g_ref, kT, damping, min_density=0.05)
                rc = cfg["cutoff"]
                taper = np.clip((rc - grid) / 0.3, 0.0, 1.0)
                taper = taper * taper * (3 - 2 * taper)  # smoothstep: zero value and slope at rc
                values = values + du * taper
            else:
                edges = _edges(fam, ref_val)
                centres = 0.5 * (edges[1:] + edges[:-1])
                p_ref, p_cg = _hist(ref_val, edges), _hist(cg[(fam, key)], edges)
                record[f"{fam}/{key}/js"] = float(analysis.js_divergence(ref_val, cg[(fam, key)],
                                                                          periodic=fam == "dihedrals"))
                min_d = 0.01 * p_ref.max()  # ignore the sparsely sampled tails
                du = _correction(grid, centres, p_cg, p_ref, kT, damping, min_density=min_d,
                                 periodic=fam == "dihedrals")
                values = values + du
                if fam == "dihedrals":
                    values[-1] = values[0]
            table["values"] = [float(v) for v in values]
        history.append(record)
        bar.set_postfix({k.split("/")[0][:4]: round(v, 4) for k, v in record.items()})
        current = create_model("spline", top, **cfg).to(next(iter(model.buffers())).dtype)
    return current, history
