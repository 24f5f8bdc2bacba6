"""E(3)-equivariant atomistic potentials (positions in nm, energies in kJ/mol); see :mod:`.model`.

Importing this package registers the model kind ``"equivariant"`` with :func:`enpcg.models.create_model`.
"""
from .model import DENSE_MAX_ATOMS, NEIGHBOR_LISTS, EquivariantModel, hidden_irreps

__all__ = ["DENSE_MAX_ATOMS", "NEIGHBOR_LISTS", "EquivariantModel", "hidden_irreps"]
