"""Geometry in torch, TorchScript-compatible: minimum image, distances, angles, dihedrals.

Units: positions and box in nm, angles in radians. Box vectors are the rows of a (3, 3) tensor in OpenMM's
reduced form (a along x, b in the xy plane, c anywhere with positive z), which makes the successive
reduction below an exact minimum image for any cutoff up to half the smallest box width.
All functions take batched inputs: positions (B, N, 3), box (B, 3, 3) or None for a non-periodic system.
"""
from typing import Optional

import torch
from torch import Tensor


def minimum_image(d: Tensor, box: Optional[Tensor]) -> Tensor:
    """Minimum-image displacement vectors.

    d : (B, P, 3) nm; box : (B, 3, 3) nm rows, or None (no periodicity). Returns (B, P, 3) nm.
    """
    if box is None:
        return d
    a = box[:, 0].unsqueeze(1)
    b = box[:, 1].unsqueeze(1)
    c = box[:, 2].unsqueeze(1)
    d = d - c * torch.round(d[:, :, 2:3] / c[:, :, 2:3])
    d = d - b * torch.round(d[:, :, 1:2] / b[:, :, 1:2])
    d = d - a * torch.round(d[:, :, 0:1] / a[:, :, 0:1])
    return d


def pair_vectors(positions: Tensor, i: Tensor, j: Tensor, box: Optional[Tensor]) -> Tensor:
    """Minimum-image vectors r_j - r_i, (B, P, 3) nm, for index tensors i, j of shape (P,)."""
    return minimum_image(positions[:, j] - positions[:, i], box)


def norm(v: Tensor) -> Tensor:
    """Euclidean norm over the last axis."""
    return torch.linalg.norm(v, dim=-1)


def bond_lengths(positions: Tensor, bonds: Tensor, box: Optional[Tensor]) -> Tensor:
    """(B, n_bonds) nm for bonds (n_bonds, 2)."""
    return norm(pair_vectors(positions, bonds[:, 0], bonds[:, 1], box))


def bond_angles(positions: Tensor, angles: Tensor, box: Optional[Tensor]) -> Tensor:
    """(B, n_angles) radians in [0, pi] at the middle bead of (i, j, k).

    Uses atan2(|u x v|, u . v), which keeps full precision near 0 and pi (acos does not).
    """
    u = pair_vectors(positions, angles[:, 1], angles[:, 0], box)
    v = pair_vectors(positions, angles[:, 1], angles[:, 2], box)
    cross = torch.linalg.cross(u, v, dim=-1)
    return torch.atan2(norm(cross), (u * v).sum(-1))


def dihedral_angles(positions: Tensor, dihedrals: Tensor, box: Optional[Tensor]) -> Tensor:
    """(B, n_dihedrals) radians in (-pi, pi], IUPAC sign convention as OpenMM (trans = pi)."""
    b1 = pair_vectors(positions, dihedrals[:, 0], dihedrals[:, 1], box)
    b2 = pair_vectors(positions, dihedrals[:, 1], dihedrals[:, 2], box)
    b3 = pair_vectors(positions, dihedrals[:, 2], dihedrals[:, 3], box)
    n1 = torch.linalg.cross(b1, b2, dim=-1)
    n2 = torch.linalg.cross(b2, b3, dim=-1)
    m1 = torch.linalg.cross(n1, b2 / norm(b2).unsqueeze(-1), dim=-1)
    x = (n1 * n2).sum(-1)
    y = (m1 * n2).sum(-1)
    return torch.atan2(-y, x)


def all_pairs(n: int, excluded: Optional[Tensor] = None) -> Tensor:
    """All pairs i < j of n particles, (P, 2) int64, without the excluded pairs (n_excl, 2) with i < j.

    Dense O(n^2) list: exact and CUDA-graph friendly (fixed shape); meant for systems up to a few thousand
    beads.
    """
    ii, jj = torch.triu_indices(n, n, offset=1)
    if excluded is not None and excluded.numel() > 0:
        key = ii * n + jj
        ex = excluded[:, 0] * n + excluded[:, 1]
        keep = ~torch.isin(key, ex)
        ii = ii[keep]
        jj = jj[keep]
    return torch.stack([ii, jj], dim=1)
