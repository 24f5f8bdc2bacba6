"""Training of the equivariant atomistic potential on atomistic H5MD data (energies and forces).

Units: positions and box in nm, energies in kJ/mol, forces in kJ/mol/nm, masses in amu.

:func:`train_equivariant` first sets the per-species energy shifts (buffer ``species_energy``) by least
squares of the frame energies on the species counts, then fits the network to energies and forces with the
minibatch trainer of :mod:`enpcg.fitting.trainer` (validation split, ReduceLROnPlateau, early stopping,
checkpoints and resume, ``history.json``, ``training_curve.png``), and writes per-species validation force
errors to ``metrics.json``.

Species rule (:func:`site_names`): an atom whose H5MD mass equals a united-atom polyethylene site mass
within 0.01 amu (CH3 15.035, CH2 14.027) is that site; any other atom keeps its H5MD species name, or is
named ``M<mass>`` (mass in amu, 3 decimals) when the file stores no species. The H5MD species of
``enpcg sample`` are atom names (C1, C2, ...), which do not say the site, hence masses first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import EnpcgError
from ..fileio import write_json
from ..fitting.trainer import _split, train_force_matching
from ..topology import CGTopology

METRICS = "metrics.json"
SITE_MASSES = {"CH3": 15.035, "CH2": 14.027}  # amu, TraPPE-UA sites (systems.polyethylene.SITES)
MASS_TOLERANCE = 0.01  # amu


def site_names(masses, species=None) -> list:
    """United-atom site name of each atom (n,) from masses (n,) amu and H5MD species (n,) or None.

    See the module docstring for the rule.
    """
    masses = np.asarray(masses, dtype=np.float64).reshape(-1)
    names = []
    for k, m in enumerate(masses):
        match = [s for s, ms in SITE_MASSES.items() if abs(m - ms) <= MASS_TOLERANCE]
        if match:
            names.append(match[0])
        elif species is not None:
            names.append(str(species[k]))
        else:
            names.append(f"M{m:.3f}")
    return names


def atomistic_topology(masses, species=None) -> CGTopology:
    """Topology of an atomistic system for the equivariant model: one bead per atom, types from
    :func:`site_names`, masses (n,) amu; no bonds (the model sees only distances)."""
    names = site_names(masses, species)
    n = len(names)
    return CGTopology(bead_names=names, bead_types=names, masses=np.asarray(masses, dtype=np.float64),
                      molecule_index=np.zeros(n, dtype=np.int64), residue_names=["UA"])


def species_energy_shifts(energies, counts) -> np.ndarray:
    """Least-squares per-species energies (S,) kJ/mol: energies (F,) kJ/mol ~ counts (F, S) @ shifts.

    When every frame has the same composition the split between species is not determined; the
    minimum-norm solution is returned (its sum over atoms still equals the mean frame energy).
    """
    e = np.asarray(energies, dtype=np.float64).reshape(-1)
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != e.shape[0]:
        raise EnpcgError(f"species_energy_shifts: counts must be shape ({e.shape[0]}, n_species); you supplied "
                         f"{c.shape}")
    shifts, *_ = np.linalg.lstsq(c, e, rcond=None)
    return shifts


def mean_neighbors(positions, box, cutoff: float) -> float:
    """Mean number of neighbours within ``cutoff`` nm of an atom in one frame: positions (n, 3) nm, box
    (3, 3) nm (reduced form, rows) or None."""
    x = np.asarray(positions, dtype=np.float64)
    d = x[None, :, :] - x[:, None, :]
    if box is not None:
        b = np.asarray(box, dtype=np.float64)
        for k in (2, 1, 0):
            d = d - np.round(d[..., k:k + 1] / b[k, k]) * b[k]
    r2 = (d * d).sum(-1)
    n = x.shape[0]
    return float(max(1.0, ((r2 < cutoff * cutoff).sum() - n) / n))


def force_metrics(model, positions, forces, box, frames, batch_size: int = 4) -> dict:
    """Force errors of ``model`` on ``frames`` (indices): RMSE and MAE over Cartesian components, in
    kJ/mol/nm, overall and per species (``topology.type_names()``), with the reference force RMS."""
    from .validate import model_forces

    idx = np.asarray(frames)
    ref = np.asarray(forces)[idx].astype(np.float64)
    err = model_forces(model, np.asarray(positions)[idx], None if box is None else np.asarray(box)[idx],
                       batch_size=batch_size) - ref
    types = np.asarray(model.topology.type_index())
    per = {}
    for t, name in enumerate(model.topology.type_names()):
        sel = types == t
        if sel.any():
            e, r = err[:, sel], ref[:, sel]
            per[name] = {"force_rmse": float(np.sqrt((e ** 2).mean())), "force_mae": float(np.abs(e).mean()),
                         "reference_force_rms": float(np.sqrt((r ** 2).mean()))}
    return {"units": "kJ/mol/nm (per Cartesian component)", "n_frames": int(len(idx)),
            "force_rmse": float(np.sqrt((err ** 2).mean())), "force_mae": float(np.abs(err).mean()),
            "reference_force_rms": float(np.sqrt((ref ** 2).mean())), "per_species": per}


def train_equivariant(model, positions, forces, energies, box, species_index, *, energy_weight: float = 1.0,
                      force_weight: float = 1.0, epochs: int = 50, batch_size: int = 4, lr: float = 5e-3,
                      val_fraction: float = 0.2, patience: int = 10, seed: int = 0, device=None, out_dir,
                      resume: bool = True, max_minutes: Optional[float] = None, progress: bool = True,
                      force_groups=None, schedule: Optional[str] = None):
    """Fit an :class:`~enpcg.equivariant.EquivariantModel` to atomistic energies and forces.

    Parameters
    ----------
    model : EquivariantModel, fitted in its own dtype; its ``species_energy`` buffer is overwritten
    positions : array, shape=(F, n, 3), nm; forces : array, shape=(F, n, 3), kJ/mol/nm
    energies : array, shape=(F,), kJ/mol, potential energies of the frames
    box : array, shape=(F, 3, 3), nm rows, or None
    species_index : array, shape=(n,), int, species of each atom in ``model.topology.type_names()`` order
        (must equal ``model.topology.type_index()``)
    energy_weight : weight of the squared energy error per atom, per (kJ/mol)^2; force_weight : weight of the
        squared force error, per (kJ/mol/nm)^2
    epochs, batch_size, lr, val_fraction, patience, seed, device, resume, max_minutes, progress,
        force_groups : as in :func:`enpcg.fitting.trainer.train_force_matching`
    schedule : learning-rate schedule of the trainer; None = "cosine_time" with ``max_minutes`` (spend the
        budget decaying to 1e-3 lr), else "plateau"
    out_dir : folder for ``checkpoint.pt``, ``history.json``, ``training_curve.png`` and ``metrics.json``

    Returns
    -------
    model, history, metrics : metrics is :func:`force_metrics` on the validation frames plus
        ``species_energy`` (kJ/mol per species) and ``energy_rmse_per_atom`` (kJ/mol).
    """
    energies = np.asarray(energies, dtype=np.float64).reshape(-1)
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 3 or energies.shape[0] != pos.shape[0]:
        raise EnpcgError(f"train_equivariant: energies must have one value per frame ({pos.shape[0]} frames, "
                         f"positions {pos.shape}); you supplied {energies.shape[0]}")
    if not np.all(np.isfinite(energies)):
        raise EnpcgError("train_equivariant: energies contain NaN or infinite values; clean the data set")
    species_index = np.asarray(species_index, dtype=np.int64).reshape(-1)
    expected = np.asarray(model.topology.type_index())
    if species_index.shape != expected.shape or not np.array_equal(species_index, expected):
        raise EnpcgError(f"train_equivariant: species_index ({species_index.shape[0]} atoms) differs from the "
                         f"model topology's type_index() ({expected.shape[0]} atoms, types "
                         f"{model.topology.type_names()}); build the model from the same atoms")
    n_species = len(model.topology.type_names())
    counts = np.bincount(species_index, minlength=n_species).astype(np.float64)
    shifts = species_energy_shifts(energies, np.broadcast_to(counts, (energies.shape[0], n_species)))
    with torch.no_grad():
        model.species_energy.copy_(torch.as_tensor(shifts, dtype=model.species_energy.dtype))

    out_dir = Path(out_dir)
    model, history = train_force_matching(
        model, pos, forces, box, out_dir=out_dir, epochs=epochs, batch_size=batch_size, lr=lr,
        val_fraction=val_fraction, patience=patience, seed=seed, device=device, progress=progress,
        resume=resume, max_minutes=max_minutes, energies=energies, energy_weight=energy_weight,
        force_weight=force_weight, force_groups=force_groups,
        schedule=schedule or ("cosine_time" if max_minutes else "plateau"), min_lr=1e-3 * lr)

    _, val_idx = _split(pos.shape[0], val_fraction, seed)  # the trainer's own validation frames
    metrics = force_metrics(model, pos, forces, box, val_idx, batch_size=batch_size)
    metrics["species_energy"] = dict(zip(model.topology.type_names(), [float(v) for v in shifts]))
    if history.get("val_energy_rmse") and history["kept_epoch"] > 0:
        metrics["energy_rmse_per_atom"] = history["val_energy_rmse"][history["kept_epoch"] - 1]
    metrics["best_epoch"] = history["best_epoch"]
    metrics["stopped"] = history["stopped"]
    write_json(out_dir / METRICS, metrics)
    return model, history, metrics
