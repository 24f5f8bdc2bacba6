"""A sum of models: total energy = sum of the terms' energies (kJ/mol), e.g. priors + neural correction."""
from typing import Optional

import torch
from torch import Tensor

from .base import CGModel, create_model, register_model


@register_model("sum")
class SumModel(CGModel):
    """Energy = sum of the energies of ``terms`` (each a ``{"kind", "config"}`` description or a CGModel)."""

    def __init__(self, topology, terms: list):
        super().__init__(topology)
        modules = [t if isinstance(t, CGModel) else create_model(t["kind"], topology, **t.get("config", {}))
                   for t in terms]
        self.terms = torch.nn.ModuleList(modules)
        self.config = {"terms": [{"kind": m.kind, "config": m.config} for m in modules]}

    @torch.jit.export
    def batch_energy(self, positions: Tensor, box: Optional[Tensor] = None) -> Tensor:
        e = torch.zeros(positions.shape[0], dtype=positions.dtype, device=positions.device)
        for term in self.terms:
            e = e + term.batch_energy(positions, box)
        return e

    def native_forces(self) -> list:
        forces = []
        for term in self.terms:
            forces.extend(term.native_forces())
        return forces
