"""Force errors at the atom, bead and molecule levels (``enpcg.equivariant.validate``), and the trainer's
wall-time cosine schedule. Units: kJ/mol/nm.

Known answers: an error that is equal and opposite on two atoms of one molecule (an intramolecular pair
force) leaves the molecule's total force exact (chain error 0 to 1e-12 relative) and also every bead's
force when both atoms share a bead; a uniform error d on every atom of one molecule of m atoms gives that
molecule a total error m d, so the chain RMSE is sqrt(mean over molecules and components) of it, exactly.
"""
import numpy as np
import pytest

from enpcg.equivariant.validate import force_errors
from enpcg.errors import EnpcgError
from enpcg.mapping import load_mapping
from enpcg.pipeline import DEFAULT_MAPPING

N_ATOMS, CHAIN = 1008, 48  # the bundled melt: 21 chains of 48 united atoms
MASSES = np.tile(np.r_[15.035, np.full(CHAIN - 2, 14.027), 15.035], N_ATOMS // CHAIN)


@pytest.fixture(scope="module")
def mapping():
    return load_mapping(DEFAULT_MAPPING, n_atoms=N_ATOMS, masses=MASSES)


def test_intramolecular_error_leaves_chain_force_exact(mapping):
    rng = np.random.default_rng(0)
    ref = rng.normal(scale=800.0, size=(3, N_ATOMS, 3))
    pred = ref.copy()
    kick = np.array([50.0, -20.0, 10.0])
    pred[:, 0] += kick       # atoms 0 and 1: same chain, same bead (atoms 0-3)
    pred[:, 1] -= kick
    err = force_errors(pred, ref, mapping)
    assert err["chain_intermolecular"]["rmse"] <= 1e-12 * err["chain_intermolecular"]["reference_rms"]
    assert err["bead"]["rmse"] <= 1e-12 * err["bead"]["reference_rms"]
    expected_atom = np.sqrt(2 * 3 * (kick ** 2).sum() / (3 * N_ATOMS * 3))
    assert err["atom"]["rmse"] == pytest.approx(expected_atom, rel=1e-12)
    pred[:, 1] += kick       # now atoms 0 and 4: different beads of one chain
    pred[:, 4] -= kick
    err = force_errors(pred, ref, mapping)
    assert err["chain_intermolecular"]["rmse"] <= 1e-12 * err["chain_intermolecular"]["reference_rms"]
    assert err["bead"]["rmse"] > 0


def test_uniform_error_on_one_chain(mapping):
    rng = np.random.default_rng(1)
    ref = rng.normal(scale=800.0, size=(2, N_ATOMS, 3))
    d = np.array([3.0, -4.0, 12.0])
    pred = ref.copy()
    pred[:, :CHAIN] += d
    err = force_errors(pred, ref, mapping)
    n_chains = N_ATOMS // CHAIN
    expected = np.sqrt(((CHAIN * d) ** 2).sum() / (n_chains * 3))
    assert err["chain_intermolecular"]["rmse"] == pytest.approx(expected, rel=1e-12)
    assert err["chain_intermolecular"]["relative"] == pytest.approx(
        expected / err["chain_intermolecular"]["reference_rms"], rel=1e-12)


def test_force_errors_refuse_mismatched_input(mapping):
    with pytest.raises(EnpcgError, match="must both be"):
        force_errors(np.zeros((1, 10, 3)), np.zeros((1, 11, 3)))
    with pytest.raises(EnpcgError, match="1008 atoms; the forces have 96"):
        force_errors(np.zeros((1, 96, 3)), np.zeros((1, 96, 3)), mapping)


def test_cosine_time_schedule_spends_the_budget(tmp_path):
    """With schedule 'cosine_time' the learning rate falls monotonically from the first epoch and training
    stops on the wall-time budget (1.8 s here) within 0.5 s, validation included; without a budget the
    schedule is refused."""
    import torch

    from enpcg.fitting.trainer import train_force_matching
    from enpcg.models import create_model
    from enpcg.topology import CGTopology

    top = CGTopology(bead_names=["A"] * 8, bead_types=["A"] * 8, masses=np.full(8, 12.0),
                     molecule_index=np.zeros(8, dtype=np.int64))
    rng = np.random.default_rng(2)
    pos = rng.uniform(0, 2.0, size=(16, 8, 3))
    forces = rng.normal(size=(16, 8, 3))
    model = create_model("equivariant", top, cutoff=0.9, l_max=0, n_layers=1, mul=2, avg_neighbors=2.0).double()
    box = np.tile(np.eye(3) * 2.0, (16, 1, 1))
    _, history = train_force_matching(model, pos, forces, box, out_dir=tmp_path, epochs=10_000, batch_size=1,
                                      lr=1e-2, min_lr=1e-5, schedule="cosine_time", max_minutes=0.03,
                                      patience=10_000, progress=False, device="cpu")
    lrs = history["lr"]
    assert history["stopped"] == "max_minutes"
    assert lrs[0] < 1e-2 and all(b <= a for a, b in zip(lrs, lrs[1:]))
    assert 0.03 * 60 - 0.5 <= history["train_seconds"] <= 0.03 * 60 + 0.5  # the budget includes validation
    with pytest.raises(EnpcgError, match="cosine_time"):
        train_force_matching(model, pos, forces, box, out_dir=tmp_path / "x", epochs=1, schedule="cosine_time",
                             progress=False, device="cpu")
    assert torch.get_default_dtype() == torch.float32
