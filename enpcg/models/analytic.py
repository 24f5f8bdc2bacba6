"""Analytic models with known forces, used to test every export path.

``HarmonicOrigin``: E = sum_i k |r_i|^2 (k in kJ/mol/nm^2), F_i = -2 k r_i. Not translation invariant (it
pins particles to the origin); it exists to check plumbing, as openmm-torch's own tests do.
"""
from typing import Optional

import torch
from torch import Tensor

from .base import CGModel, register_model


@register_model("harmonic_origin")
class HarmonicOrigin(CGModel):
    """E = k sum_i |r_i|^2; k in kJ/mol/nm^2 (a plumbing test model, not a CG potential)."""

    def __init__(self, topology, k: float = 1.0):
        super().__init__(topology)
        self.config = {"k": float(k)}
        self.register_buffer("k", torch.tensor(float(k), dtype=torch.float64))

    @torch.jit.export
    def batch_energy(self, positions: Tensor, box: Optional[Tensor] = None) -> Tensor:
        return self.k * (positions * positions).sum(dim=(1, 2))

    def native_forces(self) -> list:
        import openmm

        f = openmm.CustomExternalForce("k_origin*(x*x+y*y+z*z)")
        f.addGlobalParameter("k_origin", float(self.k))
        for i in range(self.topology.n_beads):
            f.addParticle(i, [])
        return [f]
