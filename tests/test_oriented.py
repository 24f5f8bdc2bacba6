"""Oriented beads: torques from one invariant energy, mapping of frames and torques, OpenMM representation.

Tolerances: float64 round-off (1e-12 relative) for exact identities; 1e-6 for finite differences of
rotations (central differences, step 1e-5 rad, error O(h^2)).
"""
import numpy as np
import pytest
import torch

from enpcg.models import create_model
from enpcg.oriented import forces_and_torques, random_rotations
from enpcg.oriented.frames import rotation_about
from enpcg.topology import CGTopology

N = 12
BOX = np.eye(3) * 2.2


def _topology(kind, n=N, moments=None):
    return CGTopology([f"M{i}" for i in range(n)], ["A"] * n, [150.0] * n, list(range(n)),
                      orientations=[kind] * n, body_moments={"A": moments} if moments is not None else None)


def _config(n=N, seed=0, spacing=0.7):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n] * spacing
    pos = grid + rng.normal(scale=0.05, size=(n, 3))
    return pos, random_rotations(n, rng)


def _models():
    out = []
    for kind in ("director", "frame"):
        m = create_model("oriented_neural", _topology(kind), cutoff=1.0, hidden=16, seed=3).double()
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(std=0.4)
        out.append((f"neural-{kind}", m))
    out.append(("rigid_sites", create_model("rigid_sites", _topology("frame"),
                                            sites=[[0.12, 0, 0], [-0.1, 0.02, 0], [0, 0.13, 0.03]], sigma=0.3,
                                            epsilon=2.0, cutoff=1.0, switch_distance=0.9).double()))
    return out


MODELS = _models()


@pytest.mark.parametrize("name,model", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("periodic", [True, False])
def test_torque_is_minus_rotational_derivative(name, model, periodic):
    """tau_I = -dE/dtheta_I by central differences of small rotations of one bead: ||dtau||/||tau|| <= 1e-6."""
    pos, axes = _config()
    box = BOX if periodic else None
    _, _, tau = forces_and_torques(model, pos, axes, box)
    h = 1e-5
    fd = np.zeros_like(tau)
    for i in range(N):
        for k in range(3):
            e = []
            for sign in (1, -1):
                a = axes.copy()
                a[i] = rotation_about(np.eye(3)[k], sign * h) @ a[i]
                e.append(forces_and_torques(model, pos, a, box)[0])
            fd[i, k] = -(e[0] - e[1]) / (2 * h)
    if name == "neural-director":  # a uniaxial bead has no torque about its own axis
        assert np.max(np.abs(np.sum(tau * axes[..., 0], -1))) < 1e-12 * np.abs(tau).max()
    assert np.linalg.norm(tau - fd) / np.linalg.norm(tau) < 1e-6


@pytest.mark.parametrize("name,model", MODELS, ids=[m[0] for m in MODELS])
def test_invariance_and_isolated_cluster_balance(name, model):
    """Energy invariant (1e-12 rel) under global rotation + translation; forces and torques rotate with it;
    for an isolated cluster sum F = 0 and sum (R x F + tau) = 0 within round-off."""
    pos, axes = _config(seed=1)
    e, f, t = forces_and_torques(model, pos, axes, None)
    rng = np.random.default_rng(5)
    for rot in random_rotations(3, rng):
        shift = rng.normal(size=3)
        e2, f2, t2 = forces_and_torques(model, pos @ rot.T + shift, rot @ axes, None)
        assert abs(e2 - e) <= 1e-12 * max(1.0, abs(e))
        assert np.linalg.norm(f2 - f @ rot.T) / np.linalg.norm(f) < 1e-12
        assert np.linalg.norm(t2 - t @ rot.T) / np.linalg.norm(t) < 1e-12
    scale = np.abs(f).max()
    assert np.abs(f.sum(0)).max() < 1e-12 * scale * N
    total = np.cross(pos, f).sum(0) + t.sum(0)
    assert np.abs(total).max() < 1e-12 * (np.abs(t).max() + scale * np.abs(pos).max()) * N


def test_models_script_and_round_trip(tmp_path):
    """TorchScript compiles every oriented model kind and save/load keeps the energy (float64 exact)."""
    from enpcg.models import load_model, save_model

    pos, axes = _config()
    for name, model in MODELS:
        e = forces_and_torques(model, pos, axes, BOX)[0]
        s = torch.jit.script(model)
        assert abs(float(s(torch.tensor(pos), torch.tensor(axes), torch.tensor(BOX)).detach()) - e) < 1e-10
        save_model(model, tmp_path / name)
        assert abs(forces_and_torques(load_model(tmp_path / name), pos, axes, BOX)[0] - e) < 1e-10


# ------------------------------------------------------------------------------------------- mapping
MAPPING_YAML = """\
molecules:
  - name: TRI
    count: 4
    n_atoms: 4
    beads:
      - {name: M, type: T, atoms: [0, 1, 2, 3], orientation: {frame: [[0, 1], 2, 3]}}
"""


def _tri_mapping(tmp_path):
    from enpcg.mapping import load_mapping

    p = tmp_path / "tri.yaml"
    p.write_text(MAPPING_YAML)
    return load_mapping(p, n_atoms=16, masses=np.tile([12.0, 14.0, 16.0, 1.0], 4))


def test_mapped_frames_and_torques(tmp_path):
    """Mapped axes are proper rotations that rotate with the molecule; mapped torques equal the direct sum
    sum (r_i - R) x f_i, also across the periodic boundary (1e-12)."""
    m = _tri_mapping(tmp_path)
    assert m.topology.orientations == ["frame"] * 4
    rng = np.random.default_rng(2)
    x = rng.normal(scale=0.15, size=(3, 16, 3)) + np.repeat(rng.uniform(0, 3, size=(3, 4, 3)), 4, axis=1)
    f = rng.normal(size=(3, 16, 3))
    q = m.map_axes(x)
    assert np.allclose(np.linalg.det(q), 1.0, atol=1e-12)
    assert np.allclose(np.einsum("fnji,fnjk->fnik", q, q), np.eye(3), atol=1e-12)
    rot = random_rotations(1, rng)[0]
    assert np.allclose(m.map_axes(x @ rot.T), rot @ q, atol=1e-12)
    r = m.map_positions(x)
    tau = m.map_torques(x, f)
    direct = np.stack([np.cross(x[:, 4 * b:4 * b + 4] - r[:, b:b + 1], f[:, 4 * b:4 * b + 4]).sum(1)
                       for b in range(4)], axis=1)
    assert np.abs(tau - direct).max() < 1e-12 * np.abs(direct).max()
    box = np.eye(3) * 3.0
    shifted = x.copy()
    shifted[:, 1] += box[0]                        # one atom in the next image
    assert np.abs(m.map_torques(shifted, f, box) - tau).max() < 1e-12 * np.abs(tau).max()
    assert np.allclose(m.map_axes(shifted, box), q, atol=1e-12)


def test_orientation_errors_name_the_field(tmp_path):
    """A frame with the wrong number of points or an atom outside the bead is rejected, naming the field."""
    from enpcg.errors import EnpcgError
    from enpcg.mapping import load_mapping

    bad = MAPPING_YAML.replace("frame: [[0, 1], 2, 3]", "frame: [0, 1]")
    p = tmp_path / "bad.yaml"
    p.write_text(bad)
    with pytest.raises(EnpcgError, match=r"orientation\.frame.*needs 3 points"):
        load_mapping(p, n_atoms=16, masses=np.ones(16))
    p.write_text(MAPPING_YAML.replace("atoms: [0, 1, 2, 3]", "atoms: [0, 1, 2]").replace("n_atoms: 4", "n_atoms: 4"))
    with pytest.raises(EnpcgError, match="not an atom of the bead"):
        load_mapping(p, n_atoms=16, masses=np.ones(16))


def test_map_trajectory_writes_torques_and_body_moments(tmp_path):
    """enpcg map of oriented beads writes torque and body axes per frame and the body moments (amu nm^2)."""
    from enpcg.h5md import H5MDWriter
    from enpcg.mapping import map_trajectory
    from enpcg.oriented.data import read_oriented

    m = _tri_mapping(tmp_path)
    rng = np.random.default_rng(3)
    x = rng.normal(scale=0.15, size=(5, 16, 3)) + np.repeat(rng.uniform(0, 3, size=(5, 4, 3)), 4, axis=1)
    f = rng.normal(size=(5, 16, 3))
    with H5MDWriter(tmp_path / "aa.h5", 16, masses=m.atom_masses) as w:
        w.append_many(x, f, np.eye(3) * 3.0, np.arange(5.0), np.arange(5))
    map_trajectory(m, tmp_path / "aa.h5", tmp_path / "cg.h5", progress=False)
    d = read_oriented(tmp_path / "cg.h5")
    assert np.abs(d.torques - m.map_torques(x, f, np.eye(3) * 3.0)).max() < 1e-12
    assert np.abs(d.axes - m.map_axes(x, np.eye(3) * 3.0)).max() < 1e-12
    c = np.asarray(d.topology.body_moments["T"])
    assert np.allclose(c, m.body_second_moments(x, np.eye(3) * 3.0).mean(axis=(0, 1)), rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------- OpenMM
MOMENTS = {"planar": [[0.8, 0.1, 0.0], [0.1, 0.5, 0.0], [0.0, 0.0, 0.0]],
           "general": [[0.8, 0.1, 0.05], [0.1, 0.5, 0.0], [0.05, 0.0, 0.3]],
           "director": [[1.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.1]]}


@pytest.mark.parametrize("layout", ["planar", "general", "director"])
def test_openmm_sites_reproduce_model(layout):
    """TorchForce on rigid massive sites: energy, bead forces and torques equal the model's (float64, 1e-10
    rel); the sites carry the bead's mass and second moment; the virtual centre sits at the bead centre."""
    import openmm

    from openmm_plugin.oriented import create_oriented_system

    kind = "director" if layout == "director" else "frame"
    topo = _topology(kind, n=8, moments=MOMENTS[layout])
    model = create_model("oriented_neural", topo, cutoff=1.0, hidden=16, seed=4).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.4)
    pos, axes = _config(n=8, seed=7)
    box = np.eye(3) * 2.1
    osys = create_oriented_system(model, pos, axes, box)
    lay = osys.layouts["A"]
    assert lay.kind == layout
    c2 = (lay.masses[:, None, None] * lay.sites[:, :, None] * lay.sites[:, None, :]).sum(0)
    if layout == "director":
        assert abs(c2[0, 0] - 0.5 * (np.trace(MOMENTS[layout]) + 1.0)) < 1e-12   # I_perp preserved
    else:
        assert np.allclose(c2, MOMENTS[layout], atol=1e-12)
    assert abs(lay.masses.sum() - 150.0) < 1e-12
    ctx = openmm.Context(osys.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(osys.positions)
    ctx.computeVirtualSites()
    st = ctx.getState(getPositions=True, getForces=True, getEnergy=True)
    x = st.getPositions(asNumpy=True)._value
    f = st.getForces(asNumpy=True)._value
    e, fm, tm = forces_and_torques(model, pos, axes, box)
    if kind == "director":
        u = axes[..., 0]
        tm = tm - np.sum(tm * u, -1, keepdims=True) * u
    fb, tb = osys.bead_forces_torques(x, f, box)
    assert abs(st.getPotentialEnergy()._value - e) < 1e-10 * max(1, abs(e))
    assert np.linalg.norm(fb - fm) / np.linalg.norm(fm) < 1e-10
    assert np.linalg.norm(tb - tm) / np.linalg.norm(tm) < 1e-10
    assert np.abs(x[osys.centre_index] - pos).max() < 1e-12
