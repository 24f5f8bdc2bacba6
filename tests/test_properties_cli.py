"""`enpcg properties` end to end: small CG models (priors) and an OpenMM System written to disk, run through the
command line; checks on properties.json against known answers, and on the plots.

Units: nm, amu, kJ/mol; omega rad/ps; elastic constants kJ/mol/nm^3. Tolerances, stated again in each test:
equivariance leakage <= 1e-10 (the CLI's audit tolerance; float64 round-off is ~1e-14); autograd frequencies of
the nearest-neighbour fcc crystal 1e-8 relative to the analytic ones, OpenMM finite differences 1e-5; bulk
modulus 1e-8 (analytic route) and 1e-4 (finite-difference stress-strain, strain 1e-3).
"""
import json

import numpy as np
import torch

import openmm

from enpcg.cli import main
from enpcg.models import create_model, save_model
from enpcg.properties.crystals import fcc_lattice, openmm_lj_system
from enpcg.topology import CGTopology

from known_answer import TRICLINIC_BOX, random_chains

torch.set_num_threads(1)
PNG = b"\x89PNG\r\n\x1a\n"
LEAK = 1e-10


def run_cli(*argv):
    return main(["properties", *[str(a) for a in argv]])


def chain_priors(periodic):
    """Harmonic bonds and angles, achiral periodic dihedrals, r^-12 repulsion (A/B chains)."""
    return dict(periodic=periodic, cutoff=0.9, bonds={"A-B": {"k": 3000.0, "r0": 0.41}},
                angles={"A-B-A": {"k": 40.0, "theta0": 2.0}, "B-A-B": {"k": 25.0, "theta0": 1.9}},
                dihedrals={"A-B-A-B": {"k": [1.0, 0.5, 0.2], "delta": [0.0, np.pi, 0.0]}},
                repulsion={"A-A": {"epsilon": 2.0, "sigma": 0.36}, "A-B": {"epsilon": 1.0, "sigma": 0.4},
                           "B-B": {"epsilon": 3.0, "sigma": 0.33}})


def worst_leak(eq):
    return max(eq[k] for k in ("so3_force_leakage", "so3_energy_leakage", "o3_force_leakage", "o3_energy_leakage",
                               "translation_leakage"))


def test_cg_chain_modes_and_equivariance(tmp_path):
    """One 8-bead CG chain under a non-periodic priors model (its config says periodic: false, so the CLI's
    'auto' treats it as an isolated molecule), minimised to an RMS force of 1e-8 kJ/mol/nm: properties.json holds
    24 modes, 6 rigid-body ones (residual |omega| <= 1e-3 rad/ps), no imaginary or zero internal mode, and an
    equivariance audit (genuine random rotations and reflections) with every leakage <= 1e-10; modes.png and
    equivariance.png are PNGs; the resolved config is written. A periodic model of three chains in a triclinic
    cell (reduce mode: inversion its only lattice operation) also audits <= 1e-10."""
    top, pos = random_chains(n_chains=1, types=("A", "B") * 4, box=None, seed=2)
    save_model(create_model("priors", top, **chain_priors(False)), tmp_path / "chain")
    top.write_pdb(tmp_path / "chain.pdb", pos, np.diag([3.0, 3.0, 3.0]))
    out = tmp_path / "props"
    assert run_cli("--model", tmp_path / "chain", "--pdb", tmp_path / "chain.pdb", "--out", out, "--minimize", "true",
                   "--force-tolerance", 1e-8) == 0
    res = json.loads((out / "properties.json").read_text())
    assert res["periodic"] is False and res["n_particles"] == 8 and res["potential"]["kind"] == "priors"
    modes = res["modes"]
    assert modes["n_modes"] == 24 and modes["n_rigid"] == 6 and sum(modes["rigid_body"]) == 6
    assert modes["rigid_body_max_abs_omega"] <= 1e-3
    assert modes["n_imaginary_internal"] == 0 and modes["n_zero_internal"] == 0
    assert modes["lowest_internal_omega"] > 0 and len(modes["omega_rad_ps"]) == 24
    assert res["minimization"]["rms_force_kj_mol_nm"] <= 1e-8
    eq = res["equivariance"]
    assert worst_leak(eq) <= LEAK and eq["so3_ok"] and eq["o3_ok"] and eq["n_improper"] == 4
    for name in ("modes.png", "equivariance.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert (out / "properties.yaml").exists()

    top3, pos3 = random_chains(n_chains=3, seed=1)
    save_model(create_model("priors", top3, **chain_priors(True)), tmp_path / "melt")
    top3.write_pdb(tmp_path / "melt.pdb", pos3, TRICLINIC_BOX)
    assert run_cli("--model", tmp_path / "melt", "--pdb", tmp_path / "melt.pdb", "--out", tmp_path / "p3",
                   "--what", "equivariance", "--n-rotations", 2) == 0
    eq = json.loads((tmp_path / "p3" / "properties.json").read_text())["equivariance"]
    assert eq["periodic"] and eq["box_mode"] == "reduce" and eq["n_lattice_ops"] == 1 and worst_leak(eq) <= LEAK


def nn_fcc_answers(phi1, phi2, r0, mass):
    """Nearest-neighbour central-force fcc with pair potential phi (phi1 = phi'(r0), phi2 = phi''(r0)):
    at X, omega_L^2 = 8 (A + B) / m and omega_T^2 = (4 A + 12 B) / m with A = phi'', B = phi'/r0 (rad/ps); bulk
    modulus K = -V dP/dV = (2 sqrt 2 / 3)(phi''/r0 - 2 phi'/r0^2) (kJ/mol/nm^3)."""
    a, b = phi2, phi1 / r0
    return (np.sqrt(8 * (a + b) / mass), np.sqrt((4 * a + 12 * b) / mass),
            2 * np.sqrt(2) / 3 * (phi2 / r0 - 2 * phi1 / r0 ** 2))


def crystal_pdb(path, a, n):
    pos, box = fcc_lattice(a, n)
    k = len(pos)
    top = CGTopology([f"A{i}" for i in range(k)], ["A"] * k, np.full(k, 40.0), np.arange(k))
    top.write_pdb(path, pos, box)
    return top, pos, box


def check_gamma(res, w_l, w_t, tol):
    """The conventional 4-atom cell's Gamma point holds the 3 acoustic zeros and the primitive X points folded
    onto it: 6 transverse and 3 longitudinal branches."""
    g = np.sort(res["phonons"]["gamma_omega_rad_ps"])
    assert np.all(np.abs(g[:3]) <= 1e-5)
    assert np.allclose(g[3:9], w_t, rtol=tol, atol=0) and np.allclose(g[9:], w_l, rtol=tol, atol=0)


def test_repulsive_cg_crystal_phonons_and_elastic_known_answers(tmp_path):
    """A CG fcc crystal (a = 0.5 nm, 2 x 2 x 2 conventional cells, 32 beads of 40 amu) under a priors model with
    only the r^-12 repulsion (eps 1 kJ/mol, sigma 0.35 nm, cut at 0.45 nm: nearest neighbours only):
    the phonon Gamma frequencies equal the analytic X-point omega_L = 14.286 and omega_T = 9.222 rad/ps to 1e-8,
    the Hill bulk modulus the analytic -V dP/dV to 1e-8, the elastic tensor is cubic (C11 = C22 = C33 to 1e-10
    relative); the normal modes of the 32-bead cell have no imaginary mode; dispersion.png and elastic.png are
    written."""
    top, pos, box = crystal_pdb(tmp_path / "fcc.pdb", 0.5, 2)
    save_model(create_model("priors", top, periodic=True, cutoff=0.45,
                            repulsion={"A-A": {"epsilon": 1.0, "sigma": 0.35}}), tmp_path / "model")
    out = tmp_path / "props"
    assert run_cli("--model", tmp_path / "model", "--pdb", tmp_path / "fcc.pdb", "--out", out, "--what",
                   "modes,phonons,elastic", "--supercell", "2,2,2", "--minimize", "true", "--force-tolerance",
                   1e-8) == 0
    res = json.loads((out / "properties.json").read_text())
    r0, eps, sig = 0.5 / np.sqrt(2), 1.0, 0.35
    phi1 = -12 * eps * sig ** 12 / r0 ** 13
    phi2 = 156 * eps * sig ** 12 / r0 ** 14
    w_l, w_t, k_bulk = nn_fcc_answers(phi1, phi2, r0, 40.0)
    check_gamma(res, w_l, w_t, 1e-8)
    assert res["phonons"]["unit_cell_particles"] == 4 and res["phonons"]["asr_violation"] <= 1e-10
    el = res["elastic"]
    assert abs(el["moduli_kj_mol_nm3"]["K_H"] - k_bulk) <= 1e-8 * k_bulk
    c = np.array(el["voigt_kj_mol_nm3"])
    assert np.ptp(np.diag(c)[:3]) <= 1e-10 * c[0, 0] and np.allclose(np.array(el["voigt_gpa"]), c * 1.66054e-3)
    assert res["modes"]["n_imaginary_internal"] == 0 and res["modes"]["n_rigid"] == 3
    for name in ("dispersion.png", "elastic.png", "modes.png"):
        assert (out / name).read_bytes()[:8] == PNG


def test_openmm_system_route_matches_the_lj_crystal(tmp_path):
    """The same crystal as an OpenMM System (--system: Lennard-Jones sigma 0.3 nm, eps 1 kJ/mol, cut at 0.45 nm,
    CustomNonbondedForce, Reference platform, finite-difference Hessian rows and stress-strain elastic constants):
    Gamma frequencies equal the analytic nearest-neighbour ones to 1e-5 and the bulk modulus to 1e-4."""
    top, pos, box = crystal_pdb(tmp_path / "fcc.pdb", 0.5, 2)
    sigma, eps = 0.3, 1.0
    system = openmm_lj_system(len(pos), box, sigma, eps, 0.45, 40.0)
    (tmp_path / "system.xml").write_text(openmm.XmlSerializer.serialize(system))
    out = tmp_path / "props"
    assert run_cli("--system", tmp_path / "system.xml", "--pdb", tmp_path / "fcc.pdb", "--out", out, "--what",
                   "phonons,elastic", "--supercell", "2,2,2") == 0
    res = json.loads((out / "properties.json").read_text())
    assert res["potential"]["kind"] == "openmm" and res["periodic"]
    r0 = 0.5 / np.sqrt(2)
    phi1 = 4 * eps * (-12 * sigma ** 12 / r0 ** 13 + 6 * sigma ** 6 / r0 ** 7)
    phi2 = 4 * eps * (156 * sigma ** 12 / r0 ** 14 - 42 * sigma ** 6 / r0 ** 8)
    w_l, w_t, k_bulk = nn_fcc_answers(phi1, phi2, r0, 40.0)
    check_gamma(res, w_l, w_t, 1e-5)
    assert res["elastic"]["method"] == "finite-difference"
    assert abs(res["elastic"]["moduli_kj_mol_nm3"]["K_H"] - k_bulk) <= 1e-4 * k_bulk


def test_bad_input_exits_with_a_clear_message(tmp_path, capsys):
    """Exit status 2 and a message naming the field and the fix: unknown property, phonons without a
    supercell, a structure of another size, a folder without model.json, a structure that is not the stated
    supercell, a malformed k path."""
    top, pos, box = crystal_pdb(tmp_path / "fcc.pdb", 0.5, 2)
    save_model(create_model("priors", top, periodic=True, cutoff=0.45,
                            repulsion={"A-A": {"epsilon": 1.0, "sigma": 0.35}}), tmp_path / "model")
    small = CGTopology(["A0", "A1"], ["A", "A"], np.full(2, 40.0), np.arange(2))
    small.write_pdb(tmp_path / "two.pdb", np.array([[0.0, 0.0, 0.0], [0.4, 0.0, 0.0]]), box)
    base = ["--model", tmp_path / "model", "--pdb", tmp_path / "fcc.pdb", "--out", tmp_path / "o"]
    cases = [(["--what", "modes,entropy"], "unknown or no properties"),
             (["--what", "phonons"], "phonons need --supercell"),
             (["--what", "phonons", "--supercell", "3,3,3"], "not a whole number of 27 cells"),
             (["--what", "phonons", "--supercell", "2,2,2", "--k-path", "G:0,0;X:0.5,0,0"], "LABEL:q1,q2,q3"),
             (["--what", "phonons", "--supercell", "1,2,4"], "not 8 copies")]
    for extra, pattern in cases:
        assert run_cli(*base, *extra) == 2
        assert pattern in capsys.readouterr().err, pattern
    assert run_cli("--model", tmp_path / "model", "--pdb", tmp_path / "two.pdb", "--out", tmp_path / "o") == 2
    assert "2 particles but the priors potential has 32" in capsys.readouterr().err
    assert run_cli("--model", tmp_path, "--pdb", tmp_path / "fcc.pdb", "--out", tmp_path / "o") == 2
    assert "no model.json" in capsys.readouterr().err
