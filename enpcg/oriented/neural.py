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

Only (frame, pair) entries with r < cutoff are evaluated (selected without gradient, then recomputed with
autograd). Options: ``contact`` (a learned orientation-dependent contact distance sigma(f), the Gay–Berne
inductive bias: the MLPs read a radial basis of the gap h = r - sigma(f) + contact_width and an anisotropic
LJ core in h is added), ``shape_channels`` (Berne–Pechukas features with learned anisotropies, in which the
log contact distance and log strength of uniaxial ellipsoids are linear: a log-linear contact head),
``apolar`` (head-tail symmetric director features, MLPs evaluated once per pair) and ``switch_distance``
(OpenMM-style quintic switch instead of the polynomial envelope).
"""
from typing import Optional, Tuple

import math

import numpy as np
import torch
from torch import Tensor

from ..errors import EnpcgError
from ..geometry import minimum_image
from ..models.base import register_model
from ..models.radial import polynomial_envelope
from .base import OrientedModel
from .pairs import FRAME_PARITY, FRAME_SWAP, FRAME_SWAP_SIGN, director_features, frame_features, \
    nonbonded_pairs, pair_displacements


class _MLP(torch.nn.Module):
    def __init__(self, n_in: int, hidden: int, depth: int, n_out: int = 1):
        super().__init__()
        layers = []
        width = n_in
        for _ in range(depth):
            layers.append(torch.nn.Linear(width, hidden))
            width = hidden
        self.hidden_layers = torch.nn.ModuleList(layers)
        self.out = torch.nn.Linear(width, n_out)
        self.n_out = n_out
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden_layers:
            x = torch.nn.functional.silu(layer(x))
        x = self.out(x)
        if self.n_out == 1:
            return x.squeeze(-1)
        return x


def _smooth_positive(h: Tensor, h_min: float) -> Tensor:
    """h where h >= h_min, else h_min exp(h / h_min - 1): positive, continuous with a continuous slope."""
    return torch.where(h >= h_min, h, h_min * torch.exp(torch.clamp(h, max=h_min) / h_min - 1.0))


@register_model("oriented_neural")
class OrientedNeuralModel(OrientedModel):
    """Neural pair energy of oriented beads (see module docstring).

    Parameters
    ----------
    topology : CGTopology whose beads are all "director" or all "frame" beads
    cutoff : float, nm, centre-centre cutoff (the envelope takes the energy smoothly to zero there)
    n_rbf : int, radial features sin(n pi x / cutoff), n = 1..n_rbf, of x = r (or x = h with ``contact``)
    hidden, depth : int, width and number of hidden layers of each MLP
    chiral : bool, include the parity-odd (pseudoscalar) channel
    core_radius : float or None, nm: a repulsive isotropic core softplus(a) (core_radius / r)^12 with a learned
        amplitude a (starts at 0.05 energy_scale), a safety net against overlaps in simulation
    energy_scale : float, kJ/mol, unit of the networks' output
    periodic : bool, minimum image with the box
    seed : int, weight initialisation seed (the global RNG is untouched)
    contact : bool, learned orientation-dependent contact distance (the Gay–Berne inductive bias): a small MLP
        of the parity-even, exchange-symmetrised pair features gives sigma(f) = floor + softplus(.) (nm,
        floor = contact_init / 2, starts at contact_init) and a log-amplitude modulation; the pair MLPs read
        the radial basis of the surface gap h = r - sigma(f) + contact_width instead of r, and an anisotropic
        repulsive core softplus(b + m(f)) (contact_width / h)^12 is added (h kept positive smoothly below
        contact_width / 10). Default False (the old model).
    contact_init : float or None, nm, initial contact distance (default core_radius, else 0.5 nm)
    contact_width : float or None, nm, width s0 of the gap h (default contact_init)
    contact_hidden : int, width of the contact MLP (one hidden layer)
    apolar : bool, director beads only: head-tail symmetric features (a^2, b^2, c^2, abc, cp, abp), so the
        energy is unchanged by u -> -u of either bead. Default False (polar features a, b, c, p).
    shape_channels : int, apolar director beads with ``contact`` only: K Berne–Pechukas channels with learned
        anisotropies chi_k = 0.99 tanh(theta_k) (starting spread over [-0.5, 0.9]). With
        q_k = (a^2 + b^2 - 2 chi_k a b c) / (1 - chi_k^2 c^2) the features ln(1 - chi_k q_k) and
        ln(1 - chi_k^2 c^2) are added to the parity-even features (both finite for |chi_k| < 1). Why: for two
        uniaxial ellipsoids, r_hat^T G^-1 r_hat with G = A_i^T S^2 A_i + A_j^T S^2 A_j is a constant times
        1 - chi q(chi), and det G a constant times 1 - chi^2 c^2, so the logarithms of the contact distance and
        of the strength of any ellipsoid pair (Berne–Pechukas, Gay–Berne) are LINEAR in these features. The
        contact head then becomes log-linear with a neural correction: sigma(f) = contact_init exp(L(f) +
        m_1(f)) and the core amplitude exp(b + L'(f) + m_2(f)) (L, L' linear, zero at the start; m the contact
        MLP). A 1% error of the contact distance is a ~13% error of the force on the r^-12 wall, which a
        softplus of an MLP of polynomial features did not get below (measured on Gay–Berne data). Default 0.
    """

    def __init__(self, topology, cutoff: float = 1.2, n_rbf: int = 8, hidden: int = 32, depth: int = 2,
                 chiral: bool = True, core_radius: Optional[float] = None, energy_scale: float = 1.0,
                 periodic: bool = True, seed: int = 0, contact: bool = False, contact_init: Optional[float] = None,
                 contact_width: Optional[float] = None, contact_hidden: int = 16, contact_depth: Optional[float] = None,
                 contact_lj: bool = True, apolar: bool = False, switch_distance: Optional[float] = None,
                 shape_channels: int = 0):
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
        if apolar and not self.director:
            raise EnpcgError("oriented_neural config: apolar=True needs director beads (frame beads have no "
                             "head-tail symmetry)")
        shape_channels = int(shape_channels)
        if shape_channels < 0 or (shape_channels > 0 and not (self.director and apolar and contact)):
            raise EnpcgError(f"oriented_neural config: shape_channels {shape_channels} must be >= 0, and > 0 needs "
                             "director beads with apolar=True and contact=True (the Berne-Pechukas channels are "
                             "head-tail symmetric uniaxial invariants that shape the contact distance)")
        self.n_shape = shape_channels
        c_init = float(contact_init) if contact_init is not None else \
            (float(core_radius) if core_radius is not None else 0.5)
        c_width = float(contact_width) if contact_width is not None else c_init
        contact_hidden = int(contact_hidden)
        if contact and (c_init <= 0 or c_width <= 0 or contact_hidden < 2):
            raise EnpcgError(f"oriented_neural config: contact_init {c_init} nm (> 0), contact_width {c_width} nm "
                             f"(> 0), contact_hidden {contact_hidden} (>= 2) out of range")
        self.config = {"cutoff": cutoff, "n_rbf": n_rbf, "hidden": hidden, "depth": depth, "chiral": bool(chiral),
                       "core_radius": None if core_radius is None else float(core_radius),
                       "energy_scale": float(energy_scale), "periodic": bool(periodic), "seed": int(seed),
                       "contact": bool(contact), "contact_init": None if contact_init is None else c_init,
                       "contact_width": None if contact_width is None else c_width,
                       "contact_hidden": contact_hidden,
                       "contact_depth": None if contact_depth is None else float(contact_depth),
                       "contact_lj": bool(contact_lj), "apolar": bool(apolar),
                       "switch_distance": None if switch_distance is None else float(switch_distance),
                       "shape_channels": shape_channels}
        if switch_distance is not None and not 0.0 <= float(switch_distance) < cutoff:
            raise EnpcgError(f"oriented_neural config: switch_distance {switch_distance} nm must lie in [0, cutoff "
                             f"{cutoff})")
        self.use_switch = switch_distance is not None
        self.switch_distance = float(switch_distance) if switch_distance is not None else 0.0
        self.cutoff = cutoff
        self.n_rbf = n_rbf
        self.chiral = bool(chiral)
        self.periodic = bool(periodic)
        self.energy_scale = float(energy_scale)
        self.use_core = core_radius is not None
        self.core_radius = float(core_radius) if core_radius is not None else 1.0
        self.apolar = bool(apolar)
        self.contact = bool(contact)
        self.contact_lj = bool(contact_lj)
        depth0 = float(contact_depth) if contact_depth is not None else 0.05 * float(energy_scale)
        if contact and depth0 <= 0:
            raise EnpcgError(f"oriented_neural config: contact_depth {depth0} kJ/mol (> 0) out of range")
        # the contact core starts as 4 depth0 x^12 (repulsive) or 4 depth0 (x^12 - x^6) (x = width / h)
        depth_logit = float(math.log(math.expm1(4.0 * depth0 / float(energy_scale))))
        if shape_channels > 0:
            depth_logit = float(math.log(4.0 * depth0 / float(energy_scale)))  # exp instead of softplus
        self.contact_init = c_init
        self.contact_width = c_width
        self.contact_floor = 0.5 * c_init
        # softplus(offset) = contact_init - floor: sigma starts at contact_init (the MLP's output starts at 0)
        self.contact_offset = float(math.log(math.expm1(c_init - self.contact_floor)))
        n_out_odd = 1
        if self.director and self.apolar:
            # features are already invariant under i <-> j and u -> -u: 7 parity-even ones and 2 pseudoscalars;
            # the MLPs run once per pair (parity/swap buffers unused)
            n_feat = 7 + 2 * shape_channels
            n_out_odd = 2
            parity = np.ones(n_feat)
            swap = list(range(n_feat))
            swap_sign = np.ones(n_feat)
        elif self.director:
            n_feat = 4
            parity = np.array([1.0, 1.0, 1.0, -1.0])
            swap = [1, 0, 2, 3]
            swap_sign = np.array([-1.0, -1.0, 1.0, 1.0])
        else:
            n_feat = 15
            parity, swap, swap_sign = FRAME_PARITY, FRAME_SWAP, FRAME_SWAP_SIGN
        self.n_even = n_feat
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
            self.odd = _MLP(n_rbf + n_feat, hidden, depth, n_out_odd)
            self.core_logit = torch.nn.Parameter(torch.full((n_pt,), -3.0))
            # chi_k = 0.99 tanh(theta_k): anisotropies of the Berne-Pechukas features, spread over [-0.5, 0.9]
            # (a non-persistent empty buffer without shape channels: saved models keep their state-dict keys)
            if shape_channels > 0:
                chi0 = np.linspace(0.9, -0.5, shape_channels) if shape_channels > 1 else np.full(1, 0.6)
                self.shape_logit = torch.nn.Parameter(torch.as_tensor(np.arctanh(chi0 / 0.99), dtype=torch.float32))
            else:
                self.register_buffer("shape_logit", torch.zeros(0), persistent=False)
            if self.contact:
                # outputs: (contact distance, log-amplitude modulation of the anisotropic core)
                self.contact_net = _MLP(n_feat, contact_hidden, 1, 2)
                self.contact_type = torch.nn.Embedding(n_pt, 2)
                torch.nn.init.zeros_(self.contact_type.weight)
                self.contact_logit = torch.nn.Parameter(torch.full((n_pt,), depth_logit))
                if shape_channels > 0:
                    self.contact_linear = torch.nn.Linear(n_feat, 2)
                    torch.nn.init.zeros_(self.contact_linear.weight)
                    torch.nn.init.zeros_(self.contact_linear.bias)
                else:
                    self.contact_linear = torch.nn.Identity()
            else:
                # placeholders without weights (TorchScript needs the attributes; the state dict stays the old one)
                self.contact_net = torch.nn.Identity()
                self.contact_type = torch.nn.Identity()
                self.contact_linear = torch.nn.Identity()
                self.register_buffer("contact_logit", torch.zeros(n_pt), persistent=False)

    def _pairs_within(self, positions: Tensor, box: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """(frame, pair) entries with r < cutoff, selected without gradient: frame (K,), pair index (K,) and
        their minimum-image vectors R_j - R_i (K, 3) nm, recomputed with autograd."""
        b = box if self.periodic else None
        with torch.no_grad():
            r_all = torch.linalg.norm(pair_displacements(positions, self.pairs, b), dim=-1)
            sel = torch.nonzero(r_all < self.cutoff)
        frame = sel[:, 0]
        pidx = sel[:, 1]
        i = self.pairs[pidx, 0]
        j = self.pairs[pidx, 1]
        d = (positions[frame, j] - positions[frame, i]).unsqueeze(1)
        if b is not None:
            d = minimum_image(d, b.index_select(0, frame))
        return frame, pidx, d.squeeze(1)

    def _pair_features(self, d: Tensor, qi: Tensor, qj: Tensor) -> Tuple[Tensor, Tensor]:
        """Centre distances r (K,) nm and ordered-pair features (K, n_feat)."""
        r = torch.linalg.norm(d, dim=-1)
        r_hat = d / r.unsqueeze(-1)
        if self.director:
            ft = director_features(r_hat, qi[..., 0], qj[..., 0])
            if self.apolar:
                # head-tail and exchange invariants: a^2 + b^2, a^2 b^2, c^2, abc (even), cp, abp (odd) and the
                # even products of the odd ones; the last two columns are the pseudoscalars cp, abp
                a, b, c, p = ft[0], ft[1], ft[2], ft[3]
                a2, b2, cp, abp = a * a, b * b, c * p, a * b * p
                cols = [a2 + b2, a2 * b2, c * c, a * b * c, cp * cp, cp * abp, abp * abp]
                if self.n_shape > 0:
                    chi = 0.99 * torch.tanh(self.shape_logit.to(a.dtype))
                    det = 1.0 - chi * chi * (c * c).unsqueeze(-1)
                    q = ((a2 + b2).unsqueeze(-1) - 2.0 * chi * (a * b * c).unsqueeze(-1)) / det
                    f = torch.cat([torch.stack(cols, dim=-1), torch.log(1.0 - chi * q), torch.log(det),
                                   torch.stack([cp, abp], dim=-1)], dim=-1)
                else:
                    f = torch.stack(cols + [cp, abp], dim=-1)
            else:
                f = torch.stack(ft, dim=-1)
        else:
            f = frame_features(r_hat, qi, qj)
        return r, f

    @torch.jit.export
    def batch_energy_parts(self, positions: Tensor, axes: Tensor, box: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(even, odd) energies (B,) kJ/mol: the mirror-symmetric part and the pseudoscalar (chiral) part."""
        frame, pidx, d = self._pairs_within(positions, box)
        qi = axes[frame, self.pairs[pidx, 0]]
        qj = axes[frame, self.pairs[pidx, 1]]
        r, f = self._pair_features(d, qi, qj)
        pt = self.pair_type[pidx]
        pseudo = f
        if self.apolar:
            pseudo = f[:, self.n_even:]
            f = f[:, :self.n_even]
        parity = self.parity.to(f.dtype)
        f_swap = f.index_select(1, self.swap) * self.swap_sign.to(f.dtype)
        variants = [f] if self.apolar else [f, f * parity, f_swap, f_swap * parity]
        weight = 1.0 / len(variants)
        x = r
        core = torch.zeros_like(r)
        if self.contact:
            c = self.contact_type(pt).to(r.dtype)
            for g in variants:
                c = c + weight * self.contact_net(g)
            if self.n_shape > 0:
                c = c + self.contact_linear(f)
                sigma = self.contact_init * torch.exp(c[:, 0])
                amp = torch.exp(self.contact_logit[pt].to(r.dtype) + c[:, 1])
            else:
                sigma = self.contact_floor + torch.nn.functional.softplus(c[:, 0] + self.contact_offset)
                amp = torch.nn.functional.softplus(self.contact_logit[pt].to(r.dtype) + c[:, 1])
            h = r - sigma + self.contact_width
            # the floor only guards against 0 (-> inf - inf = NaN) far outside any physical configuration
            hc = torch.clamp(_smooth_positive(h, 0.1 * self.contact_width), min=1e-6 * self.contact_width)
            x6 = torch.pow(self.contact_width / hc, 6.0)
            core = core + amp * (x6 * x6 - x6) if self.contact_lj else core + amp * x6 * x6
            x = h
        freqs = torch.arange(1, self.n_rbf + 1, dtype=r.dtype, device=r.device) * (math.pi / self.cutoff)
        radial = torch.sin(x.unsqueeze(-1) * freqs) + self.pair_type_embedding(pt).to(r.dtype)
        if self.use_switch:
            xs = torch.clamp((r - self.switch_distance) / (self.cutoff - self.switch_distance), 0.0, 1.0)
            env = 1.0 + xs * xs * xs * (-10.0 + xs * (15.0 - 6.0 * xs))
        else:
            env = polynomial_envelope(r, self.cutoff)
        even = core
        odd = torch.zeros_like(r)
        if self.apolar:
            xa = torch.cat([radial, f], dim=-1)
            even = even + self.even(xa)
            if self.chiral:
                odd = odd + (self.odd(xa) * pseudo).sum(-1)
        for k in range(len(variants) // 2):
            g = variants[2 * k]
            gp = variants[2 * k + 1]
            xa = torch.cat([radial, g], dim=-1)
            xp = torch.cat([radial, gp], dim=-1)
            even = even + self.even(xa) + self.even(xp)
            if self.chiral:
                odd = odd + self.odd(xa) - self.odd(xp)
        if self.use_core:
            amp0 = torch.nn.functional.softplus(self.core_logit[pt]).to(r.dtype)
            even = even + amp0 * torch.pow(self.core_radius / r, 12.0)
        n_frames = positions.shape[0]
        zero = torch.zeros(n_frames, dtype=positions.dtype, device=positions.device)
        even = zero.index_add(0, frame, even * env) * self.energy_scale
        odd = zero.index_add(0, frame, odd * env) * self.energy_scale
        return even, odd

    @torch.jit.export
    def batch_energy(self, positions: Tensor, axes: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """Energies (B,) kJ/mol of positions (B, n, 3) nm and axes (B, n, 3, 3)."""
        even, odd = self.batch_energy_parts(positions, axes, box)
        return even + odd
