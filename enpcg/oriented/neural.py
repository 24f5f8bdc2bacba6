"""Neural pair energy of oriented beads (kind ``"oriented_neural"``), with a separate pseudoscalar channel.

Energy (kJ/mol) = sum over interacting pairs {i, j} of phi(f_ij) + phi(f_ji), each times a smooth cutoff
envelope of the centre distance r (nm), where f_ij are SE(3)-invariant features of the ordered pair
(:mod:`enpcg.oriented.pairs`): for director beads (a, b, c, p) = (u_i.r_hat, u_j.r_hat, u_i.u_j,
(u_i x u_j).r_hat), for frame beads the 15 components of Q_i^T r_hat, Q_j^T r_hat and Q_i^T Q_j.

phi = phi_even + phi_odd splits the energy by parity (P maps the features of a configuration to those of
its mirror image: p -> -p for directors, the z-mixed frame components for frames):
phi_even(f) = g_e(f) + g_e(P f) is mirror-symmetric, phi_odd(f) = g_o(f) - g_o(P f) changes sign under a
mirror (g_e, g_o are small MLPs). So ``energy_parts`` tells how much of the energy the chiral (pseudoscalar)
channel carries: near zero for an achiral system, with a definite sign for a chiral one.
"""
from typing import Optional, Tuple

import math

import numpy as np
import torch
from torch import Tensor

from ..errors import EnpcgError
from ..models.base import register_model
from ..models.radial import polynomial_envelope
from .base import OrientedModel
from .pairs import FRAME_PARITY, FRAME_SWAP, FRAME_SWAP_SIGN, director_features, frame_features, \
    nonbonded_pairs, pair_displacements


class _MLP(torch.nn.Module):
    def __init__(self, n_in: int, hidden: int, depth: int):
        super().__init__()
        layers = []
        width = n_in
        for _ in range(depth):
            layers.append(torch.nn.Linear(width, hidden))
            width = hidden
        self.hidden_layers = torch.nn.ModuleList(layers)
        self.out = torch.nn.Linear(width, 1)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden_layers:
            x = torch.nn.functional.silu(layer(x))
        return self.out(x).squeeze(-1)


@register_model("oriented_neural")
class OrientedNeuralModel(OrientedModel):
    """Neural pair energy of oriented beads (see module docstring).

    Parameters
    ----------
    topology : CGTopology whose beads are all "director" or all "frame" beads
    cutoff : float, nm, centre-centre cutoff (the envelope takes the energy smoothly to zero there)
    n_rbf : int, radial features sin(n pi r / cutoff), n = 1..n_rbf
    hidden, depth : int, width and number of hidden layers of each MLP
    chiral : bool, include the parity-odd (pseudoscalar) channel
    core_radius : float or None, nm: a repulsive isotropic core softplus(a) (core_radius / r)^12 with a learned
        amplitude a (starts at 0.05 energy_scale), a safety net against overlaps in simulation
    energy_scale : float, kJ/mol, unit of the networks' output
    periodic : bool, minimum image with the box
    seed : int, weight initialisation seed (the global RNG is untouched)
    """

    def __init__(self, topology, cutoff: float = 1.2, n_rbf: int = 8, hidden: int = 32, depth: int = 2,
                 chiral: bool = True, core_radius: Optional[float] = None, energy_scale: float = 1.0,
                 periodic: bool = True, seed: int = 0):
        super().__init__(topology)
        kinds = set(topology.orientations)
        if len(kinds) != 1 or kinds.pop() not in ("director", "frame"):
            raise EnpcgError(f"oriented_neural needs every bead to be a director bead or every bead a frame bead; "
                             f"the topology has orientations {sorted(set(topology.orientations))}; declare "
                             "`orientation` for every bead in the mapping file")
        self.director = topology.orientations[0] == "director"
        cutoff, n_rbf, hidden, depth = float(cutoff), int(n_rbf), int(hidden), int(depth)
        if cutoff <= 0 or n_rbf < 1 or hidden < 2 or depth < 1 or energy_scale <= 0:
            raise EnpcgError(f"oriented_neural config: cutoff {cutoff} nm (> 0), n_rbf {n_rbf} (>= 1), hidden "
                             f"{hidden} (>= 2), depth {depth} (>= 1), energy_scale {energy_scale} (> 0) out of range")
        self.config = {"cutoff": cutoff, "n_rbf": n_rbf, "hidden": hidden, "depth": depth, "chiral": bool(chiral),
                       "core_radius": None if core_radius is None else float(core_radius),
                       "energy_scale": float(energy_scale), "periodic": bool(periodic), "seed": int(seed)}
        self.cutoff = cutoff
        self.n_rbf = n_rbf
        self.chiral = bool(chiral)
        self.periodic = bool(periodic)
        self.energy_scale = float(energy_scale)
        self.use_core = core_radius is not None
        self.core_radius = float(core_radius) if core_radius is not None else 1.0
        n_feat = 4 if self.director else 15
        if self.director:
            parity = np.array([1.0, 1.0, 1.0, -1.0])
            swap = [1, 0, 2, 3]
            swap_sign = np.array([-1.0, -1.0, 1.0, 1.0])
        else:
            parity, swap, swap_sign = FRAME_PARITY, FRAME_SWAP, FRAME_SWAP_SIGN
        self.register_buffer("parity", torch.as_tensor(parity, dtype=torch.float64), persistent=False)
        self.register_buffer("swap", torch.as_tensor(swap, dtype=torch.long), persistent=False)
        self.register_buffer("swap_sign", torch.as_tensor(swap_sign, dtype=torch.float64), persistent=False)
        self.register_buffer("pairs", nonbonded_pairs(topology), persistent=False)
        types = topology.type_index()
        pm = topology.pair_type_matrix()
        pair_type = pm[types[self.pairs[:, 0].numpy()], types[self.pairs[:, 1].numpy()]] if len(self.pairs) else \
            np.zeros(0, dtype=np.int64)
        self.register_buffer("pair_type", torch.as_tensor(pair_type, dtype=torch.long), persistent=False)
        n_pt = max(1, len(topology.pair_type_names()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.pair_type_embedding = torch.nn.Embedding(n_pt, n_rbf)
            torch.nn.init.zeros_(self.pair_type_embedding.weight)
            self.even = _MLP(n_rbf + n_feat, hidden, depth)
            self.odd = _MLP(n_rbf + n_feat, hidden, depth)
            self.core_logit = torch.nn.Parameter(torch.full((n_pt,), -3.0))

    def _features(self, positions: Tensor, axes: Tensor, box: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """Centre distances r (B, P) nm, radial inputs (B, P, n_rbf) and ordered-pair features (B, P, n_feat)."""
        d = pair_displacements(positions, self.pairs, box if self.periodic else None)
        r = torch.linalg.norm(d, dim=-1)
        r_hat = d / r.unsqueeze(-1)
        qi = axes[:, self.pairs[:, 0]]
        qj = axes[:, self.pairs[:, 1]]
        if self.director:
            f = torch.stack(director_features(r_hat, qi[..., 0], qj[..., 0]), dim=-1)
        else:
            f = frame_features(r_hat, qi, qj)
        freqs = torch.arange(1, self.n_rbf + 1, dtype=r.dtype, device=r.device) * (math.pi / self.cutoff)
        radial = torch.sin(r.unsqueeze(-1) * freqs) + self.pair_type_embedding(self.pair_type).to(r.dtype)
        return r, radial, f

    @torch.jit.export
    def batch_energy_parts(self, positions: Tensor, axes: Tensor, box: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(even, odd) energies (B,) kJ/mol: the mirror-symmetric part and the pseudoscalar (chiral) part."""
        r, radial, f = self._features(positions, axes, box)
        parity = self.parity.to(f.dtype)
        f_swap = f.index_select(2, self.swap) * self.swap_sign.to(f.dtype)
        env = polynomial_envelope(r, self.cutoff)
        even = torch.zeros_like(r)
        odd = torch.zeros_like(r)
        for g in [f, f_swap]:
            x = torch.cat([radial, g], dim=-1)
            xp = torch.cat([radial, g * parity], dim=-1)
            even = even + self.even(x) + self.even(xp)
            if self.chiral:
                odd = odd + self.odd(x) - self.odd(xp)
        if self.use_core:
            amp = torch.nn.functional.softplus(self.core_logit[self.pair_type]).to(r.dtype)
            even = even + amp * torch.pow(self.core_radius / r, 12.0)
        inside = (r < self.cutoff).to(r.dtype)
        even = (even * env * inside).sum(-1) * self.energy_scale
        odd = (odd * env * inside).sum(-1) * self.energy_scale
        return even, odd

    @torch.jit.export
    def batch_energy(self, positions: Tensor, axes: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """Energies (B,) kJ/mol of positions (B, n, 3) nm and axes (B, n, 3, 3)."""
        even, odd = self.batch_energy_parts(positions, axes, box)
        return even + odd
