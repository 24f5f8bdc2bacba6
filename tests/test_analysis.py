"""Tests of enpcg.analysis against known answers (small synthetic trajectories)."""
import json
import math

import mdtraj as md
import numpy as np
import pytest

from enpcg.analysis import (
    bond_angles, bond_lengths, compare_structure, dihedral_angles, end_to_end_distance, intermolecular_rdf,
    js_divergence, plot_comparison, radius_of_gyration, rdf_first_peak, rdf_iae, structure_criteria,
    trajectory_from_arrays, write_report,
)
from enpcg.errors import EnpcgError
from enpcg.topology import CGTopology


def chain_topology(n_mol, n_per, types=None, masses=None):
    """n_mol linear chains of n_per beads with bonds, angles and dihedrals along each chain."""
    types = types or ["A"] * n_per
    masses = masses if masses is not None else [14.0] * n_per
    bonds, angles, dihedrals = [], [], []
    for m in range(n_mol):
        o = m * n_per
        bonds += [(o + i, o + i + 1) for i in range(n_per - 1)]
        angles += [(o + i, o + i + 1, o + i + 2) for i in range(n_per - 2)]
        dihedrals += [(o + i, o + i + 1, o + i + 2, o + i + 3) for i in range(n_per - 3)]
    return CGTopology(bead_names=[f"B{i}" for i in range(n_per)] * n_mol, bead_types=list(types) * n_mol,
                      masses=list(masses) * n_mol, molecule_index=np.repeat(np.arange(n_mol), n_per),
                      bonds=bonds, angles=angles, dihedrals=dihedrals)


def cubic(length, n_frames=1):
    return np.broadcast_to(np.eye(3) * length, (n_frames, 3, 3)).copy()


# ------------------------------------------------------------------------------------------ JS divergence
def test_js_identical_samples_zero():
    rng = np.random.default_rng(1)
    x = rng.normal(size=50_000)
    assert js_divergence(x, x) < 1e-12
    # independent draws of one distribution: only the finite-sample bias, ~ (bins - 1) / (4 n) ~ 1e-4
    assert js_divergence(rng.normal(size=200_000), rng.normal(size=200_000)) < 1e-3


def test_js_disjoint_is_ln2():
    rng = np.random.default_rng(2)
    # reference on [0, 1] and [2, 3]; test inside the span but only where the reference has no mass
    ref = np.concatenate([rng.uniform(0, 1, 20_000), rng.uniform(2, 3, 20_000)])
    test = rng.uniform(1.1, 1.9, 20_000)
    assert js_divergence(ref, test) == pytest.approx(math.log(2), abs=1e-12)
    # test entirely outside the reference's span
    assert js_divergence(ref, test + 10.0) == pytest.approx(math.log(2), abs=1e-12)


@pytest.mark.parametrize("periodic", [False, True])
def test_js_small_shift_matches_analytic(periodic):
    """Equal-width Gaussians shifted by delta: JS ~ delta^2 / (8 sigma^2) (to within 10 %)."""
    rng = np.random.default_rng(3)
    sigma = 0.3 if periodic else 1.0
    delta = 0.2 * sigma
    ref = rng.normal(0.0, sigma, 400_000)
    test = rng.normal(delta, sigma, 400_000)
    if periodic:  # centred on the +-pi seam: the wrapped histogram must still see one bump
        ref, test = ref + math.pi, test + math.pi
    js = js_divergence(ref, test, periodic=periodic)
    assert js == pytest.approx(delta ** 2 / (8 * sigma ** 2), rel=0.10)


# ------------------------------------------------------------------------------------------ bonded geometry
def test_bonded_geometry_across_periodic_boundary():
    """Bond 0.2 nm, angle 90 deg, dihedral +60 deg, with beads wrapped by random triclinic lattice vectors."""
    h, phi = 0.2, math.radians(60.0)
    p = np.array([[0.0, h, 0.0], [0.0, 0.0, 0.0], [h, 0.0, 0.0], [h, h * math.cos(phi), h * math.sin(phi)]])
    box = np.array([[2.0, 0.0, 0.0], [0.5, 2.2, 0.0], [-0.4, 0.6, 2.5]])  # reduced triclinic, rows
    rng = np.random.default_rng(4)
    frames = []
    for _ in range(5):
        shifts = rng.integers(-2, 3, size=(4, 3)) @ box
        frames.append(p + np.array([1.95, 0.05, 2.45]) + shifts)  # straddles the box faces
    top = chain_topology(1, 4)
    traj = trajectory_from_arrays(np.array(frames), box, top)
    np.testing.assert_allclose(bond_lengths(traj, top.bonds), h, atol=1e-5)
    np.testing.assert_allclose(bond_angles(traj, top.angles), math.pi / 2, atol=1e-5)
    np.testing.assert_allclose(dihedral_angles(traj, top.dihedrals), phi, atol=1e-5)
    # mirrored: the IUPAC sign flips
    m = p * [1, 1, -1] + [1.0, 1.0, 1.0]
    traj_m = trajectory_from_arrays(m[None], box, top)
    np.testing.assert_allclose(dihedral_angles(traj_m, top.dihedrals), -phi, atol=1e-5)
    assert bond_lengths(traj, np.zeros((0, 2))).shape == (5, 0)


def test_trajectory_from_arrays_and_bad_shape():
    top = chain_topology(3, 4)
    pos = np.random.default_rng(5).uniform(0, 2, (7, 12, 3))
    traj = trajectory_from_arrays(pos, cubic(2.0, 7), top, time=np.arange(7) * 0.5)
    assert traj.n_frames == 7 and traj.n_atoms == 12 and traj.topology.n_bonds == 9
    np.testing.assert_allclose(traj.unitcell_volumes, 8.0, rtol=1e-6)
    np.testing.assert_allclose(traj.time, np.arange(7) * 0.5)
    with pytest.raises(EnpcgError, match=r"positions must be shape \(n_frames, 12, 3\)"):
        trajectory_from_arrays(pos[:, :10], cubic(2.0, 7), top)


# ------------------------------------------------------------------------------------------ RDF
def test_rdf_ideal_gas_is_one():
    rng = np.random.default_rng(6)
    n, frames, length = 400, 200, 3.0
    top = chain_topology(n, 1)
    traj = trajectory_from_arrays(rng.uniform(0, length, (frames, n, 3)), cubic(length, frames), top)
    r, g = intermolecular_rdf(traj, top, "A", "A", r_range=(0.0, 1.5), n_bins=30)
    beyond = r > 0.2
    # counts per bin >= ~6e4 -> relative noise <~ 0.4 %; 5 % is > 10 sigma
    np.testing.assert_allclose(g[beyond], 1.0, atol=0.05)
    with pytest.raises(EnpcgError, match="exceeds half the smallest box width"):
        intermolecular_rdf(traj, top, "A", "A", r_range=(0.0, 1.6))
    # chunking over frames and pairs gives the same RDF as one pass
    short = traj[:20]
    _, g_one = intermolecular_rdf(short, top, "A", "A", r_range=(0.0, 1.5), n_bins=30)
    _, g_chunked = intermolecular_rdf(short, top, "A", "A", r_range=(0.0, 1.5), n_bins=30,
                                      chunk_elements=30_000)
    np.testing.assert_allclose(g_chunked, g_one, rtol=1e-10)


def test_rdf_excludes_intramolecular_pairs():
    """Rigid A-B dimers (0.3 nm) at random positions/orientations: no peak at the bond length."""
    rng = np.random.default_rng(7)
    n_mol, frames, length, bond = 150, 150, 3.0, 0.3
    top = chain_topology(n_mol, 2, types=["A", "B"])
    first = rng.uniform(0, length, (frames, n_mol, 3))
    u = rng.normal(size=(frames, n_mol, 3))
    second = first + bond * u / np.linalg.norm(u, axis=2, keepdims=True)
    pos = np.stack([first, second], axis=2).reshape(frames, 2 * n_mol, 3)
    traj = trajectory_from_arrays(pos, cubic(length, frames), top)
    at_bond = lambda r: np.abs(r - bond) < 0.03  # noqa: E731
    for a, b in (("A", "B"), ("A", "A")):
        r, g = intermolecular_rdf(traj, top, a, b, r_range=(0.0, 1.2), n_bins=40)
        np.testing.assert_allclose(g[at_bond(r)], 1.0, atol=0.1)
    # sanity of the test itself: all A-B pairs (bonded ones included) do show the bond peak
    r, g_all = md.compute_rdf(traj, np.array([(i, j) for i in range(0, 2 * n_mol, 2)
                                              for j in range(1, 2 * n_mol, 2)]), r_range=(0, 1.2), n_bins=40)
    assert g_all[at_bond(r)].max() > 2.0  # ~3.9 here


def test_rdf_first_peak_and_iae():
    r = np.linspace(0.0, 1.5, 301)
    # excluded volume then a Gaussian first shell at 0.5 nm (height 2.5) and a smaller second shell
    g = np.where(r < 0.35, 0.0, 1.0) + 1.5 * np.exp(-((r - 0.5) / 0.04) ** 2) - 0.3 * np.exp(
        -((r - 0.7) / 0.05) ** 2) * (r > 0.35) + 0.3 * np.exp(-((r - 0.95) / 0.06) ** 2)
    g_noisy = g.copy()
    g_noisy[10] = 200.0  # one stray count at tiny r must not be taken for the first shell
    for curve in (g, g_noisy):
        pos, height = rdf_first_peak(r, curve)
        assert pos == pytest.approx(0.5, abs=0.002)
        assert height == pytest.approx(2.5, rel=0.01)
    assert all(math.isnan(v) for v in rdf_first_peak(r, np.full_like(r, 0.9)))
    # IAE of a constant offset c over [0, 1.5] nm is 1.5 c
    assert rdf_iae(r, g, g + 0.1) == pytest.approx(0.15, rel=1e-10)
    with pytest.raises(EnpcgError, match="same r_range"):
        rdf_iae(r, g, g[:-1])


# ------------------------------------------------------------------------------------------ molecules
def test_radius_of_gyration_known_configurations():
    # 12 equal beads on a circle of radius 0.4 nm centred on the box corner: Rg = R
    n, radius, length = 12, 0.4, 2.0
    t = 2 * np.pi * np.arange(n) / n
    ring = np.stack([radius * np.cos(t), radius * np.sin(t), 0.3 * np.ones(n)], axis=1) % length
    top = CGTopology(bead_names=["R"] * n, bead_types=["R"] * n, masses=[10.0] * n,
                     molecule_index=np.zeros(n, int), bonds=[(i, i + 1) for i in range(n - 1)])
    rg = radius_of_gyration(trajectory_from_arrays(ring[None], cubic(length), top), top)
    np.testing.assert_allclose(rg, [[radius]], rtol=1e-5)
    # mass weighting: masses m1, m2 a distance d apart: Rg = d sqrt(m1 m2) / (m1 + m2)
    top2 = CGTopology(bead_names=["X", "Y"], bead_types=["X", "Y"], masses=[12.0, 36.0],
                      molecule_index=[0, 0], bonds=[(0, 1)])
    pos = np.array([[[1.9, 1.0, 1.0], [0.1, 1.0, 1.0]]])  # 0.2 nm apart across the boundary
    rg2 = radius_of_gyration(trajectory_from_arrays(pos, cubic(length), top2), top2)
    np.testing.assert_allclose(rg2, [[0.2 * math.sqrt(12 * 36) / 48]], rtol=1e-5)


def test_end_to_end_of_straight_chain_longer_than_box():
    """10 beads, 0.3 nm apart along a box diagonal: end-to-end 2.7 nm in a 2 nm box, Rg^2 = b^2 (N^2-1)/12."""
    n, b, length = 10, 0.3, 2.0
    direction = np.array([1.0, 1.0, 0.0]) / math.sqrt(2)
    pos = (np.array([0.5, 1.5, 1.0]) + b * np.arange(n)[:, None] * direction) % length
    top = chain_topology(2, n)
    pos2 = np.concatenate([pos, (pos[::-1] + 0.7) % length])[None]  # second chain reversed, shifted
    traj = trajectory_from_arrays(pos2, cubic(length), top)
    np.testing.assert_allclose(end_to_end_distance(traj, top), [[b * (n - 1)] * 2], rtol=1e-5)
    np.testing.assert_allclose(radius_of_gyration(traj, top), [[b * math.sqrt((n * n - 1) / 12)] * 2], rtol=1e-5)


# ------------------------------------------------------------------------------------------ comparison and report
def dimer_melt(seed, bond_mean, n_mol=40, frames=40, length=2.5):
    """Three-bead A-B-A chains with Gaussian bond lengths, random orientations, random placement."""
    rng = np.random.default_rng(seed)
    top = chain_topology(n_mol, 3, types=["A", "B", "A"], masses=[14.0, 28.0, 14.0])
    pos = np.zeros((frames, n_mol, 3, 3))
    pos[:, :, 0] = rng.uniform(0, length, (frames, n_mol, 3))
    for k in (1, 2):
        u = rng.normal(size=(frames, n_mol, 3))
        step = rng.normal(bond_mean, 0.01, (frames, n_mol, 1))
        pos[:, :, k] = pos[:, :, k - 1] + step * u / np.linalg.norm(u, axis=2, keepdims=True)
    return top, trajectory_from_arrays(pos.reshape(frames, 3 * n_mol, 3) % length, cubic(length, frames), top)


def test_compare_structure_self_is_zero_and_shift_detected():
    top, ref = dimer_melt(8, 0.35)
    same = compare_structure(ref, ref, top, rdf_bin_width=0.05)["metrics"]
    assert same["bonds"]["A-B"]["js"] == 0.0 and same["angles"]["A-B-A"]["js"] == 0.0
    assert set(same["rdf"]) == {"A-A", "A-B", "B-B"}
    assert all(v["iae"] == 0.0 for v in same["rdf"].values())
    assert same["rg"]["js"] == 0.0 and same["end_to_end"]["mean_test"] == same["end_to_end"]["mean_reference"]
    _, shifted = dimer_melt(9, 0.40)
    m = compare_structure(ref, shifted, top, rdf_bin_width=0.05)["metrics"]
    assert m["bonds"]["A-B"]["mean_test"] - m["bonds"]["A-B"]["mean_reference"] == pytest.approx(0.05, abs=0.002)
    assert m["bonds"]["A-B"]["js"] > 0.5  # 5 sigma apart: nearly disjoint
    crit = structure_criteria(m)
    assert crit["bonds/A-B/js"] == pytest.approx(max(0.02, 3 * m["bonds"]["A-B"]["self_js"]))
    assert crit["rdf/A-A/peak_position_diff"] == 0.02 and crit["rdf/A-A/peak_height_rel_diff"] == 0.10


def nan_to_none(x):
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    return None if isinstance(x, float) and math.isnan(x) else x


def test_report_writes_files_and_metrics_roundtrip(tmp_path):
    top, ref = dimer_melt(10, 0.35, frames=20)
    _, good = dimer_melt(11, 0.35, frames=20)
    _, priors = dimer_melt(12, 0.42, frames=20)
    results = {"priors only": compare_structure(ref, priors, top, rdf_bin_width=0.05),
               "neural": compare_structure(ref, good, top, rdf_bin_width=0.05)}
    criteria = {"neural": structure_criteria(results["neural"], results["priors only"]),
                "priors only": structure_criteria(results["priors only"])}
    priors_iae = results["priors only"]["metrics"]["rdf"]["A-B"]["iae"]
    assert criteria["neural"]["rdf/A-B/iae"] == pytest.approx(0.5 * priors_iae)
    plots = plot_comparison(list(results.values()), tmp_path, labels=list(results),
                            reference_label="mapped atomistic")
    assert {p.name for p in plots} == {"bonds.png", "angles.png", "rdf.png", "rg_end_to_end.png"}
    for p in plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = write_report(results, plots, tmp_path, "Test report", criteria=criteria)
    text = report.read_text()
    assert report.name == "report.md" and "| neural | A-B |" in text and "![rdf](rdf.png)" in text
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for label, res in results.items():  # exact round trip; nan (no RDF peak) is stored as null
        assert saved["models"][label] == nan_to_none(res["metrics"])
    checks = saved["checks"]
    assert checks["neural"]["bonds/A-B/js"]["pass"] is True  # same generator, other seed
    assert checks["neural"]["bonds/A-B/js"]["value"] == results["neural"]["metrics"]["bonds"]["A-B"]["js"]
    assert checks["priors only"]["bonds/A-B/js"]["pass"] is False  # bonds 7 sigma longer: JS = ln 2
    assert "| priors only | A-B | 0.35" in text and "**FAIL** |\n" in text
    assert sorted(saved["criteria"]) == ["neural", "priors only"]
    assert not list(tmp_path.glob(".*.tmp*"))  # atomic writes leave no temporaries
