"""Neural CG potential: a small SchNet-like, SE(3)-invariant message-passing network on the bead graph.

Units: positions and box in nm, energy in kJ/mol, cutoff in nm.

Graph: every bead pair (i < j) closer than ``cutoff`` (minimum image when a box is given) is an edge; the
pair list is a :class:`enpcg.neighbors.PairList` (dense, vesin's cell list or a fixed-shape cell list), cut at the
cutoff at each call. Excluded pairs are not
dropped: each pair carries its bond-graph class (0 = other, 1/2/3 = 1-2/1-3/1-4 neighbours along CG bonds,
from ``CGTopology.bond_graph_distances(3)``), embedded and fed to the filter networks together with a Bessel
radial basis of r. Every filter is multiplied by a polynomial envelope that goes to zero with its first two
derivatives at the cutoff, so energy and forces vanish smoothly there.

Energy: an explicit pair energy (an MLP of the edge features, plus a learned repulsive core for non-bonded
pairs) and a many-body branch: bead states start from a type embedding, are updated by ``n_layers``
continuous-filter convolutions with residual updates, and a per-bead MLP gives bead energies that are summed.
The inputs are distances and graph classes only, so the energy is invariant to rotations, translations,
reflections and to permutations of beads of the same type with the same bonded environment.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import EnpcgError
from ..neighbors import PairList, frame_sum, lookup, pair_keys, parse_pair_list
from .base import CGModel, register_model
from .radial import bessel_basis, polynomial_envelope

N_PAIR_CLASSES = 4  # other, 1-2, 1-3, 1-4


def pair_classes(topology, pairs: np.ndarray) -> np.ndarray:
    """(P,) int class of each pair (P, 2), i < j: bond-graph distance 1..3, or 0 for any other pair."""
    n = topology.n_beads
    cls = np.zeros(len(pairs), dtype=np.int64)
    if len(pairs) == 0:
        return cls
    lookup = {i * n + j: d for i, j, d in topology.bond_graph_distances(3)}
    keys = pairs[:, 0] * n + pairs[:, 1]
    for k, key in enumerate(keys.tolist()):
        cls[k] = lookup.get(key, 0)
    return cls


class Envelope(torch.nn.Module):
    """Polynomial cutoff (DimeNet, p=6): 1 at r=0, 0 with zero 1st and 2nd derivative at r=rc."""

    def __init__(self, cutoff: float, p: int = 6):
        super().__init__()
        self.cutoff = cutoff
        self.p = float(p)

    def forward(self, r: Tensor) -> Tensor:
        return polynomial_envelope(r, self.cutoff, self.p)


class InteractionBlock(torch.nn.Module):
    """One SchNet interaction: x_i += MLP(sum_j W_ij * Lin(x)_j) with filters W_ij from the edge MLP."""

    def __init__(self, hidden: int):
        super().__init__()
        self.in2f = torch.nn.Linear(hidden, hidden, bias=False)
        self.f2out = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, w: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """x (N, hidden) bead states; w (E, hidden) filters of the undirected edges a - b (E,), which carry a
        message each way (two passes instead of concatenated directed copies: no (2E, hidden) copies)."""
        y = self.in2f(x)
        msg = torch.zeros_like(y).index_add_(0, b, w * y.index_select(0, a))
        return self.update(x, msg.index_add_(0, a, w * y.index_select(0, b)))

    def update(self, x: Tensor, msg: Tensor) -> Tensor:
        """Residual update of states x (N, hidden) from summed messages msg (N, hidden)."""
        return x + self.out(torch.nn.functional.silu(self.f2out(msg)))


@register_model("neural")
class NeuralModel(CGModel):
    """SchNet-like CG energy (kJ/mol) of bead positions (nm): an explicit pair channel plus a many-body branch.

    E / energy_scale = sum_edges env(r) [phi(r, class, type pair) + core(r)] + sum_i [MLP(x_i) - MLP(x_i^0)]

    * phi: a small MLP on the edge features (Bessel basis of r, bond-graph class, type pair). The pair channel
      represents pair-additive interactions exactly.
    * core (``core=True``): softplus(a_AB) (cutoff / 2r)^12 on non-bonded pairs (class 0), a_AB learned per
      type pair. The data sample short distances sparsely and a sine basis extrapolates below them with a
      force that turns over; the core keeps a monotone wall there (and keeps MD out of collapse).
    * many-body branch: x_i is the bead state after ``n_layers`` interaction blocks, x_i^0 the state of the
      isolated bead (separated beads have zero energy). Its last layer starts at zero, so an untrained model
      is a pair model. Liquid data cannot tell a pair force from a mean-field many-body term; fits that must
      give right pair curves decay the branch's weights (:meth:`optimizer_groups`, trainer ``weight_decay``).

    Config
    ------
    cutoff : float, nm, interaction range (must not exceed half the smallest box width in periodic use)
    n_rbf : int, number of Bessel radial basis functions
    hidden : int, width of bead states and filters
    n_layers : int, number of interaction blocks (0: pair channel only)
    pair_term : bool, whether the explicit pair channel (and its core) is used
    core : bool, whether the pair channel has the repulsive core
    energy_scale : float, kJ/mol, the network's unit of energy (larger values let steep walls be learned in
        fewer steps)
    seed : int, seed of the weight initialisation (the global RNG is left untouched)
    pair_list : how edges are found (:mod:`enpcg.neighbors`): "auto", "dense", "vesin" or a "cells" dict
    """

    def __init__(self, topology, cutoff: float = 1.0, n_rbf: int = 8, hidden: int = 16, n_layers: int = 2,
                 pair_term: bool = True, core: bool = True, energy_scale: float = 1.0, seed: int = 0,
                 pair_list="auto"):
        super().__init__(topology)
        cutoff, n_rbf, hidden, n_layers = float(cutoff), int(n_rbf), int(hidden), int(n_layers)
        energy_scale = float(energy_scale)
        for name, value, ok, rule in (("cutoff", cutoff, cutoff > 0, "> 0 nm"), ("n_rbf", n_rbf, n_rbf >= 1, ">= 1"),
                                      ("hidden", hidden, hidden >= 2, ">= 2"),
                                      ("n_layers", n_layers, n_layers >= 0, ">= 0"),
                                      ("energy_scale", energy_scale, energy_scale > 0, "> 0 kJ/mol")):
            if not ok:
                raise EnpcgError(f"neural model config field {name!r}: received {value}; it must be {rule}")
        if n_layers == 0 and not pair_term:
            raise EnpcgError("neural model config: n_layers=0 with pair_term=false leaves no energy term; set "
                             "n_layers >= 1 or pair_term: true")
        self.config = {"cutoff": cutoff, "n_rbf": n_rbf, "hidden": hidden, "n_layers": n_layers,
                       "pair_term": bool(pair_term), "core": bool(core), "energy_scale": float(energy_scale),
                       "seed": int(seed)}
        self.cutoff = cutoff
        self.hidden = hidden
        self.n_rbf = n_rbf
        self.n_layers = n_layers
        self.pair_term = bool(pair_term)
        self.energy_scale = float(energy_scale)
        self.core = bool(core) and self.pair_term

        # Graph buffers are rebuilt from the topology, not saved: the weights alone (the state dict) can be
        # bound to another system with the same bead types (e.g. two isolated beads to plot a pair curve).
        # Excluded pairs are not dropped (they carry their bond-graph class), so the pair list excludes none;
        # the classes of 1-2, 1-3 and 1-4 pairs are looked up by pair key.
        n = topology.n_beads
        graph = np.asarray(topology.bond_graph_distances(3), dtype=np.int64).reshape(-1, 3)
        keys = graph[:, 0] * n + graph[:, 1]
        order = np.argsort(keys)
        self.register_buffer("types", torch.as_tensor(topology.type_index(), dtype=torch.long).reshape(-1),
                             persistent=False)
        self.register_buffer("pair_type_matrix", torch.as_tensor(topology.pair_type_matrix(), dtype=torch.long),
                             persistent=False)
        self.register_buffer("class_keys", torch.as_tensor(keys[order]), persistent=False)
        self.register_buffer("class_values", torch.as_tensor(graph[order, 2]), persistent=False)
        self.pair_list = PairList(n, cutoff, np.zeros((0, 2), dtype=np.int64), pair_list, compact=True)
        self.config["pair_list"] = parse_pair_list(pair_list)

        n_types = max(1, len(topology.type_names()))
        width = max(1, n_layers) * hidden
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.type_embedding = torch.nn.Embedding(n_types, hidden)
            self.class_embedding = torch.nn.Embedding(N_PAIR_CLASSES, hidden)
            self.pair_type_embedding = torch.nn.Embedding(n_types * (n_types + 1) // 2, hidden)
            self.filter_in = torch.nn.Linear(n_rbf, hidden)
            # One filter layer for all blocks (its output is split per block): a single pass over the edges.
            self.filter_out = torch.nn.Linear(hidden, width)
            self.pair_mid = torch.nn.Linear(hidden, hidden)
            self.pair_out = torch.nn.Linear(hidden, 1)
            # Repulsive core of non-bonded pairs: amplitude per type pair through softplus (>= 0); it starts
            # weak (softplus(-3) = 0.05 energy_scale at r = cutoff/2).
            self.core_logit = torch.nn.Parameter(torch.full((n_types * (n_types + 1) // 2,), -3.0))
            self.blocks = torch.nn.ModuleList([InteractionBlock(hidden) for _ in range(n_layers)])
            self.readout1 = torch.nn.Linear(hidden, hidden // 2)
            self.readout2 = torch.nn.Linear(hidden // 2, 1)
            torch.nn.init.zeros_(self.readout2.weight)
            torch.nn.init.zeros_(self.readout2.bias)
        self.envelope = Envelope(cutoff)

    def _rbf(self, r: Tensor) -> Tensor:
        """Bessel basis sqrt(2/rc) sin(n pi r / rc) / r, (E, n_rbf), for r (E,) nm."""
        return bessel_basis(r, self.cutoff, self.n_rbf)

    @torch.jit.export
    def batch_energy(self, positions: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """Energies (B,) kJ/mol of positions (B, n, 3) nm with box (B, 3, 3) nm rows or None."""
        n_frames = positions.shape[0]
        n = positions.shape[1]
        frame, i, j, d = self.pair_list(positions, box)
        ii = i + frame * n
        jj = j + frame * n
        r = torch.linalg.norm(d, dim=-1)
        pair_class = lookup(self.class_keys, self.class_values, pair_keys(i, j, n), 0)
        pair_type = self.pair_type_matrix[self.types[i], self.types[j]]
        env = self.envelope(r).unsqueeze(-1)

        # Edge features: radial basis, bond-graph class and type pair (the embeddings act as biases of the
        # first layer); everything that reaches the energy from an edge is multiplied by the envelope.
        h = torch.nn.functional.silu(self.filter_in(self._rbf(r)) + self.class_embedding(pair_class)
                                     + self.pair_type_embedding(pair_type))
        energy = torch.zeros(n_frames, dtype=positions.dtype, device=positions.device)
        if self.pair_term:
            e_pair = self.pair_out(torch.nn.functional.silu(self.pair_mid(h)))
            if self.core:
                amp = torch.nn.functional.softplus(self.core_logit[pair_type])
                amp = torch.where(pair_class == 0, amp, torch.zeros_like(amp))
                e_pair = e_pair + (amp * torch.pow(0.5 * self.cutoff / r, 12.0)).unsqueeze(-1)
            e_pair = e_pair * env
            energy = energy + frame_sum(e_pair.squeeze(-1), frame, n_frames)
        if self.n_layers > 0:
            # split, not slices: a slice's backward zero-fills the whole (E, width) gradient once per block
            w_blocks = (self.filter_out(h) * env).split(self.hidden, dim=1)
            x0 = self.type_embedding(self.types)  # (n, hidden)
            x = x0.repeat(n_frames, 1)  # (B * n, hidden)
            x_free = x0  # the same beads with no neighbours
            k = 0
            for block in self.blocks:
                x = block(x, w_blocks[k], ii, jj)
                x_free = block.update(x_free, torch.zeros_like(x_free))
                k += 1
            # Bead energies relative to isolated beads, so that separated beads have zero energy.
            e_bead = self._bead_energy(x).reshape(n_frames, n) - self._bead_energy(x_free)
            energy = energy + e_bead.sum(dim=1)
        return self.pair_list.poison(energy * self.energy_scale)

    @torch.jit.unused
    def optimizer_groups(self, weight_decay: float) -> list:
        """Parameter groups for the trainer: weight decay on the many-body branch (blocks, bead embedding and
        readout) only. Liquid data cannot tell a pair force from a mean-field many-body term; the decay makes
        the fit prefer the pair channel, so that pair curves come out right."""
        mb_names = ("blocks.", "readout1.", "readout2.", "type_embedding.", "filter_out.")
        mb, rest = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (mb if name.startswith(mb_names) else rest).append(p)
        return [{"params": mb, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]

    def _bead_energy(self, x: Tensor) -> Tensor:
        """Per-bead energies (N,) kJ/mol from bead states x (N, hidden)."""
        return self.readout2(torch.nn.functional.silu(self.readout1(x))).squeeze(-1)
