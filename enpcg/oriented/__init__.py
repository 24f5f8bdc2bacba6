"""Oriented beads: body frames, mapped torques, SE(3)-invariant energies of positions and orientations.

Units: nm, ps, kJ/mol, amu; torques in kJ/mol (per radian). Conventions (docs/conventions.md, "Oriented
beads"): a bead's orientation is a rotation matrix ``axes`` (3, 3) whose **columns** are its body axes
e_x, e_y, e_z in the lab frame (x_lab = R + axes @ x_body). A director (uniaxial) bead uses e_x only; its
e_y, e_z are a deterministic completion that no model may read. The torque of an energy E(R, axes) is
tau = -sum_a e_a x dE/de_a; the mapped torque of a bead is tau_I = sum_{i in I} (r_i - R_I) x f_i.
"""
from .frames import (ORIENTATION_KINDS, director_frame, frame_from_points, random_rotations,
                     torques_from_axis_gradients)
from .base import OrientedModel, forces_and_torques

__all__ = ["ORIENTATION_KINDS", "OrientedModel", "director_frame", "forces_and_torques", "frame_from_points",
           "random_rotations", "torques_from_axis_gradients"]
