"""H5MD writer/reader: round trip, frame counter and resume, errors, MDAnalysis compatibility."""
import h5py
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from enpcg.errors import EnpcgError
from enpcg.h5md import COUNTER, FORCE, PARAMETERS, POSITION, H5MDWriter, n_frames, read_h5md

N = 7  # particles


def make_frames(nf, seed=0, n=N):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(nf, n, 3)), rng.normal(scale=100.0, size=(nf, n, 3))


def write(path, nf, *, seed=0, **kw):
    pos, frc = make_frames(nf, seed)
    box = np.diag([3.0, 3.1, 3.2])
    with H5MDWriter(path, N, masses=np.arange(1, N + 1, dtype=float), species=[f"C{i + 1}" for i in range(N)],
                    metadata={"temperature_K": 450.0}, **kw) as w:
        for i in range(nf):
            w.append(pos[i], frc[i], box, 0.02 * (i + 1), 10 * (i + 1), potential_energy=-5.0 * i)
    return pos, frc


def test_round_trip_exact(tmp_path):
    path = tmp_path / "t.h5"
    pos, frc = make_frames(6)
    tri = np.array([[3.0, 0, 0], [0.5, 2.9, 0], [0.2, 0.3, 2.8]])  # triclinic, rows are box vectors
    with H5MDWriter(path, N, masses=np.full(N, 14.027), species=["CH2"] * N, topology_json={"a": [1, 2]},
                    metadata={"k": "v"}, extra_vectors=("torque",)) as w:
        w.append(pos[0], frc[0], tri, 0.0, 0, potential_energy=0.0, torque=2 * frc[0])
        w.flush()
        w.append_many(pos[1:], frc[1:], tri, np.arange(1, 6) * 0.1, np.arange(1, 6) * 50,
                      potential_energy=np.arange(1, 6) * 1.5, torque=2 * frc[1:])
        assert w.n_frames == 6 and w.n_committed == 1
    fr = read_h5md(path)
    # float64 all the way: bit-exact round trip (tolerance 0)
    assert np.array_equal(fr.positions, pos) and np.array_equal(fr.forces, frc)
    assert np.array_equal(fr.box, np.broadcast_to(tri, (6, 3, 3)))
    assert np.array_equal(fr.step, np.arange(6) * 50)
    np.testing.assert_allclose(fr.time, np.arange(6) * 0.1, rtol=0, atol=1e-15)
    np.testing.assert_allclose(fr.potential_energy, np.arange(6) * 1.5, rtol=0, atol=0)
    assert np.array_equal(fr.extra["torque"], 2 * frc)
    assert fr.species == ["CH2"] * N and np.array_equal(fr.masses, np.full(N, 14.027))
    assert fr.topology_json == '{"a": [1, 2]}' and fr.metadata == {"k": "v"}
    with h5py.File(path, "r") as f:  # H5MD 1.1 layout and units
        assert list(f["h5md"].attrs["version"]) == [1, 1]
        assert f["h5md/creator"].attrs["name"] == "enpcg" and "name" in f["h5md/author"].attrs
        assert f[f"{POSITION}/value"].attrs["unit"] == "nm"
        assert f[f"{FORCE}/value"].attrs["unit"] == "kJ mol-1 nm-1"
        assert f[f"{POSITION}/time"].attrs["unit"] == "ps"
        assert f["observables/potential_energy/value"].attrs["unit"] == "kJ mol-1"
        assert f["particles/all/box"].attrs["dimension"] == 3
        assert [b.decode() if isinstance(b, bytes) else b for b in f["particles/all/box"].attrs["boundary"]] \
            == ["periodic"] * 3
        assert f[f"{POSITION}/value"].dtype == np.float64 and f[f"{POSITION}/value"].maxshape[0] is None
        assert f[f"{POSITION}/value"].chunks is not None


def test_frame_selection(tmp_path):
    path = tmp_path / "t.h5"
    pos, frc = write(path, 10)
    assert n_frames(path) == 10
    assert np.array_equal(read_h5md(path, frames=slice(2, 8, 3)).positions, pos[2:8:3])
    assert np.array_equal(read_h5md(path, frames=[9, 0, 0, -1]).forces, frc[[9, 0, 0, -1]])
    assert np.array_equal(read_h5md(path, frames=np.arange(10) % 2 == 0).step, 10 * np.arange(1, 11, 2))
    with pytest.raises(EnpcgError, match="out of range"):
        read_h5md(path, frames=[10])


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(min_value=-12, max_value=11), min_size=0, max_size=15))
def test_frame_selection_any_index_array(tmp_path_factory, idx):
    path = tmp_path_factory.getbasetemp() / "sel.h5"
    if not path.exists():
        write(path, 12)
    pos, _ = make_frames(12)
    assert np.array_equal(read_h5md(path, frames=np.array(idx, dtype=int)).positions, pos[np.array(idx, dtype=int)])


def test_counter_hides_unflushed_and_resume_truncates(tmp_path):
    """A crash after the data but before the counter: readers see the old count; resume cuts and continues."""
    path = tmp_path / "t.h5"
    pos, frc = write(path, 5)
    with h5py.File(path, "r+") as f:  # the data of 3 more frames landed, the counter did not move
        for key in (POSITION, FORCE, "particles/all/box/edges", "observables/potential_energy"):
            for ds in ("value", "step", "time"):
                d = f[f"{key}/{ds}"]
                d.resize(8, axis=0)
                d[5:8] = 999
    assert n_frames(path) == 5
    fr = read_h5md(path)
    assert fr.positions.shape == (5, N, 3) and np.array_equal(fr.positions, pos)
    pos2, frc2 = make_frames(3, seed=1)
    with H5MDWriter(path, N, resume=True) as w:
        assert w.n_frames == 5
        w.append_many(pos2, frc2, np.diag([3.0, 3.1, 3.2]), [0.12, 0.14, 0.16], [60, 70, 80],
                      potential_energy=[1.0, 2.0, 3.0])
    fr = read_h5md(path)
    assert np.array_equal(fr.step, 10 * np.arange(1, 9))  # no gap, no duplicate
    assert np.array_equal(fr.positions, np.concatenate([pos, pos2]))
    with h5py.File(path, "r") as f:
        assert f[f"{POSITION}/value"].shape[0] == 8 and f[PARAMETERS].attrs[COUNTER] == 8


def test_unflushed_frames_lost_on_crash_but_file_readable(tmp_path):
    path = tmp_path / "t.h5"
    pos, frc = make_frames(5)
    w = H5MDWriter(path, N)
    for i in range(3):
        w.append(pos[i], frc[i], np.eye(3) * 3, i, i)
    w.flush()
    for i in range(3, 5):
        w.append(pos[i], frc[i], np.eye(3) * 3, i, i)
    w._file.close()  # the process dies: pending frames never reach the file
    w._closed = True
    assert n_frames(path) == 3
    with H5MDWriter(path, N, resume=True) as w2:
        w2.append_many(pos[3:], frc[3:], np.eye(3) * 3, [3, 4], [3, 4])
    fr = read_h5md(path)
    assert np.array_equal(fr.step, np.arange(5)) and np.array_equal(fr.positions, pos)


def test_resume_of_missing_file_creates_it_and_mismatch_is_refused(tmp_path):
    path = tmp_path / "new.h5"
    with H5MDWriter(path, N, resume=True) as w:
        pos, frc = make_frames(1)
        w.append(pos[0], frc[0], np.eye(3), 0.0, 0)
    assert n_frames(path) == 1
    with pytest.raises(EnpcgError, match="file has 7 particles per frame but the writer was asked for 8"):
        H5MDWriter(path, 8, resume=True)


def test_clear_errors(tmp_path):
    with pytest.raises(EnpcgError, match="file not found"):
        read_h5md(tmp_path / "nope.h5")
    txt = tmp_path / "x.h5"
    txt.write_text("hello")
    with pytest.raises(EnpcgError, match="not an HDF5/H5MD file"):
        read_h5md(txt)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(EnpcgError, match=r"not an H5MD file .*\['data'\]"):
        read_h5md(plain)
    # no forces: the message names the file, the missing group and the fix
    noforce = tmp_path / "noforce.h5"
    pos, _ = make_frames(2)
    with H5MDWriter(noforce, N, with_forces=False) as w:
        w.append_many(pos, None, np.eye(3) * 3, [0, 1], [0, 1])
    with pytest.raises(EnpcgError) as e:
        read_h5md(noforce)
    msg = str(e.value)
    assert str(noforce) in msg and "/particles/all/force is missing: this file has no forces" in msg
    assert "sample with forces (enpcg sample" in msg
    fr = read_h5md(noforce, require_forces=False)
    assert fr.forces is None and np.array_equal(fr.positions, pos)


def test_nan_and_shape_errors(tmp_path):
    path = tmp_path / "t.h5"
    write(path, 4)
    with h5py.File(path, "r+") as f:
        f[f"{FORCE}/value"][2, 5, 1] = np.nan
    with pytest.raises(EnpcgError, match="forces holds NaN or inf at frame 2, particle 5"):
        read_h5md(path)
    # the selection is reported in file numbering
    with pytest.raises(EnpcgError, match="frame 2, particle 5"):
        read_h5md(path, frames=[3, 2])
    assert read_h5md(path, frames=[0, 1, 3]).n_frames == 3  # clean frames still load

    w = H5MDWriter(tmp_path / "w.h5", N)
    pos, frc = make_frames(1)
    bad = pos[0].copy()
    bad[4, 0] = np.inf
    with pytest.raises(EnpcgError, match="positions holds NaN or inf at frame 0, particle 4"):
        w.append(bad, frc[0], np.eye(3), 0.0, 0)
    with pytest.raises(EnpcgError, match=r"positions must be shape \(F, 7, 3\); you supplied \(1, 6, 3\)"):
        w.append(pos[0][:6], frc[0][:6], np.eye(3), 0.0, 0)
    with pytest.raises(EnpcgError, match="forces must be shape"):
        w.append(pos[0], frc[0][:3], np.eye(3), 0.0, 0)
    w.append(pos[0], frc[0], np.eye(3), 0.0, 0, potential_energy=1.0)
    with pytest.raises(EnpcgError, match="potential_energy must be given for every frame or for none"):
        w.append(pos[0], frc[0], np.eye(3), 0.0, 1)
    w.close()

    short = tmp_path / "short.h5"
    write(short, 4)
    with h5py.File(short, "r+") as f:  # force data shorter than the counter: inconsistent file
        f[f"{FORCE}/value"].resize(2, axis=0)
    with pytest.raises(EnpcgError, match=r"force/value has shape \(2, 7, 3\); expected \(4, 7, 3\)"):
        read_h5md(short)


@pytest.mark.filterwarnings("ignore:Element information is missing")
def test_mdanalysis_reads_positions_and_forces(tmp_path):
    mda = pytest.importorskip("MDAnalysis")
    from enpcg.topology import CGTopology

    path = tmp_path / "t.h5"
    pos, frc = write(path, 3)
    pdb = tmp_path / "t.pdb"
    CGTopology(bead_names=[f"C{i + 1}" for i in range(N)], bead_types=["C"] * N, masses=np.ones(N),
               molecule_index=np.zeros(N, int), bonds=[[i, i + 1] for i in range(N - 1)]).write_pdb(
        pdb, pos[0], np.diag([3.0, 3.1, 3.2]))
    u = mda.Universe(str(pdb), str(path), format="H5MD")  # our files end in .h5; name the reader
    assert len(u.trajectory) == 3
    for i, ts in enumerate(u.trajectory):
        # MDAnalysis converts to angstrom and kJ/(mol angstrom); float32 internally -> rtol 1e-6
        np.testing.assert_allclose(ts.positions, pos[i] * 10.0, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(ts.forces, frc[i] / 10.0, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(ts.dimensions[:3], [30.0, 31.0, 32.0], rtol=1e-6)
        assert ts.data["step"] == 10 * (i + 1)
        np.testing.assert_allclose(ts.time, 0.02 * (i + 1), rtol=1e-6)
