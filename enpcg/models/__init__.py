"""Coarse-grained energy models (positions in nm, energies in kJ/mol); see :mod:`enpcg.models.base`."""
from .base import (CGModel, MODEL_REGISTRY, batch_forces, create_model, energy_and_forces, load_model,
                   model_dtype, register_model, save_model)

__all__ = ["CGModel", "MODEL_REGISTRY", "batch_forces", "create_model", "energy_and_forces", "load_model",
           "model_dtype", "register_model", "save_model"]
