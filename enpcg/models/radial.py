"""Radial functions shared by the neural CG model and the equivariant atomistic model (TorchScript-able).

r in nm; cutoff rc in nm.
"""
import math

import torch
from torch import Tensor


def bessel_basis(r: Tensor, cutoff: float, n_rbf: int) -> Tensor:
    """Bessel radial basis sqrt(2/rc) sin(n pi r / rc) / r, n = 1..n_rbf; (E,) -> (E, n_rbf), 1/nm^(3/2)."""
    # Frequencies are built in r's dtype at each call: exact in float64, no buffer to cast.
    freqs = torch.arange(1, n_rbf + 1, dtype=r.dtype, device=r.device) * (math.pi / cutoff)
    return math.sqrt(2.0 / cutoff) * torch.sin(r.unsqueeze(-1) * freqs) / r.unsqueeze(-1)


def polynomial_envelope(r: Tensor, cutoff: float, p: float = 6.0) -> Tensor:
    """Smooth cutoff (DimeNet, exponent p): 1 at r = 0, 0 with zero first and second derivative at r >= rc."""
    d = r / cutoff
    dp = torch.pow(d, p)
    u = 1.0 - (p + 1.0) * (p + 2.0) / 2.0 * dp + p * (p + 2.0) * dp * d - p * (p + 1.0) / 2.0 * dp * d * d
    return torch.where(d < 1.0, u, torch.zeros_like(u))
