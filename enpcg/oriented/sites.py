"""Rigid interaction sites (kind ``"rigid_sites"``) and a sum of oriented models (kind ``"oriented_sum"``).

``rigid_sites``: every bead carries k Lennard-Jones sites at body-frame offsets p_a (nm): site a of bead I sits
at R_I + Q_I p_a. Energy (kJ/mol) = sum over interacting bead pairs and site pairs of
4 eps ((sigma/r)^12 - (sigma/r)^6) S(r), cut at ``cutoff``, with OpenMM's switching function
S = 1 - 6x^5 + 15x^4 - 10x^3, x = (r - r_sw)/(r_c - r_sw) for r_sw < r < r_c (NonbondedForce's). The
offsets, sigma and epsilon can be fitted. A rigid molecule of LJ sites mapped to one frame bead is this
model exactly (the Lewis-Wahnstrom ortho-terphenyl, ``systems/otp.py``); initial offsets come from the
mapped atoms (:func:`enpcg.oriented.fit.mean_body_coordinates`).
"""
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import EnpcgError
from ..models.base import create_model, register_model
from .base import OrientedModel
from ..geometry import minimum_image
from .pairs import nonbonded_pairs, pair_displacements

SITE_PARAMETERS = ("sites", "sigma", "epsilon")


@register_model("rigid_sites")
class RigidSitesModel(OrientedModel):
    """Lennard-Jones sites fixed in each bead's body frame (see module docstring); one bead type.

    Parameters
    ----------
    sites : (k, 3) nm body-frame offsets; sigma nm; epsilon kJ/mol; cutoff, switch_distance nm
    (switch_distance None: plain truncation); fit : names among "sites", "sigma", "epsilon" that are trained;
    periodic : bool.
    """

    def __init__(self, topology, sites, sigma: float, epsilon: float, cutoff: float = 1.2,
                 switch_distance: Optional[float] = None, fit=("sigma", "epsilon"), periodic: bool = True):
        super().__init__(topology)
        p = np.asarray(sites, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 3 or len(p) < 1:
            raise EnpcgError(f"rigid_sites config field 'sites': expected (k, 3) nm body-frame offsets; received "
                             f"shape {p.shape}")
        if len(set(topology.bead_types)) != 1:
            raise EnpcgError(f"rigid_sites supports one bead type; the topology has {topology.type_names()}")
        bad = [f for f in fit if f not in SITE_PARAMETERS]
        if bad:
            raise EnpcgError(f"rigid_sites config field 'fit': unknown {bad}; allowed {list(SITE_PARAMETERS)}")
        if not (sigma > 0 and epsilon > 0 and cutoff > 0):
            raise EnpcgError("rigid_sites config: sigma, epsilon and cutoff must be > 0")
        if switch_distance is not None and not 0 < switch_distance < cutoff:
            raise EnpcgError(f"rigid_sites config: switch_distance {switch_distance} nm must lie in (0, cutoff)")
        self.config = {"sites": p.tolist(), "sigma": float(sigma), "epsilon": float(epsilon), "cutoff": float(cutoff),
                       "switch_distance": None if switch_distance is None else float(switch_distance),
                       "fit": list(fit), "periodic": bool(periodic)}
        self.cutoff = float(cutoff)
        self.use_switch = switch_distance is not None
        self.switch_distance = float(switch_distance) if switch_distance is not None else float(cutoff)
        self.periodic = bool(periodic)
        values = {"sites": torch.as_tensor(p, dtype=torch.float64),
                  "log_sigma": torch.tensor(float(np.log(sigma)), dtype=torch.float64),
                  "log_epsilon": torch.tensor(float(np.log(epsilon)), dtype=torch.float64)}
        trainable = {"sites": "sites" in fit, "log_sigma": "sigma" in fit, "log_epsilon": "epsilon" in fit}
        for name, value in values.items():
            if trainable[name]:
                self.register_parameter(name, torch.nn.Parameter(value.clone()))
            else:
                self.register_buffer(name, value.clone())
        self.register_buffer("pairs", nonbonded_pairs(topology), persistent=False)

    @torch.jit.export
    def batch_energy(self, positions: Tensor, axes: Tensor, box: Optional[Tensor] = None) -> Tensor:
        b = box if self.periodic else None
        n_frames = positions.shape[0]
        # Bead pairs that can have a site pair within the cutoff, selected without gradient (a dense pass
        # over centre distances), then only those are recomputed with autograd.
        with torch.no_grad():
            reach = self.cutoff + 2.0 * torch.linalg.norm(self.sites, dim=-1).max()
            close = torch.linalg.norm(pair_displacements(positions, self.pairs, b), dim=-1) < reach
            sel = torch.nonzero(close)
        frame = sel[:, 0]
        pidx = sel[:, 1]
        i = self.pairs[pidx, 0]
        j = self.pairs[pidx, 1]
        d = (positions[frame, j] - positions[frame, i]).unsqueeze(1)                       # (E, 1, 3)
        sites = self.sites.to(axes.dtype).t()
        si = torch.matmul(axes[frame, i], sites).transpose(-1, -2)                         # (E, k, 3)
        sj = torch.matmul(axes[frame, j], sites).transpose(-1, -2)
        k = si.shape[1]
        rv = (d.unsqueeze(1) + sj.unsqueeze(1) - si.unsqueeze(2)).reshape(-1, k * k, 3)    # (E, k*k, 3)
        if b is not None:
            # minimum image of each site-site vector (as OpenMM does for the atoms): exact whenever the
            # cutoff is below half the box, even where the bead centres' nearest image is another one
            rv = minimum_image(rv, b.index_select(0, frame))
        r = torch.linalg.norm(rv, dim=-1).reshape(-1, k, k)
        sigma = torch.exp(self.log_sigma).to(r.dtype)
        eps = torch.exp(self.log_epsilon).to(r.dtype)
        inside = r < self.cutoff
        rs = torch.where(inside, r, torch.full_like(r, self.cutoff))  # no overflow far away
        x6 = torch.pow(sigma / rs, 6.0)
        e = 4.0 * eps * (x6 * x6 - x6)
        if self.use_switch:
            x = torch.clamp((rs - self.switch_distance) / (self.cutoff - self.switch_distance), 0.0, 1.0)
            e = e * (1.0 + x * x * x * (-10.0 + x * (15.0 - 6.0 * x)))
        e = torch.where(inside, e, torch.zeros_like(e)).sum(dim=(1, 2))
        out = torch.zeros(n_frames, dtype=positions.dtype, device=positions.device)
        return out.index_add(0, frame, e)

    @torch.jit.unused
    def physical_parameters(self) -> dict:
        return {"sigma": float(torch.exp(self.log_sigma).detach()), "epsilon": float(torch.exp(self.log_epsilon).detach()),
                "sites": self.sites.detach().cpu().numpy().tolist()}


@register_model("oriented_sum")
class OrientedSumModel(OrientedModel):
    """Energy = sum of oriented terms (each a ``{"kind", "config"}`` description or an OrientedModel), e.g. a
    Gay-Berne or rigid-site prior plus a neural correction."""

    def __init__(self, topology, terms: list):
        super().__init__(topology)
        modules = [t if isinstance(t, OrientedModel) else create_model(t["kind"], topology, **t.get("config", {}))
                   for t in terms]
        if not all(isinstance(m, OrientedModel) for m in modules):
            raise EnpcgError("oriented_sum: every term must be an oriented model (gay_berne, rigid_sites, "
                             "oriented_neural)")
        self.terms = torch.nn.ModuleList(modules)
        self.config = {"terms": [{"kind": m.kind, "config": m.config} for m in modules]}

    @torch.jit.export
    def batch_energy(self, positions: Tensor, axes: Tensor, box: Optional[Tensor] = None) -> Tensor:
        e = torch.zeros(positions.shape[0], dtype=positions.dtype, device=positions.device)
        for term in self.terms:
            e = e + term.batch_energy(positions, axes, box)
        return e
