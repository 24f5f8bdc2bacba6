"""Pair geometry of oriented beads (TorchScript): the pair list, centre-centre vectors and the SE(3)-invariant
pair features used by the oriented models. Lengths in nm."""
from typing import List, Optional

import numpy as np
import torch
from torch import Tensor

from ..geometry import all_pairs, minimum_image
from ..topology import CGTopology


def nonbonded_pairs(topology: CGTopology) -> Tensor:
    """(P, 2) int64 pairs i < j that interact: not excluded by CG bonds and not two beads of one molecule
    that are bonded within ``exclusion_bonds``; beads of different molecules always interact."""
    ex = topology.excluded_pairs()
    return all_pairs(topology.n_beads, torch.as_tensor(ex, dtype=torch.long).reshape(-1, 2))


def pair_displacements(positions: Tensor, pairs: Tensor, box: Optional[Tensor]) -> Tensor:
    """Minimum-image R_j - R_i, (B, P, 3) nm, for positions (B, n, 3) and pairs (P, 2)."""
    return minimum_image(positions[:, pairs[:, 1]] - positions[:, pairs[:, 0]], box)


def director_features(r_hat: Tensor, u_i: Tensor, u_j: Tensor) -> List[Tensor]:
    """Invariants of two directors and the unit centre-centre vector (all (..., 3)):
    a = u_i.r_hat, b = u_j.r_hat, c = u_i.u_j (scalars under E(3)) and the pseudoscalar
    p = (u_i x u_j).r_hat (it changes sign under a mirror reflection: SE(3) allows it, E(3) forbids it)."""
    a = (u_i * r_hat).sum(-1)
    b = (u_j * r_hat).sum(-1)
    c = (u_i * u_j).sum(-1)
    p = (torch.linalg.cross(u_i, u_j, dim=-1) * r_hat).sum(-1)
    return [a, b, c, p]


def frame_features(r_hat: Tensor, q_i: Tensor, q_j: Tensor) -> Tensor:
    """(..., 15) invariants of two full frames (..., 3, 3) (columns) and r_hat (..., 3): s = Q_i^T r_hat (3),
    t = Q_j^T r_hat (3), C = Q_i^T Q_j (9, row-major). They determine the relative pose completely."""
    s = torch.matmul(r_hat.unsqueeze(-2), q_i).squeeze(-2)
    t = torch.matmul(r_hat.unsqueeze(-2), q_j).squeeze(-2)
    c = torch.matmul(q_i.transpose(-1, -2), q_j)
    return torch.cat([s, t, c.flatten(-2)], dim=-1)


# Parity of the frame features: under a mirror reflection of the atoms, frames built from atom points keep
# e_x, e_y (reflected) and e_z = e_x x e_y flips relative to the reflected e_z, so the z components of s and
# t and the mixed z-(x, y) entries of C change sign. These sign flips map a configuration to its mirror image.
FRAME_PARITY = np.array([1, 1, -1, 1, 1, -1,
                         1, 1, -1, 1, 1, -1, -1, -1, 1], dtype=np.float64)
# Exchange of the two beads (i <-> j, r_hat -> -r_hat): s' = -t, t' = -s, C' = C^T.
FRAME_SWAP = [3, 4, 5, 0, 1, 2, 6, 9, 12, 7, 10, 13, 8, 11, 14]
FRAME_SWAP_SIGN = np.array([-1, -1, -1, -1, -1, -1] + [1] * 9, dtype=np.float64)
