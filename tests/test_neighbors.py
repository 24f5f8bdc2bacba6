"""Pair lists (enpcg.neighbors): every method finds the same pairs and gives models the same forces.

Reference: the dense list (every non-excluded pair, minimum image), exact by construction. vesin's cell list
and the fixed-shape cell list must give the same set of pairs closer than the cutoff with the same vectors
(1e-12 nm), and spline, priors and neural models built on them the same energies (1e-12 relative) and
forces (||dF||/||F|| <= 1e-12, float64), in triclinic boxes, with beads outside the primary cell, for a
batch of frames and after torch.jit.script.
"""
import numpy as np
import pytest
import torch

from enpcg.errors import EnpcgError
from enpcg.models import batch_forces, create_model
from enpcg.neighbors import DENSE_MAX_BEADS, PairList, resolve_method

from known_answer import TRICLINIC_BOX, random_chains
from test_spline import spline_config

RC = 0.9
METHODS = ["vesin", "cells"]


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def chains():
    """Chains in a triclinic box; frames 1 and 2 are moved by whole box vectors and jittered."""
    # 1.5x the test box: at least 3 cells of width >= RC along each axis (the cell list's minimum)
    box = 1.5 * np.asarray(TRICLINIC_BOX, dtype=float)
    top, pos = random_chains(n_chains=60, box=box, seed=5)
    rng = np.random.default_rng(1)
    frames = [pos]
    for k in range(2):
        shift = rng.integers(-2, 3, size=(len(pos), 3)) @ box
        frames.append(pos + shift + rng.normal(scale=0.02, size=pos.shape))
    x = torch.tensor(np.array(frames), dtype=torch.float64)
    b = torch.tensor(np.array([box] * 3), dtype=torch.float64)
    return top, x, b


def spec(method, box):
    return {"method": "cells", "box": box.tolist()} if method == "cells" else method


def close_pairs(pl, x, b):
    frame, i, j, d = pl(x, b)
    r = torch.linalg.norm(d, dim=-1)
    keep = r < RC
    rows = torch.stack([frame[keep], i[keep], j[keep]], dim=1).numpy()
    order = np.lexsort(rows.T[::-1])
    return rows[order], d[keep].numpy()[order]


@pytest.mark.parametrize("method", METHODS)
def test_pair_list_finds_the_dense_pairs(chains, method):
    top, x, b = chains
    ex = top.excluded_pairs()
    ref_rows, ref_d = close_pairs(PairList(top.n_beads, RC, ex, "dense"), x, b)
    rows, d = close_pairs(PairList(top.n_beads, RC, ex, spec(method, b[0].numpy())), x, b)
    assert len(ref_rows) > 1000
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(d, ref_d, atol=1e-12, rtol=0)
    assert np.all(rows[:, 1] < rows[:, 2])
    # excluded pairs never come out as neighbours
    keys = set(map(tuple, np.sort(ex, axis=1).tolist()))
    assert not any((i, j) in keys for i, j in rows[:, 1:].tolist())


def models(top, pair_list):
    return {
        "spline": create_model("spline", top, **{**spline_config(), "pair_list": pair_list}),
        "priors": create_model("priors", top, periodic=True, cutoff=RC, pair_list=pair_list,
                               bonds={"A-B": {"k": 2000.0, "r0": 0.4}},
                               angles={"A-B-A": {"k": 20.0, "theta0": 2.0}, "B-A-B": {"k": 20.0, "theta0": 2.0}},
                               dihedrals={"A-B-A-B": {"k": [1.0, 0.0, 0.5], "delta": [0.0, 0.0, 0.3]}},
                               repulsion={k: {"epsilon": 1.0, "sigma": 0.35} for k in top.pair_type_names()}),
        "neural": create_model("neural", top, cutoff=RC, hidden=8, n_layers=2, seed=3, pair_list=pair_list),
    }


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["spline", "priors", "neural"])
def test_models_give_the_same_forces_with_every_pair_list(chains, method, kind):
    top, x, b = chains
    ref = models(top, "dense")[kind].double()
    other = models(top, spec(method, b[0].numpy()))[kind].double()
    if kind == "neural":
        other.load_state_dict(ref.state_dict())
        # a trained-looking many-body branch (its readout starts at zero)
        with torch.no_grad():
            for m in (ref, other):
                torch.manual_seed(0)
                m.readout2.weight.normal_()
    e0, f0 = batch_forces(ref, x, b)
    e1, f1 = batch_forces(other, x, b)
    assert rel(e1.detach(), e0.detach()) < 1e-12
    assert rel(f1, f0) < 1e-12
    scripted = torch.jit.script(other)
    e2, f2 = batch_forces(scripted, x, b)
    assert rel(e2.detach(), e0.detach()) < 1e-12
    assert rel(f2, f0) < 1e-12


def test_auto_method_and_bad_spec():
    assert resolve_method("auto", 100) == "vesin"
    assert resolve_method("auto", 100, "cuda") == "dense"
    assert resolve_method("auto", DENSE_MAX_BEADS + 1, "cuda") == "vesin"
    with pytest.raises(EnpcgError, match="pair_list"):
        PairList(10, 1.0, np.zeros((0, 2)), "octree")
    with pytest.raises(EnpcgError, match="needs 'box'"):
        PairList(10, 1.0, np.zeros((0, 2)), "cells")


def test_graph_safe_export_gives_the_same_forces(chains):
    """export_forces(cuda_graphs=True) swaps in the fixed-shape cell list (or, in a box too small for 3 cells
    per side, the dense list without compaction); OpenMM forces equal the native export's (Reference,
    float64 model: ||dF||/||F|| <= 1e-9)."""
    import openmm
    from openmm import unit
    from openmm_plugin.export import export_forces, graph_safe_model

    top, x, b = chains
    box = b[0].numpy()
    model = models(top, "auto")["spline"].double()
    assert graph_safe_model(model, box).pair_list.method == "cells"
    small = graph_safe_model(model, box / 2)
    assert small.pair_list.method == "dense" and not small.pair_list.compact
    neural = models(top, "auto")["neural"].double()
    assert graph_safe_model(neural, box).pair_list.method == "cells"

    def forces(fs):
        system = openmm.System()
        for m in top.masses:
            system.addParticle(float(m))
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
        for f in fs:
            system.addForce(f)
        ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        ctx.setPositions(x[0].numpy() * unit.nanometer)
        return ctx.getState(getForces=True).getForces(asNumpy=True).value_in_unit(
            unit.kilojoule_per_mole / unit.nanometer)

    ref = forces(export_forces(model, "native"))
    graph = forces(export_forces(model, "torch", cuda_graphs=True, box=box))
    assert rel(graph, ref) < 1e-9
    # Capacities sized on a configuration (export_forces(positions=...)): no larger than the density-derived
    # ones here, no overflow on that configuration, the same forces.
    derived = graph_safe_model(model, box).pair_list.cells[0]
    sized = graph_safe_model(model, box, x[0].numpy()).pair_list.cells[0]
    assert sized.cell_capacity <= derived.cell_capacity and sized.max_neighbors <= derived.max_neighbors
    need_cell, need_slots = sized.needed(x[0], b[0])
    assert sized.cell_capacity >= need_cell and sized.max_neighbors >= need_slots
    fitted = forces(export_forces(model, "torch", cuda_graphs=True, box=box, positions=x[0].numpy()))
    assert rel(fitted, ref) < 1e-9
    with pytest.raises(EnpcgError, match="positions must be a finite"):
        export_forces(model, "torch", cuda_graphs=True, box=box, positions=x[0].numpy()[:-1])
    with pytest.raises(EnpcgError, match="pass cuda_graphs=True"):
        export_forces(model, "torch", box=box, positions=x[0].numpy())


def test_cell_list_overflow_poisons_the_energy(chains):
    """A cell list whose capacities are too small for the configuration gives a NaN energy (forces stay finite),
    so a run stops at its next report instead of going on with a truncated pair list; with its derived
    capacities the energy is finite."""
    top, x, b = chains
    box = b[0].numpy()
    ok = models(top, {"method": "cells", "box": box.tolist()})["spline"].double()
    assert np.isfinite(float(ok(x[0], b[0])))
    tight = models(top, {"method": "cells", "box": box.tolist(), "max_neighbors": 2})["spline"].double()
    assert np.isnan(float(tight(x[0], b[0])))
    assert tight.pair_list.overflowed()
