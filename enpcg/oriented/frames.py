"""Body frames of oriented beads and the torque of an energy of frames (numpy and TorchScript torch).

Units: positions nm, torques kJ/mol. ``axes`` arrays are (..., 3, 3) with the body axes e_x, e_y, e_z as
**columns** (a proper rotation matrix, det = +1).

Frames are built from points (centres of atom groups), not from principal axes: principal axes are
undefined for symmetric groups (a degenerate gyration tensor), while two or three group centres give a
frame that is defined and smooth whenever the centres are not coincident (director) or collinear (frame).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ORIENTATION_KINDS = ("none", "director", "frame")


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(n > 0, n, 1.0)


def frame_from_points(a, b, c) -> np.ndarray:
    """Right-handed frame (..., 3, 3) from three points (..., 3): e_x along b - a, e_y the part of c - a
    perpendicular to e_x, e_z = e_x x e_y (columns)."""
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (a, b, c))
    ex = _unit(b - a)
    v = c - a
    ey = _unit(v - np.sum(v * ex, axis=-1, keepdims=True) * ex)
    ez = np.cross(ex, ey)
    return np.stack([ex, ey, ez], axis=-1)


def director_frame(a, b) -> np.ndarray:
    """Frame (..., 3, 3) whose e_x is the director along b - a; e_y, e_z complete it deterministically (the
    lab axis least aligned with e_x, made perpendicular). Only e_x has meaning."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ex = _unit(b - a)
    helper = np.eye(3)[np.argmin(np.abs(ex), axis=-1)]
    ey = _unit(helper - np.sum(helper * ex, axis=-1, keepdims=True) * ex)
    return np.stack([ex, ey, np.cross(ex, ey)], axis=-1)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3, 3) rotation matrices drawn uniformly from SO(3) (normalised Gaussian quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


def rotation_about(axis, angle: float) -> np.ndarray:
    """(3, 3) rotation by ``angle`` (rad) about the unit vector ``axis`` (Rodrigues)."""
    k = _unit(np.asarray(axis, dtype=np.float64))
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


def torques_from_axis_gradients(axes: Tensor, grad_axes: Tensor) -> Tensor:
    """Torques (..., 3) kJ/mol from body axes (..., 3, 3) (columns) and dE/daxes (..., 3, 3).

    A rotation by the small vector d(theta) moves every axis by d(theta) x e_a, so
    dE = d(theta) . sum_a e_a x dE/de_a and tau = -sum_a e_a x dE/de_a.
    """
    return -torch.linalg.cross(axes, grad_axes, dim=-2).sum(dim=-1)


def torch_frame_from_points(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Torch twin of :func:`frame_from_points` (differentiable, TorchScript)."""
    ex = b - a
    ex = ex / torch.linalg.norm(ex, dim=-1, keepdim=True)
    v = c - a
    ey = v - (v * ex).sum(-1, keepdim=True) * ex
    ey = ey / torch.linalg.norm(ey, dim=-1, keepdim=True)
    ez = torch.linalg.cross(ex, ey, dim=-1)
    return torch.stack([ex, ey, ez], dim=-1)
