"""Sampling with forces: the reporter stores the simulated forces; sampling resumes without gaps or duplicates."""
import os
import time

import numpy as np
import openmm as mm
import pytest
from openmm import app, unit

from enpcg.errors import EnpcgError
from enpcg.h5md import H5MDWriter, n_frames, read_h5md
from openmm_plugin.reporters import H5MDReporter
from openmm_plugin.sampling import best_platform, sample
from systems.polyethylene import build_melt

INTERVAL = 20  # steps between frames


@pytest.fixture(scope="module")
def melt():
    """4 chains x 12 united atoms at 0.76 g/cm^3 (1.14 nm box, so a 0.55 nm cutoff), briefly equilibrated."""
    return build_melt(4, 12, density=0.76, cutoff=0.55, nvt_steps=500, platform="Reference")


def run(melt, path, n, **kw):
    kw = {"interval_steps": INTERVAL, "platform": "Reference", "progress": False, "flush_every": 2,
          "equilibration_steps": 100, **kw}
    return sample(melt.system, melt.topology, melt.positions, path, n_frames=n, **kw)


def rel_err(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_stored_forces_are_the_simulated_forces(melt, tmp_path):
    path = run(melt, tmp_path / "s.h5", 5)
    fr = read_h5md(path)
    assert fr.n_frames == 5 and np.array_equal(fr.step, INTERVAL * np.arange(1, 6))
    ctx = mm.Context(melt.system, mm.VerletIntegrator(0.001), mm.Platform.getPlatformByName("Reference"))
    for i in range(fr.n_frames):
        ctx.setPeriodicBoxVectors(*[mm.Vec3(*b) for b in fr.box[i]])
        ctx.setPositions(fr.positions[i])
        st = ctx.getState(getForces=True, getEnergy=True)
        f_ref = st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        assert rel_err(fr.forces[i], f_ref) < 1e-6  # ||dF||/||F||, Reference platform, float64
        e_ref = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        assert abs(fr.potential_energy[i] - e_ref) < 1e-6 * max(1.0, abs(e_ref))
    assert np.allclose(fr.masses, melt.masses, rtol=0, atol=0)
    assert fr.species[:3] == ["C1", "C2", "C3"] and fr.metadata["interval_steps"] == INTERVAL
    np.testing.assert_allclose(fr.time, 0.002 * fr.step, rtol=1e-12)


def test_reporter_atom_subset_and_plain_simulation(melt, tmp_path):
    """The reporter used as an ordinary OpenMM reporter; a subset stores exactly those atoms' forces."""
    subset = np.arange(0, 48, 3)
    sim = app.Simulation(melt.topology, melt.system, mm.LangevinMiddleIntegrator(450, 1, 0.002),
                         mm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(melt.positions)
    path = tmp_path / "sub.h5"
    rep = H5MDReporter(path, 10, flush_every=3, atomSubset=subset)
    sim.reporters.append(rep)
    sim.step(50)
    rep.close()
    fr = read_h5md(path)
    assert fr.positions.shape == (5, 16, 3) and np.array_equal(fr.step, [10, 20, 30, 40, 50])
    st = sim.context.getState(getPositions=True, getForces=True)
    np.testing.assert_allclose(fr.positions[-1], st.getPositions(asNumpy=True)._value[subset], rtol=0, atol=1e-12)
    assert rel_err(fr.forces[-1], st.getForces(asNumpy=True)._value[subset]) < 1e-12
    assert np.array_equal(fr.masses, melt.masses[subset])


def test_extend_is_bit_identical_to_one_run(melt, tmp_path):
    """Resuming from the checkpoint continues the same trajectory (Reference platform: bitwise)."""
    one = read_h5md(run(melt, tmp_path / "one.h5", 8))
    p = tmp_path / "two.h5"
    run(melt, p, 4)
    assert n_frames(p) == 4
    run(melt, p, 8)
    two = read_h5md(p)
    assert np.array_equal(two.step, INTERVAL * np.arange(1, 9))
    assert np.array_equal(two.positions, one.positions) and np.array_equal(two.forces, one.forces)
    # a complete file returns at once and is left alone
    mtime = os.stat(p).st_mtime_ns
    t0 = time.perf_counter()
    run(melt, p, 8)
    assert time.perf_counter() - t0 < 1.0 and os.stat(p).st_mtime_ns == mtime


def test_frames_newer_than_checkpoint_are_redone(melt, tmp_path):
    """A crash between a flush and its checkpoint leaves extra frames (and unflushed data): they are redone."""
    one = read_h5md(run(melt, tmp_path / "one.h5", 8))
    p = tmp_path / "crash.h5"
    run(melt, p, 4)
    junk = np.full((2, 48, 3), 7.0)
    with H5MDWriter(p, 48, resume=True) as w:  # 2 frames flushed but no checkpoint saved after them
        w.append_many(junk, junk, np.eye(3), [0.2, 0.24], [5 * INTERVAL, 6 * INTERVAL], potential_energy=[0, 0])
    import h5py
    with h5py.File(p, "r+") as f:  # and data of a 7th frame written without its counter update
        for key in ("particles/all/position", "particles/all/force"):
            f[f"{key}/value"].resize(7, axis=0)
    assert n_frames(p) == 6
    run(melt, p, 8)
    fr = read_h5md(p)
    assert np.array_equal(fr.step, INTERVAL * np.arange(1, 9))  # unique, increasing, no gap
    assert np.array_equal(fr.positions, one.positions)  # the junk frames were replaced by the real ones


def test_interrupted_sampling_resumes(melt, tmp_path, monkeypatch):
    """Interrupted (KeyboardInterrupt, as Ctrl-C) right after its second checkpoint, sampling keeps every
    complete frame; the next call completes the file with every step exactly once."""
    from openmm_plugin.sampling import STOP_ENV

    p = tmp_path / "int.h5"
    monkeypatch.setenv(STOP_ENV, "2")
    with pytest.raises(KeyboardInterrupt):
        run(melt, p, 1_000)
    monkeypatch.delenv(STOP_ENV)
    k = n_frames(p)
    assert 2 <= k < 1_000
    run(melt, p, k + 5)
    fr = read_h5md(p)
    assert np.array_equal(fr.step, INTERVAL * np.arange(1, k + 6))
    assert np.all(np.diff(fr.time) > 0)


def test_resume_refuses_other_settings_and_missing_checkpoint(melt, tmp_path):
    p = run(melt, tmp_path / "s.h5", 2)
    with pytest.raises(EnpcgError, match="interval_steps=20, but this run asks for 10"):
        run(melt, p, 4, interval_steps=10)
    os.remove(str(p) + ".chk")
    with pytest.raises(EnpcgError, match="holds 2 frames but the checkpoint .* is missing"):
        run(melt, p, 4)


def test_mdanalysis_reads_sampled_file(melt, tmp_path):
    mda = pytest.importorskip("MDAnalysis")
    p = run(melt, tmp_path / "s.h5", 3)
    pdb = tmp_path / "melt.pdb"
    with open(pdb, "w") as fh:
        app.PDBFile.writeFile(melt.topology, melt.positions * unit.nanometer, fh)
    fr = read_h5md(p)
    u = mda.Universe(str(pdb), str(p), format="H5MD")
    for i, ts in enumerate(u.trajectory):
        np.testing.assert_allclose(ts.positions, fr.positions[i] * 10.0, rtol=1e-6, atol=1e-4)  # angstrom
        assert rel_err(ts.forces, fr.forces[i] / 10.0) < 1e-6  # kJ/(mol angstrom), float32


def test_best_platform_and_bad_name():
    names = [mm.Platform.getPlatform(i).getName() for i in range(mm.Platform.getNumPlatforms())]
    expected = next(n for n in ("CUDA", "HIP", "OpenCL", "CPU", "Reference") if n in names)
    assert best_platform().getName() in (expected, "CPU", "Reference")
    with pytest.raises(EnpcgError, match="'Nope' is not available; available:"):
        best_platform("Nope")


def test_constrained_system_is_refused(melt, tmp_path):
    system = mm.XmlSerializer.deserialize(mm.XmlSerializer.serialize(melt.system))
    system.addConstraint(0, 1, 0.154)
    with pytest.raises(EnpcgError, match="1 constraints; OpenMM's getForces leaves constraint forces out"):
        sample(system, melt.topology, melt.positions, tmp_path / "c.h5", n_frames=1, interval_steps=1,
               platform="Reference", progress=False)
