"""Atom -> bead mapping: exact centres, periodic unwrapping, force map consistency, file formats, validation.

Units: nm, kJ/mol/nm, amu. Synthetic atomistic data are built with numpy; trajectories go through the real
H5MD writer/reader, PDBs through mdtraj. Tolerances are stated per test (float64 throughout).
"""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from enpcg.errors import EnpcgError
from enpcg.h5md import H5MDWriter, read_h5md
from enpcg.mapping import load_mapping, map_trajectory, minimum_image
from enpcg.topology import CGTopology

ROOT = Path(__file__).resolve().parents[1]
PE_YAML = ROOT / "systems" / "mappings" / "polyethylene_4to1.yaml"
PE_VOTCA = ROOT / "tests" / "data" / "mapping" / "pe_4to1_votca.xml"
N_CHAINS, N_PER = 21, 48
CH3, CH2 = 15.035, 14.027
# Pinned hash of the shipped PE 4:1 mapping with pe_masses(): models store it, so a change of the canonical
# form (or of the shipped file) must be deliberate.
PINNED_PE_HASH = "f0f34a494d836da59b267297897ff248fa3d72ea1d5411c7e5f9c123da7106de"


def pe_masses(n_chains=N_CHAINS):
    return np.array(([CH3] + [CH2] * (N_PER - 2) + [CH3]) * n_chains)


def pe_openmm_topology(n_chains=N_CHAINS):
    from openmm import app

    top = app.Topology()
    carbon = app.Element.getBySymbol("C")
    for _ in range(n_chains):
        res = top.addResidue("PE", top.addChain())
        prev = None
        for k in range(N_PER):
            atom = top.addAtom(f"C{k + 1}", carbon, res)
            if prev is not None:
                top.addBond(prev, atom)
            prev = atom
    return top


def pe_positions(rng, n_frames, box_len, n_chains=N_CHAINS):
    """Random-walk chains (bond 0.153 nm), wrapped into a cubic box so many beads straddle the boundary."""
    steps = rng.normal(size=(n_frames, n_chains, N_PER, 3))
    steps *= 0.153 / np.linalg.norm(steps, axis=-1, keepdims=True)
    starts = rng.uniform(0, box_len, size=(n_frames, n_chains, 1, 3))
    x = starts + np.cumsum(steps, axis=2)
    return (x % box_len).reshape(n_frames, n_chains * N_PER, 3)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def load_quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_mapping(*args, **kwargs)


SMALL = """
exclusion_bonds: 1
molecules:
  - name: AB
    count: 2
    n_atoms: 5
    weights: mass
    beads:
      - {name: A, type: TA, atoms: [0, 1]}
      - {name: B, type: TB, atoms: [2, 3, 4], weights: geometry}
    bonds: [[A, B]]
  - name: W
    n_atoms: 3
    beads:
      - {name: W, type: TW, atoms: [2, 0, 1], weights: [1.0, 3.0, 0.0]}
"""
SMALL_MASSES = np.array([12.0, 1.0, 16.0, 1.0, 1.0, 14.0, 2.0, 16.0, 1.0, 1.0, 5.0, 7.0, 9.0])


# ================================================================================= exact centres
def test_centre_of_mass_and_geometry_exact(tmp_path):
    """Hand-computed centres (tolerance 1e-12 nm) and bead masses = sum of atom masses (exact)."""
    mp = load_mapping(write(tmp_path, "small.yaml", SMALL), masses=SMALL_MASSES)
    assert mp.n_atoms == 13 and mp.n_beads == 5
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(2, 13, 3))
    r = mp.map_positions(x)  # no box: non-periodic
    m = SMALL_MASSES
    for c, off in enumerate((0, 5)):
        com = (m[off] * x[:, off] + m[off + 1] * x[:, off + 1]) / (m[off] + m[off + 1])
        np.testing.assert_allclose(r[:, 2 * c], com, rtol=0, atol=1e-12)
        np.testing.assert_allclose(r[:, 2 * c + 1], x[:, off + 2:off + 5].mean(axis=1), rtol=0, atol=1e-12)
    # explicit weights [1, 3, 0] over atoms [2, 0, 1] of the third molecule (atoms 10..12)
    np.testing.assert_allclose(r[:, 4], (1 * x[:, 12] + 3 * x[:, 10]) / 4, rtol=0, atol=1e-12)
    assert mp.topology.masses.tolist() == [13.0, 18.0, 16.0, 18.0, 21.0]
    assert mp.topology.bonds.tolist() == [[0, 1], [2, 3]]
    assert mp.topology.residue_names == ["AB", "AB", "W"]
    assert mp.topology.molecule_index.tolist() == [0, 0, 1, 1, 2]
    assert mp.topology.exclusion_bonds == 1
    np.testing.assert_allclose(mp.position_matrix.sum(axis=1), 1.0, rtol=0, atol=1e-15)
    # the zero-weight atom still belongs to the bead: its force counts in the bead force
    assert mp.force_matrix[4].tolist() == [0.0] * 10 + [1.0, 1.0, 1.0]


def test_bead_straddling_periodic_boundary(tmp_path):
    """A bead split by the boundary maps to the unwrapped centre (1e-12 nm), cubic and triclinic boxes."""
    mp = load_mapping(write(tmp_path, "pair.yaml", """
molecules:
  - {name: P, n_atoms: 2, weights: geometry, beads: [{name: P, type: P, atoms: [0, 1]}]}
"""), masses=[1.0, 1.0])
    box = np.diag([2.0, 2.0, 2.0])
    x = np.array([[1.95, 1.0, 1.0], [0.05, 1.0, 1.0]])  # 0.1 nm apart across the x boundary
    np.testing.assert_allclose(mp.map_positions(x, box), [[2.0, 1.0, 1.0]], rtol=0, atol=1e-12)
    # without the box the naive average lies in the middle of the box
    np.testing.assert_allclose(mp.map_positions(x), [[1.0, 1.0, 1.0]], rtol=0, atol=1e-12)

    # triclinic, OpenMM reduced form: compact PE beads, every atom shifted by a random lattice vector
    tri = np.array([[3.0, 0.0, 0.0], [0.9, 2.8, 0.0], [-0.7, 0.6, 2.6]])
    pe = load_mapping(PE_YAML, masses=pe_masses())
    rng = np.random.default_rng(2)
    x = pe_positions(rng, 2, 1e3)  # effectively unwrapped
    expected = pe.map_positions(x)
    shifts = rng.integers(-2, 3, size=(2, pe.n_atoms, 3)) @ tri
    got = pe.map_positions(x + shifts, tri)
    first = np.array([a[0] for a in pe.bead_atoms])
    np.testing.assert_allclose(got, expected + shifts[:, first], rtol=0, atol=1e-9)


def test_minimum_image_matches_torch_geometry():
    """numpy minimum image = enpcg.geometry.minimum_image (1e-12 nm) for a triclinic reduced box."""
    torch = pytest.importorskip("torch")
    from enpcg.geometry import minimum_image as torch_mi

    rng = np.random.default_rng(3)
    box = np.array([[[3.0, 0.0, 0.0], [0.9, 2.8, 0.0], [-0.7, 0.6, 2.6]]])
    d = rng.uniform(-6, 6, size=(1, 200, 3))
    ref = torch_mi(torch.tensor(d), torch.tensor(box)).numpy()
    np.testing.assert_allclose(minimum_image(d, box), ref, rtol=0, atol=1e-12)


# ================================================================================= forces
def test_mapped_force_is_sum_and_total_force_conserved():
    """F_I = sum_{i in I} f_i (1e-12 relative) and sum_I F_I = sum_i f_i when every atom is mapped."""
    pe = load_mapping(PE_YAML, masses=pe_masses())
    rng = np.random.default_rng(4)
    f = rng.normal(scale=100.0, size=(3, pe.n_atoms, 3))
    mapped = pe.map_forces(f)
    ref = f.reshape(3, N_CHAINS * 12, 4, 3).sum(axis=2)  # 4 consecutive atoms per bead
    assert np.linalg.norm(mapped - ref) / np.linalg.norm(ref) < 1e-12
    total_err = np.abs(mapped.sum(axis=1) - f.sum(axis=1)).max()
    assert total_err < 1e-9 * np.abs(f).sum()


def test_slow_path_matrices_agree():
    """Vectorised maps = dense matrices R = M x, F = D f (non-periodic), relative 1e-12."""
    pe = load_mapping(PE_YAML, masses=pe_masses())
    rng = np.random.default_rng(5)
    x, f = rng.normal(size=(2, pe.n_atoms, 3)), rng.normal(size=(2, pe.n_atoms, 3))
    r_fast, r_slow = pe.map_positions(x), np.einsum("ba,fak->fbk", pe.position_matrix, x)
    assert np.linalg.norm(r_fast - r_slow) / np.linalg.norm(r_slow) < 1e-12
    f_fast, f_slow = pe.map_forces(f), np.einsum("ba,fak->fbk", pe.force_matrix, f)
    assert np.linalg.norm(f_fast - f_slow) / np.linalg.norm(f_slow) < 1e-12
    # the consistency condition in matrix form: D M^T = identity (non-overlapping beads)
    np.testing.assert_allclose(pe.force_matrix @ pe.position_matrix.T, np.eye(pe.n_beads), rtol=0, atol=1e-14)


@pytest.mark.parametrize("weights", ["mass", "geometry", "explicit"])
def test_force_map_consistency_linear_potential(tmp_path, weights):
    """For U(x) = sum_I g_I . R_I(x), atomic forces by central differences of U through map_positions
    (periodic box, straddling beads) map back to -g_I: ||dF|| / ||g|| < 1e-7."""
    bead_w = "" if weights != "explicit" else ", weights: [0.5, 2.0, 1.0, 0.25]"
    mw = "geometry" if weights == "geometry" else "mass"
    beads = "\n".join(f"      - {{name: B{k}, type: C4, atoms: {list(range(4 * k, 4 * k + 4))}{bead_w}}}"
                       for k in range(12))
    path = write(tmp_path, "pe2.yaml", f"molecules:\n  - name: PE\n    count: 2\n    n_atoms: 48\n"
                                       f"    weights: {mw}\n    beads:\n{beads}\n")
    mp = load_mapping(path, masses=pe_masses(2))
    rng = np.random.default_rng(6)
    box_len = 1.5
    x0 = pe_positions(rng, 1, box_len, n_chains=2)[0]
    g = rng.normal(size=(mp.n_beads, 3))
    h = 1e-4
    n3 = mp.n_atoms * 3
    disp = np.eye(n3).reshape(n3, mp.n_atoms, 3) * h
    u_plus = np.einsum("fbk,bk->f", mp.map_positions(x0 + disp, np.eye(3) * box_len), g)
    u_minus = np.einsum("fbk,bk->f", mp.map_positions(x0 - disp, np.eye(3) * box_len), g)
    f_atoms = (-(u_plus - u_minus) / (2 * h)).reshape(1, mp.n_atoms, 3)
    mapped = mp.map_forces(f_atoms)[0]
    assert np.linalg.norm(mapped + g) / np.linalg.norm(g) < 1e-7


# ================================================================================= formats and identity
def test_pe_yaml_matches_votca_xml(tmp_path):
    """The shipped YAML and the VOTCA XML give identical matrices (1e-15), topology and hash, with the
    atomistic topology given as openmm Topology, mdtraj Topology or PDB path."""
    import mdtraj
    from openmm import app

    masses = pe_masses()
    yml = load_mapping(PE_YAML, masses=masses)
    assert yml.n_beads == 252 and len(yml.topology.bonds) == 21 * 11
    assert len(yml.topology.angles) == 21 * 10 and len(yml.topology.dihedrals) == 21 * 9
    assert set(yml.topology.bead_types) == {"C4"}
    np.testing.assert_allclose(yml.topology.masses[:2], [CH3 + 3 * CH2, 4 * CH2], rtol=1e-15)

    top = pe_openmm_topology()
    pdb = tmp_path / "pe.pdb"
    with open(pdb, "w") as fh:
        app.PDBFile.writeFile(top, np.zeros((top.getNumAtoms(), 3)), fh)
    for atom_top in (top, mdtraj.Topology.from_openmm(top), pdb):
        xml = load_mapping(PE_VOTCA, atom_topology=atom_top, masses=masses)
        np.testing.assert_allclose(xml.position_matrix, yml.position_matrix, rtol=0, atol=1e-15)
        np.testing.assert_array_equal(xml.force_matrix, yml.force_matrix)
        assert xml.topology.to_dict() == yml.topology.to_dict()
        assert xml.hash() == yml.hash()


def test_shipped_mappings_fit_reference_system():
    """The shipped YAML and the VOTCA XML fit systems/polyethylene.py's topology and System masses
    (default 21 x 48 chains): same hash as with pe_masses()."""
    from systems.polyethylene import create_system

    system, top = create_system(N_CHAINS, N_PER, 5.0)
    masses = np.array([system.getParticleMass(i)._value for i in range(system.getNumParticles())])
    np.testing.assert_allclose(masses, pe_masses(), rtol=1e-12)
    yml = load_mapping(PE_YAML, atom_topology=top, masses=masses)
    xml = load_mapping(PE_VOTCA, atom_topology=top, masses=masses)
    assert yml.hash() == xml.hash() == PINNED_PE_HASH


def test_hash_stable_and_sensitive(tmp_path):
    """Same file -> same hash (and the pinned value); any change of atoms, weights, types, bonded terms,
    exclusions or masses changes it."""
    masses = pe_masses()
    base = load_mapping(PE_YAML, masses=masses).hash()
    assert base == load_mapping(PE_YAML, masses=masses.copy()).hash()
    assert len(base) == 64 and base == PINNED_PE_HASH
    text = PE_YAML.read_text()
    variants = {
        "type": text.replace("type: C4", "type: C5"),
        "geometry": text.replace("weights: mass", "weights: geometry"),
        "exclusions": text.replace("exclusion_bonds: 2", "exclusion_bonds: 3"),
        "residue": text.replace("name: PE", "name: PX"),
        "names": text.replace("name_prefix: B", "name_prefix: S"),
    }
    hashes = {k: load_mapping(write(tmp_path, f"{k}.yaml", v), masses=masses).hash() for k, v in variants.items()}
    hashes["masses"] = load_mapping(PE_YAML, masses=masses * 1.01).hash()
    no_dihedrals = text.replace("linear: {", "dihedrals: []\n    linear: {")
    hashes["terms"] = load_mapping(write(tmp_path, "nd.yaml", no_dihedrals), masses=masses).hash()
    assert len(set(hashes.values()) | {base}) == len(hashes) + 1


def test_count_fill_and_named_terms(tmp_path):
    """count: fill takes the remaining atoms; bonded terms may name beads; explicit terms replace generated."""
    path = write(tmp_path, "fill.yaml", """
molecules:
  - name: PE
    count: fill
    n_atoms: 48
    linear: {atoms_per_bead: 4, type: C4}
    angles: [[B1, B2, B3]]
""")
    mp = load_mapping(path, masses=pe_masses(3))
    assert mp.n_beads == 36 and mp.topology.n_molecules == 3
    assert len(mp.topology.bonds) == 33 and mp.topology.angles.tolist() == [[0, 1, 2], [12, 13, 14], [24, 25, 26]]
    assert len(mp.topology.dihedrals) == 27


# ================================================================================= validation
def _expect_error(path, *needles, **kwargs):
    with pytest.raises(EnpcgError) as err:
        load_quiet(path, **kwargs)
    msg = str(err.value)
    assert path.name in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


ONE = "{name: A, type: A, atoms: [0]}"  # a valid one-atom bead
BAD_YAML = {
    "atom_beyond_molecule": ("molecules:\n  - {name: M, n_atoms: 3, beads: [{name: A, type: A, atoms: [0, 3]}]}\n",
                             ["molecules[0].beads[0].atoms", "atom index 3", "n_atoms=3"]),
    "too_many_atoms": ("molecules:\n  - {name: M, count: 5, n_atoms: 3, beads: [{name: A, type: A, atoms: [0]}]}\n",
                       ["molecules[0].count", "has 13 atoms"]),
    "atom_in_two_beads": ("molecules:\n  - {name: M, n_atoms: 3, beads: [{name: A, type: A, atoms: [0, 1]}, "
                          "{name: B, type: A, atoms: [1, 2]}]}\n", ["beads[1]", "atom 1 is already in bead",
                                                                     "beads[0]"]),
    "empty_bead": ("molecules:\n  - {name: M, n_atoms: 3, beads: [{name: A, type: A, atoms: []}]}\n",
                   ["molecules[0].beads[0].atoms", "no atoms"]),
    "unknown_top_key": (f"molecule: []\nmolecules:\n  - {{name: M, n_atoms: 1, beads: [{ONE}]}}\n",
                        ["top level", "unknown key(s) ['molecule']", "allowed keys: ['exclusion_bonds', 'molecules']"]),
    "unknown_molecule_key": (f"molecules:\n  - {{name: M, n_atom: 1, n_atoms: 1, beads: [{ONE}]}}\n",
                             ["molecules[0]", "['n_atom']", "allowed keys", "'linear'"]),
    "unknown_bead_key": ("molecules:\n  - {name: M, n_atoms: 1, beads: [{name: A, type: A, atom: [0]}]}\n",
                         ["molecules[0].beads[0]", "['atom']", "allowed keys: ['name', 'type', 'atoms', 'weights', 'orientation']"]),
    "unknown_linear_key": ("molecules:\n  - {name: M, n_atoms: 4, linear: {atoms_per_bead: 2, type: A, prefix: X}}\n",
                           ["molecules[0].linear", "['prefix']", "'name_prefix'"]),
    "negative_weight": ("molecules:\n  - {name: M, n_atoms: 2, beads: [{name: A, type: A, atoms: [0, 1], "
                        "weights: [1, -1]}]}\n", ["molecules[0].beads[0].weights", ">= 0"]),
    "weights_length": ("molecules:\n  - {name: M, n_atoms: 2, beads: [{name: A, type: A, atoms: [0, 1], "
                       "weights: [1]}]}\n", ["molecules[0].beads[0].weights", "1 weights", "2 atoms"]),
    "weights_zero_sum": ("molecules:\n  - {name: M, n_atoms: 2, beads: [{name: A, type: A, atoms: [0, 1], "
                         "weights: [0, 0]}]}\n", ["molecules[0].beads[0].weights", "positive sum"]),
    "weights_unknown": ("molecules:\n  - {name: M, n_atoms: 2, weights: charge, beads: [{name: A, type: A, "
                        "atoms: [0, 1]}]}\n", ["molecules[0].weights", "'charge'", "mass"]),
    "bond_missing_bead": ("molecules:\n  - {name: M, n_atoms: 2, beads: [{name: A, type: A, atoms: [0]}, "
                          "{name: B, type: A, atoms: [1]}], bonds: [[0, 2]]}\n",
                          ["molecules[0].bonds[0]", "bead 2", "2 beads"]),
    "angle_missing_name": ("molecules:\n  - {name: M, n_atoms: 3, beads: [{name: A, type: A, atoms: [0]}, "
                           "{name: B, type: A, atoms: [1]}, {name: C, type: A, atoms: [2]}], angles: [[A, B, D]]}\n",
                           ["molecules[0].angles[0]", "'D'"]),
    "dihedral_width": ("molecules:\n  - {name: M, n_atoms: 3, beads: [{name: A, type: A, atoms: [0]}, "
                       "{name: B, type: A, atoms: [1]}, {name: C, type: A, atoms: [2]}], dihedrals: [[0, 1, 2]]}\n",
                       ["molecules[0].dihedrals[0]", "needs 4"]),
    "linear_not_divisor": ("molecules:\n  - {name: M, n_atoms: 10, linear: {atoms_per_bead: 4, type: A}}\n",
                           ["molecules[0].linear.atoms_per_bead", "does not divide"]),
    "not_yaml": ("molecules: [\n", ["not valid YAML"]),
}


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_yaml_validation_errors(tmp_path, case):
    """Each bad YAML raises EnpcgError naming the file and the field."""
    text, needles = BAD_YAML[case]
    path = write(tmp_path, f"{case}.yaml", text)
    n_atoms = 13 if case == "too_many_atoms" else _atoms_needed(text)
    _expect_error(path, *needles, masses=np.ones(n_atoms))


def _atoms_needed(text):
    import yaml

    try:
        doc = yaml.safe_load(text)
        return sum(m.get("count", 1) * m.get("n_atoms", m.get("n_atom", 1)) for m in doc["molecules"])
    except Exception:
        return 1


def test_masses_required_and_counts_agree(tmp_path):
    path = write(tmp_path, "m.yaml", "molecules:\n  - {name: M, n_atoms: 2, beads: [{name: A, type: A, "
                                     "atoms: [0, 1]}]}\n")
    _expect_error(path, "masses", "unknown")
    _expect_error(path, "n_atoms", "disagree", n_atoms=3, masses=np.ones(2))


def test_uncovered_atoms_warn(tmp_path):
    """Atoms in no bead are allowed (e.g. dropped solvent) but warned about, with their count."""
    path = write(tmp_path, "solv.yaml", f"molecules:\n  - {{name: M, n_atoms: 2, beads: [{ONE}]}}\n"
                                        "  - {name: SOL, count: 3, n_atoms: 3, beads: []}\n")
    with pytest.warns(UserWarning, match=r"10 of 11 atoms are in no bead"):
        mp = load_mapping(path, masses=np.ones(11))
    assert mp.n_beads == 1 and mp.topology.residue_names == ["M"]
    with pytest.warns(UserWarning, match=r"2 of 3 atoms"):
        load_mapping(write(tmp_path, "tail.yaml", "molecules:\n  - {name: M, n_atoms: 1, beads: [{name: A, "
                                                  "type: A, atoms: [0]}]}\n"), masses=np.ones(3))


def _votca_variant(tmp_path, old, new, name):
    text = PE_VOTCA.read_text()
    assert old in text
    return write(tmp_path, name, text.replace(old, new, 1))


def test_votca_validation_errors(tmp_path):
    """VOTCA XML errors name the file and the element."""
    top, masses = pe_openmm_topology(), pe_masses()
    kw = {"atom_topology": top, "masses": masses}
    _expect_error(_votca_variant(tmp_path, "1:PE:C1 ", "1:PE:CX ", "a.xml"), "cg_bead B1", "'1:PE:CX'",
                  "not in molecule", **kw)
    _expect_error(_votca_variant(tmp_path, "1:PE:C5 ", "1:PE:C4 ", "b.xml"), "cg_bead B2", "atom 3 is already in bead",
                  "cg_bead B1", **kw)
    _expect_error(_votca_variant(tmp_path, "<type>C4</type>", "<type>C4</type><colour>red</colour>", "c.xml"),
                  "cg_beads/cg_bead[0]", "<colour>", "allowed", **kw)
    _expect_error(_votca_variant(tmp_path, "B1 B2 B3 B4", "B1 B2 B3 B13", "d.xml"), "cg_bonded/dihedral", "'B13'", **kw)
    _expect_error(_votca_variant(tmp_path, "<mapping>MID</mapping>", "<mapping>MDI</mapping>", "e.xml"),
                  "cg_bead B2/mapping", "'MDI'", **kw)
    _expect_error(_votca_variant(tmp_path, "15.035 14.027 14.027 14.027", "15.035 14.027 14.027", "f.xml"),
                  "cg_bead B1/beads", "3 weights", **kw)
    _expect_error(_votca_variant(tmp_path, "<ident>PE</ident>", "<ident>PX</ident>", "g.xml"), "ident", "'PE'", **kw)
    _expect_error(_votca_variant(tmp_path, "<weights>15.035 14.027 14.027 14.027",
                                 "<weights>-15.035 14.027 14.027 14.027", "h.xml"), "map END1/weights", ">= 0", **kw)
    _expect_error(PE_VOTCA, "atom_topology", masses=masses)


# ================================================================================= trajectories
def _write_atomistic(path, rng, n_frames=6, box_len=3.2, nan_frame=None, masses=None):
    x = pe_positions(rng, n_frames, box_len)
    f = rng.normal(scale=50.0, size=x.shape)
    if nan_frame is not None:
        f[nan_frame, 7, 1] = np.nan
    box = np.broadcast_to(np.eye(3) * box_len, (n_frames, 3, 3))
    with H5MDWriter(path, x.shape[1], masses=pe_masses() if masses is None else masses,
                    metadata={"temperature": 450.0}) as w:
        # the writer refuses NaN, so a NaN frame is written with finite forces and patched with h5py below
        w.append_many(x, np.nan_to_num(f), box, np.arange(n_frames) * 0.5, np.arange(n_frames) * 250,
                      potential_energy=rng.normal(size=n_frames))
    if nan_frame is not None:
        import h5py

        with h5py.File(path, "r+") as h:
            h["particles/all/force/value"][nan_frame, 7, 1] = np.nan
    return x, f, box


def test_map_trajectory_outputs(tmp_path):
    """CG H5MD equals the in-memory maps (1e-12 relative), carries masses/species/topology/metadata; the
    topology JSON round-trips; mdtraj reads the PDB with every CG bond."""
    import mdtraj

    rng = np.random.default_rng(7)
    src = tmp_path / "aa.h5"
    x, f, box = _write_atomistic(src, rng)
    mp = load_mapping(PE_YAML, masses=pe_masses())
    out = map_trajectory(mp, src, tmp_path / "cg" / "cg.h5", chunk=4, progress=False)
    cg = read_h5md(out)
    ref_x, ref_f = mp.map_positions(x, box), mp.map_forces(f)
    assert np.linalg.norm(cg.positions - ref_x) / np.linalg.norm(ref_x) < 1e-12
    assert np.linalg.norm(cg.forces - ref_f) / np.linalg.norm(ref_f) < 1e-12
    aa = read_h5md(src)
    np.testing.assert_array_equal(cg.box, aa.box)
    np.testing.assert_array_equal(cg.time, aa.time)
    np.testing.assert_array_equal(cg.step, aa.step)
    np.testing.assert_array_equal(cg.potential_energy, aa.potential_energy)
    np.testing.assert_allclose(cg.masses, mp.topology.masses, rtol=1e-15)
    assert cg.species == mp.topology.bead_types
    assert cg.metadata["mapping_hash"] == mp.hash() and cg.metadata["temperature"] == 450.0
    assert CGTopology.from_dict(json.loads(cg.topology_json)).to_dict() == mp.topology.to_dict()

    loaded = CGTopology.load_json(tmp_path / "cg" / "cg_topology.json")
    assert loaded.to_dict() == mp.topology.to_dict()
    traj = mdtraj.load(str(tmp_path / "cg" / "cg.pdb"))
    assert traj.n_atoms == mp.n_beads and traj.topology.n_chains == N_CHAINS
    bonds = sorted(tuple(sorted((b[0].index, b[1].index))) for b in traj.topology.bonds)
    assert bonds == sorted(map(tuple, mp.topology.bonds.tolist()))
    np.testing.assert_allclose(traj.xyz[0], ref_x[0], rtol=0, atol=1e-3)  # PDB keeps 0.001 A
    assert sorted(p.name for p in (tmp_path / "cg").iterdir()) == ["cg.h5", "cg.pdb", "cg_topology.json"]


def test_map_trajectory_rejects_nan_and_leaves_nothing(tmp_path):
    """NaN forces: error naming the frame, and no output (or temporary) file appears."""
    rng = np.random.default_rng(8)
    src = tmp_path / "aa.h5"
    _write_atomistic(src, rng, nan_frame=4)
    mp = load_mapping(PE_YAML, masses=pe_masses())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(EnpcgError, match=r"frame 4"):
        map_trajectory(mp, src, out_dir / "cg.h5", chunk=2, progress=False)
    assert list(out_dir.iterdir()) == []


def test_map_trajectory_atom_count_and_mass_mismatch(tmp_path):
    """A trajectory of another system (atom count, masses) is rejected naming the file; nothing written."""
    rng = np.random.default_rng(9)
    src = tmp_path / "aa.h5"
    _write_atomistic(src, rng, n_frames=2)
    small = write(tmp_path, "small.yaml", "molecules:\n  - {name: PE, count: 2, n_atoms: 48, "
                                          "linear: {atoms_per_bead: 4, type: C4}}\n")
    with pytest.raises(EnpcgError, match=r"aa\.h5.*1008 atoms but mapping .*small\.yaml is for 96"):
        map_trajectory(load_mapping(small, masses=pe_masses(2)), src, tmp_path / "o" / "cg.h5", progress=False)
    carbon = load_mapping(PE_YAML, atom_topology=pe_openmm_topology())  # element masses: 12.011 amu
    with pytest.raises(EnpcgError, match=r"aa\.h5.*masses.*atom 0 has mass 15\.035"):
        map_trajectory(carbon, src, tmp_path / "o" / "cg.h5", progress=False)
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []
