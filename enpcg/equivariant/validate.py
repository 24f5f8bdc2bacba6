"""Accuracy of an atomistic potential on frames it was not trained on, at the three levels coarse-graining uses.

Units: positions nm, forces kJ/mol/nm. Every error is an RMSE over Cartesian components divided by the RMS of
the reference at the same level (a dimensionless fraction):

* ``atom``: the forces on atoms, f_i;
* ``bead``: the mapped bead forces F_I = sum_{i in I} f_i (the force-matching targets of the CG fit);
* ``chain_intermolecular``: each molecule's total force, sum_{i in molecule} f_i. Intramolecular forces cancel
  in that sum (Newton's third law for the reference; translation invariance of the molecule's internal
  energy for the model), so it is the intermolecular force on the molecule, the part that sets packing and the
  RDF, and the hardest for a short-cutoff model (interactions beyond its cutoff are missing).

Use it on an independent trajectory (another seed, not the training frames): ``enpcg train --validation
FILE`` writes the result to ``training/validation.json``.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import EnpcgError
from ..models.base import batch_forces, model_dtype


def _relative(err_sq: float, ref_sq: float) -> float:
    return float(np.sqrt(err_sq / ref_sq)) if ref_sq > 0 else float("nan")


def model_forces(model, positions, box, batch_size: int = 4) -> np.ndarray:
    """Forces (F, n, 3) kJ/mol/nm (float64) of ``model`` on positions (F, n, 3) nm, box (F, 3, 3) nm or None."""
    dt = model_dtype(model)
    device = next(iter(model.parameters())).device
    pos = np.asarray(positions)
    out = np.zeros(pos.shape, dtype=np.float64)
    for s in range(0, pos.shape[0], batch_size):
        x = torch.as_tensor(pos[s:s + batch_size], dtype=dt, device=device)
        b = None if box is None else torch.as_tensor(np.asarray(box)[s:s + batch_size], dtype=dt, device=device)
        _, f = batch_forces(model, x, b)
        out[s:s + batch_size] = f.detach().cpu().numpy()
    return out


def force_errors(predicted, reference, mapping=None) -> dict:
    """Relative force errors at the atom, bead and molecule levels (see the module docstring).

    predicted, reference : arrays (F, n_atoms, 3) kJ/mol/nm.
    mapping : :class:`enpcg.mapping.Mapping` over the same atoms, or None (atom level only). Molecules are the
        mapping's molecules (``mapping.topology.molecule_index`` of the beads); the mapping must cover every
        atom for the molecule sums to be whole-molecule forces.

    Returns a dict: ``{level: {"rmse": kJ/mol/nm, "reference_rms": kJ/mol/nm, "relative": fraction}}`` for
    levels "atom", and with a mapping also "bead" and "chain_intermolecular", plus ``n_frames``.
    """
    p = np.asarray(predicted, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if p.shape != r.shape or p.ndim != 3:
        raise EnpcgError(f"force_errors: predicted {p.shape} and reference {r.shape} forces must both be "
                         "(n_frames, n_atoms, 3)")
    levels = {"atom": (p, r)}
    if mapping is not None:
        if mapping.n_atoms != p.shape[1]:
            raise EnpcgError(f"force_errors: mapping {mapping.source} has {mapping.n_atoms} atoms; the forces have "
                             f"{p.shape[1]}")
        covered = np.zeros(mapping.n_atoms, dtype=bool)
        covered[np.concatenate(mapping.bead_atoms)] = True
        if not covered.all():
            raise EnpcgError(f"force_errors: mapping {mapping.source} leaves {int((~covered).sum())} atoms in no "
                             "bead, so molecule sums would not be whole-molecule forces; use a mapping that "
                             "covers every atom")
        pb, rb = mapping.map_forces(p), mapping.map_forces(r)
        levels["bead"] = (pb, rb)
        mol = np.asarray(mapping.topology.molecule_index)
        n_mol = int(mol.max()) + 1
        pm = np.zeros((p.shape[0], n_mol, 3))
        rm = np.zeros((p.shape[0], n_mol, 3))
        np.add.at(pm, (slice(None), mol), pb)
        np.add.at(rm, (slice(None), mol), rb)
        levels["chain_intermolecular"] = (pm, rm)
    out = {"units": "rmse and reference_rms in kJ/mol/nm per Cartesian component; relative = rmse / "
                    "reference_rms", "n_frames": int(p.shape[0])}
    for name, (a, b) in levels.items():
        err_sq = float(((a - b) ** 2).mean())
        ref_sq = float((b ** 2).mean())
        out[name] = {"rmse": float(np.sqrt(err_sq)), "reference_rms": float(np.sqrt(ref_sq)),
                     "relative": _relative(err_sq, ref_sq)}
    return out


def validate(model, frames, mapping=None, batch_size: int = 4) -> dict:
    """:func:`force_errors` of ``model`` on H5MD ``frames`` (:class:`enpcg.h5md.Frames` with forces)."""
    if frames.forces is None:
        raise EnpcgError("validate: the validation frames hold no forces (particles/all/force); sample them with "
                         "`enpcg sample`")
    if frames.n_particles != model.topology.n_beads:
        raise EnpcgError(f"validate: the validation frames have {frames.n_particles} atoms; the model has "
                         f"{model.topology.n_beads}. Use frames of the system the model was trained on")
    pred = model_forces(model, frames.positions, frames.box, batch_size=batch_size)
    return force_errors(pred, frames.forces, mapping)
