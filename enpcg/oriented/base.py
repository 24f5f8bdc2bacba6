"""Base class of energy models of oriented beads, and forces and torques by autograd.

An oriented model is a :class:`enpcg.models.CGModel` whose energy depends on bead positions and body frames:

* ``forward(positions (n, 3) nm, axes (n, 3, 3), box (3, 3) nm or None) -> energy () kJ/mol``;
* ``batch_energy(positions (B, n, 3) nm, axes (B, n, 3, 3), box (B, 3, 3) nm or None) -> (B,) kJ/mol``.

``axes[..., :, a]`` is body axis a (columns). The energy must be SE(3)-invariant: unchanged when every
position and axis is rotated and translated together. It need not be E(3)-invariant: pseudoscalars such as
(u_i x u_j) . r_ij are allowed, so chiral packings can be told apart. Models of director beads must read
only ``axes[..., :, 0]``. Saved and loaded like every model (``save_model`` / ``load_model``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..models.base import CGModel, model_dtype
from .frames import torques_from_axis_gradients


class OrientedModel(CGModel):
    """Base of oriented-bead models (energies kJ/mol, positions nm, axes as columns)."""

    kind = "oriented-base"
    oriented = True

    def forward(self, positions: Tensor, axes: Tensor, box: Optional[Tensor] = None) -> Tensor:
        if box is None:
            return self.batch_energy(positions.unsqueeze(0), axes.unsqueeze(0), None)[0]
        return self.batch_energy(positions.unsqueeze(0), axes.unsqueeze(0), box.unsqueeze(0))[0]

    @torch.jit.export
    def batch_energy(self, positions: Tensor, axes: Tensor, box: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError


def batch_forces_and_torques(model: OrientedModel, positions: Tensor, axes: Tensor, box: Optional[Tensor],
                             create_graph: bool = False):
    """Energies (B,) kJ/mol, forces (B, n, 3) kJ/mol/nm and torques (B, n, 3) kJ/mol of a batch (tensors)."""
    x = positions if positions.requires_grad else positions.clone().requires_grad_(True)
    q = axes if axes.requires_grad else axes.clone().requires_grad_(True)
    e = model.batch_energy(x, q, box)
    gx, gq = torch.autograd.grad(e.sum(), (x, q), create_graph=create_graph)
    return e, -gx, torques_from_axis_gradients(q, gq)


def forces_and_torques(model: OrientedModel, positions, axes, box=None):
    """Energies, forces and torques of frames by autograd, numpy in and out, in the model's dtype.

    positions : (n, 3) or (F, n, 3) nm; axes : (n, 3, 3) or (F, n, 3, 3); box : (3, 3), (F, 3, 3) nm or None.
    Returns energy (F,) kJ/mol (a float for one frame), forces kJ/mol/nm and torques kJ/mol shaped like
    positions.
    """
    dt = model_dtype(model)
    pos = torch.as_tensor(np.asarray(positions), dtype=dt)
    single = pos.ndim == 2
    if single:
        pos = pos.unsqueeze(0)
    q = torch.as_tensor(np.asarray(axes), dtype=dt).reshape(pos.shape[0], pos.shape[1], 3, 3)
    b = None
    if box is not None:
        b = torch.as_tensor(np.asarray(box), dtype=dt)
        b = b.expand(pos.shape[0], 3, 3) if b.ndim == 2 else b
    e, f, t = batch_forces_and_torques(model, pos, q, b)
    e, f, t = e.detach().numpy(), f.detach().numpy(), t.detach().numpy()
    if single:
        return float(e[0]), f[0], t[0]
    return e, f, t
