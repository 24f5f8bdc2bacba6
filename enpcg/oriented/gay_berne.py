"""Uniaxial Gay–Berne ellipsoids (kind ``"gay_berne"``) with exactly the functional form of OpenMM's
``GayBerneForce`` (Reference platform, ``ReferenceGayBerneForce.cpp``; OpenMM user guide, "Theory",
GayBerneForce).

Units: positions, lengths nm; energies kJ/mol; forces kJ/mol/nm; torques kJ/mol; strength factors
dimensionless.

Every bead is an ellipsoid whose symmetry axis is its body axis u = e_x = ``axes[..., :, 0]`` (director
beads). For a pair (i, j) with minimum-image centre–centre vector r (length r, unit vector r̂)::

    semi-axes      r_par = s_par / 2, r_perp = s_perp / 2     (OpenMM's sx, sy, sz are full DIAMETERS)
    A_i            rows = body axes of i;  G_i = A_i^T diag(r_par^2, r_perp^2, r_perp^2) A_i   (nm^2)
    B_i            = A_i^T diag(e_par^-1/2, e_perp^-1/2, e_perp^-1/2) A_i
    s_i            = (r_x r_y + r_z^2) sqrt(r_x r_y) = (r_par r_perp + r_perp^2) sqrt(r_par r_perp)   (nm^3)
    sigma_12       = [ 1/2 r̂^T G_12^-1 r̂ ]^-1/2,   G_12 = G_i + G_j                       (nm)
    h_12           = r - sigma_12                                                            (nm)
    U_r            = 4 epsilon (rho^12 - rho^6),   rho = sigma / (h_12 + sigma)
    eta_12         = sqrt(2 s_i s_j / det G_12)
    chi_12         = (2 r̂^T B_12^-1 r̂)^2,  B_12 = B_i + B_j
    U              = U_r eta_12 chi_12 S(r)

OpenMM combines per-particle parameters as sigma = (sigma_i + sigma_j)/2 and epsilon = sqrt(eps_i eps_j);
with one bead type these are simply ``sigma`` and ``epsilon``. Two spheres with s_par = s_perp = sigma and
e_par = e_perp = 1 give plain Lennard-Jones. The strength factors multiply the interaction along each axis
(end-to-end pairs scale by e_par, side-by-side by e_perp).

Cutoff (as OpenMM's CutoffNonPeriodic/CutoffPeriodic): a pair is skipped when its centre–centre distance
r >= ``cutoff`` — no energy shift. With ``switch_distance`` r_s (OpenMM's ``setUseSwitchingFunction``) the
pair energy is multiplied by S(t) = 1 - 10 t^3 + 15 t^4 - 6 t^5, t = (r - r_s)/(cutoff - r_s), for
r > r_s (S = 1 below). ``cutoff=None`` (non-periodic only) is OpenMM's NoCutoff.

Uniaxial closed forms (what is computed; identical to the 3x3 algebra above). With c = u_i . u_j,
x_k = r̂ . u_k, a matrix M = alpha I + beta (u_i u_i^T + u_j u_j^T) and kappa = beta / (alpha + beta):
``r̂^T M^-1 r̂ = [1 - kappa (x_i^2 + x_j^2 - 2 kappa c x_i x_j) / (1 - kappa^2 c^2)] / alpha`` and
``det M = alpha (alpha + beta)^2 (1 - kappa^2 c^2)``. G_12: alpha = 2 r_perp^2, beta = r_par^2 - r_perp^2;
B_12: alpha = 2 e_perp^-1/2, beta = e_par^-1/2 - e_perp^-1/2.

Degeneracy: scaling every strength factor by c scales B_12^-1 by c^1/2, hence chi_12 by c, so
(epsilon, e_par, e_perp) -> (epsilon / c, c e_par, c e_perp) leaves the energy unchanged: only
epsilon * e_perp and e_par / e_perp are identifiable. ``e_perp`` is therefore held fixed (1 by default) and
fitting all three of epsilon, e_par, e_perp is refused. eta_12 depends only on the aspect ratio
s_par / s_perp; sigma, s_par and s_perp are otherwise independent (sigma sets the softness of the
contact, s_par and s_perp the contact distance).

Pairs: all i < j, except ``topology.excluded_pairs()`` and pairs in the same molecule.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import EnpcgError
from ..geometry import minimum_image
from ..models.base import register_model
from .base import OrientedModel

PARAMETER_NAMES = ("sigma", "epsilon", "s_par", "s_perp", "e_par", "e_perp")
DEFAULT_FIT = ("sigma", "epsilon", "s_par", "s_perp", "e_par")


def _quad_inverse_and_det(alpha: Tensor, beta: Tensor, c: Tensor, xi: Tensor, xj: Tensor):
    """For M = alpha I + beta (u_i u_i^T + u_j u_j^T): (r̂^T M^-1 r̂, det M), c = u_i.u_j, x = r̂.u."""
    kappa = beta / (alpha + beta)
    denom = 1.0 - kappa * kappa * c * c
    quad = (1.0 - kappa * (xi * xi + xj * xj - 2.0 * kappa * c * xi * xj) / denom) / alpha
    det = alpha * (alpha + beta) * (alpha + beta) * denom
    return quad, det


@register_model("gay_berne")
class GayBerneModel(OrientedModel):
    """Uniaxial Gay–Berne ellipsoids, OpenMM ``GayBerneForce`` form (see the module docstring).

    Parameters
    ----------
    topology : CGTopology; every bead is a director bead of one shared type
    sigma : float, nm, the LJ width of U_r (OpenMM's per-particle sigma)
    epsilon : float, kJ/mol, well depth of U_r (OpenMM's per-particle epsilon)
    s_par : float, nm, full length (diameter) of the ellipsoid along its symmetry axis e_x (OpenMM's sx)
    s_perp : float, nm, full width across the symmetry axis (OpenMM's sy = sz)
    e_par : float, dimensionless, strength factor along e_x (OpenMM's ex)
    e_perp : float, dimensionless, strength factor across e_x (OpenMM's ey = ez); default 1. Only
        e_par / e_perp and epsilon * e_perp matter (see the degeneracy note), so keep it fixed at 1.
    cutoff : float, nm, centre–centre cutoff, or None for no cutoff (non-periodic only)
    switch_distance : float, nm, start of OpenMM's switching function (< cutoff), or None (no switching)
    periodic : bool, minimum image with the box (OpenMM's CutoffPeriodic); needs a cutoff
    fit : list of str, the trainable parameters (stored as torch Parameters of their logs, so they stay
        positive); the others are buffers. Default sigma, epsilon, s_par, s_perp, e_par.
    """

    def __init__(self, topology, sigma: float = 0.4, epsilon: float = 3.0, s_par: float = 1.2,
                 s_perp: float = 0.4, e_par: float = 0.2, e_perp: float = 1.0, cutoff: Optional[float] = 1.4,
                 switch_distance: Optional[float] = None, periodic: bool = True, fit: Optional[list] = None):
        super().__init__(topology)
        values = {"sigma": sigma, "epsilon": epsilon, "s_par": s_par, "s_perp": s_perp, "e_par": e_par,
                  "e_perp": e_perp}
        for name, v in values.items():
            if not (isinstance(v, (int, float)) and math.isfinite(float(v)) and float(v) > 0):
                raise EnpcgError(f"gay_berne config: {name} must be a finite number > 0; received {v!r}")
        fit = list(DEFAULT_FIT if fit is None else fit)
        unknown = [f for f in fit if f not in PARAMETER_NAMES]
        if unknown:
            raise EnpcgError(f"gay_berne config: fit names unknown parameters {unknown}; allowed: "
                             f"{list(PARAMETER_NAMES)}")
        if {"epsilon", "e_par", "e_perp"} <= set(fit):
            raise EnpcgError("gay_berne config: fit may not hold all of epsilon, e_par and e_perp: scaling both "
                             "strength factors by c and epsilon by 1/c leaves the energy unchanged; keep e_perp "
                             "fixed (it is not fitted by default)")
        if cutoff is not None:
            cutoff = float(cutoff)
            if not cutoff > 0:
                raise EnpcgError(f"gay_berne config: cutoff must be > 0 nm or None; received {cutoff}")
        if periodic and cutoff is None:
            raise EnpcgError("gay_berne config: a periodic model needs a cutoff (nm); OpenMM's CutoffPeriodic "
                             "has one")
        if switch_distance is not None:
            switch_distance = float(switch_distance)
            if cutoff is None or not 0 <= switch_distance < cutoff:
                raise EnpcgError(f"gay_berne config: switch_distance must satisfy 0 <= switch_distance < cutoff "
                                 f"(nm); received switch_distance={switch_distance}, cutoff={cutoff}")
        if "none" in topology.orientations:
            raise EnpcgError("gay_berne: every bead must carry an orientation (director or frame; e_x is the "
                             "symmetry axis); topology has point beads (orientation 'none')")
        if len(set(topology.bead_types)) > 1:
            raise EnpcgError(f"gay_berne: one bead type is supported (all beads share parameters); topology "
                             f"has types {topology.type_names()}")
        self.config = {**{k: float(v) for k, v in values.items()}, "cutoff": cutoff,
                       "switch_distance": switch_distance, "periodic": bool(periodic),
                       "fit": [p for p in PARAMETER_NAMES if p in fit]}
        self.periodic = bool(periodic)
        self.use_cutoff = cutoff is not None
        self.cutoff = float(cutoff) if cutoff is not None else 0.0
        self.use_switch = switch_distance is not None
        self.switch_distance = float(switch_distance) if switch_distance is not None else 0.0
        f64 = torch.float64
        for name in PARAMETER_NAMES:
            logv = torch.tensor(math.log(float(values[name])), dtype=f64)
            if name in fit:
                self.register_parameter("log_" + name, torch.nn.Parameter(logv))
            else:
                self.register_buffer("log_" + name, logv)
        # Dense pair list: i < j, not excluded, not in the same molecule.
        n = topology.n_beads
        ii, jj = np.triu_indices(n, k=1)
        mol = np.asarray(topology.molecule_index)
        keep = mol[ii] != mol[jj]
        excl = np.asarray(topology.excluded_pairs(), dtype=np.int64).reshape(-1, 2)
        if excl.size:
            keep &= ~np.isin(ii * n + jj, excl[:, 0] * n + excl[:, 1])
        pairs = np.stack([ii[keep], jj[keep]], axis=1).astype(np.int64).reshape(-1, 2)
        self.register_buffer("pairs", torch.as_tensor(pairs), persistent=False)

    @torch.jit.export
    def batch_energy(self, positions: Tensor, axes: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """positions (B, n, 3) nm, axes (B, n, 3, 3) (columns; only e_x is read), box (B, 3, 3) nm rows or
        None -> energies (B,) kJ/mol."""
        if not self.periodic:
            box = None
        if self.pairs.shape[0] == 0:
            return torch.zeros(positions.shape[0], dtype=positions.dtype, device=positions.device)
        sigma = torch.exp(self.log_sigma)
        epsilon = torch.exp(self.log_epsilon)
        r_par = 0.5 * torch.exp(self.log_s_par)
        r_perp = 0.5 * torch.exp(self.log_s_perp)
        b_par = torch.exp(-0.5 * self.log_e_par)    # e_par^-1/2
        b_perp = torch.exp(-0.5 * self.log_e_perp)  # e_perp^-1/2

        i = self.pairs[:, 0]
        j = self.pairs[:, 1]
        d = minimum_image(positions[:, j] - positions[:, i], box)  # (B, P, 3) nm
        r = torch.linalg.norm(d, dim=-1)
        if self.use_cutoff:
            inside = r < self.cutoff
            # Out-of-cutoff pairs get a harmless stand-in direction/length so their masked branch stays finite.
            far = torch.zeros_like(d)
            far[:, :, 0] = self.cutoff
            d = torch.where(inside.unsqueeze(-1), d, far)
            r = torch.where(inside, r, torch.full_like(r, self.cutoff))
        else:
            inside = torch.ones_like(r, dtype=torch.bool)
        rhat = d / r.unsqueeze(-1)
        u = axes[:, :, :, 0]
        ui = u[:, i]
        uj = u[:, j]
        c = (ui * uj).sum(-1)
        xi = (rhat * ui).sum(-1)
        xj = (rhat * uj).sum(-1)

        g_quad, g_det = _quad_inverse_and_det(2.0 * r_perp * r_perp, r_par * r_par - r_perp * r_perp, c, xi, xj)
        b_quad, _ = _quad_inverse_and_det(2.0 * b_perp, b_par - b_perp, c, xi, xj)
        sigma12 = 1.0 / torch.sqrt(0.5 * g_quad)
        h12 = r - sigma12
        rho = sigma / (h12 + sigma)
        rho6 = rho ** 6
        u_r = 4.0 * epsilon * (rho6 * rho6 - rho6)
        s_shape = (r_par * r_perp + r_perp * r_perp) * torch.sqrt(r_par * r_perp)
        eta = torch.sqrt(2.0 * s_shape * s_shape / g_det)
        chi = (2.0 * b_quad) ** 2
        e = u_r * eta * chi
        if self.use_switch:
            t = ((r - self.switch_distance) / (self.cutoff - self.switch_distance)).clamp(min=0.0)
            sw = 1.0 + t * t * t * (-10.0 + t * (15.0 - 6.0 * t))
            e = e * sw
        e = torch.where(inside, e, torch.zeros_like(e))
        return e.sum(1)

    @torch.jit.unused
    def physical_parameters(self) -> dict:
        """Current parameters as floats: sigma, s_par, s_perp (nm), epsilon (kJ/mol), e_par, e_perp
        (dimensionless), and the identifiable combinations epsilon_eff = epsilon * e_perp (kJ/mol),
        e_ratio = e_par / e_perp and aspect_ratio = s_par / s_perp (dimensionless)."""
        out = {name: float(torch.exp(getattr(self, "log_" + name)).detach()) for name in PARAMETER_NAMES}
        out["epsilon_eff"] = out["epsilon"] * out["e_perp"]
        out["e_ratio"] = out["e_par"] / out["e_perp"]
        out["aspect_ratio"] = out["s_par"] / out["s_perp"]
        return out
