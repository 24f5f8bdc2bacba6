"""E(3)-equivariant atomistic potential (NequIP-like), built on e3nn.

Units: positions and box in nm (box vectors are rows, OpenMM reduced form), energy in kJ/mol, forces in
kJ/mol/nm, cutoff in nm, virial in kJ/mol.

The model follows the CG model contract of :mod:`enpcg.models.base` (``forward(positions (n, 3), box (3, 3)
or None) -> energy ()``, ``batch_energy``, ``save_model``/``load_model``, ``export_forces``); its "topology"
is a :class:`~enpcg.topology.CGTopology` whose bead types are the atomic species (e.g. CH2/CH3 united atoms).

Network
-------
* species embedding: one-hot of the species index -> ``o3.Linear`` into the hidden irreps
  ``mul x 0e + mul x 1o + mul x 2e + ...`` up to ``l_max`` (natural parity, so reflections are symmetries);
* edges i -> j within ``cutoff``: spherical harmonics Y(r_ij / |r_ij|) up to ``l_max`` (component
  normalisation), Bessel radial basis sqrt(2/rc) sin(n pi r / rc) / r, and a polynomial envelope (p = 6)
  that multiplies every edge weight, so energy, forces and their first derivative vanish at the cutoff;
* ``n_layers`` interaction blocks: tensor-product convolution (``o3.TensorProduct``, "uvu" paths, weights
  from a radial MLP of the Bessel basis), scatter-sum over neighbours divided by sqrt(avg_neighbors), plus a
  self-interaction ``o3.Linear``, with ``correlation`` 2 (default) also a linear map of the invariant squares
  of the summed l <= 1 messages (a MACE-like product that reaches dihedral terms), then an ``e3nn.nn.Gate``
  (silu on scalars, sigmoid gates on l > 0), with a residual update x <- x + block(x);
* readout: per-atom energy = energy_scale * MLP(final scalars) + species_energy[species] (per-species shifts,
  a buffer the trainer sets from data); total energy = sum over atoms.

Neighbour lists: ``"dense"`` (all pairs, minimum image; exact, O(n^2), needs cutoff <= half the smallest box
width) or ``"vesin"`` (``vesin_torch.NeighborList``, cell list, O(n), any box). Both run in TorchScript.
Forces are -dE/dx by autograd of the one energy.
"""
from __future__ import annotations

import copy
import math
from typing import List, Optional

import torch
from e3nn import nn as e3nn_nn
from e3nn import o3
from e3nn.o3._spherical_harmonics import _spherical_harmonics
from torch import Tensor

from ..models.radial import bessel_basis, polynomial_envelope
from ..errors import EnpcgError
from ..geometry import minimum_image
from ..models.base import CGModel, register_model

NEIGHBOR_LISTS = ("dense", "vesin")
DENSE_MAX_ATOMS = 2000  # above this many atoms the default neighbour list is "vesin"


def _vesin():
    try:
        import vesin_torch
    except ImportError as e:
        raise EnpcgError(f"neighbor_list='vesin' needs vesin_torch, which failed to import ({e}); install it with "
                         "'pip install vesin-torch', or use neighbor_list='dense'") from None
    return vesin_torch


# The vesin neighbour list as TorchScript sees it; imported lazily so that the module imports without vesin.
try:
    from vesin_torch import NeighborList as _NeighborList
except ImportError:  # pragma: no cover - vesin is part of the environment
    _NeighborList = None


def hidden_irreps(mul: int, l_max: int) -> str:
    """Irreps string of the atom features: ``mul`` channels of each l <= l_max with parity (-1)^l."""
    return " + ".join(f"{mul}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(l_max + 1))


class SphericalHarmonics(o3.SphericalHarmonics):
    """``o3.SphericalHarmonics`` that survives ``copy.deepcopy`` and pickling.

    e3nn keeps a scripted function as an attribute, which cannot be copied; it is dropped from the state and
    scripted again on restore (``openmm_plugin.export`` deep-copies models before scripting them).
    """

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("sph_func", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.sph_func = torch.jit.script(_spherical_harmonics)


class BesselEnvelope(torch.nn.Module):
    """Bessel radial basis and the smooth cutoff envelope (DimeNet polynomial, p = 6).

    ``basis(r)``: (E, n_rbf) sqrt(2/rc) sin(n pi r / rc) / r for r (E,) nm.
    ``envelope(r)``: (E,) 1 - (p+1)(p+2)/2 d^p + p(p+2) d^(p+1) - p(p+1)/2 d^(p+2), d = r / rc, 0 beyond rc;
    it and its first two derivatives vanish at rc.
    """

    def __init__(self, cutoff: float, n_rbf: int, p: int = 6):
        super().__init__()
        self.cutoff = float(cutoff)
        self.n_rbf = int(n_rbf)
        self.p = float(p)

    def basis(self, r: Tensor) -> Tensor:
        return bessel_basis(r, self.cutoff, self.n_rbf)

    def envelope(self, r: Tensor) -> Tensor:
        return polynomial_envelope(r, self.cutoff, self.p)


class Interaction(torch.nn.Module):
    """One interaction block on features x (N, irreps_hidden.dim): returns the update (N, irreps_hidden.dim).

    update = Gate(Linear(A) + SelfLinear(x) [+ SquareLinear(A . A)]), A = sum_j TP(x_j, Y_ij; w(r_ij)) /
    sqrt(avg_neighbors). With ``correlation`` 2 the per-channel invariant squares A_c . A_c (dot products of
    each irrep channel with itself, which expand into products of pairs of neighbour messages) feed the
    scalars, as in MACE's product basis: one block then sees angles at the atom, two blocks see dihedrals.
    Plain NequIP (``correlation`` 1) adds messages linearly and reaches dihedrals only slowly (measured on
    the polyethylene melt: 3 blocks still missed 78% of the torsion forces after 10 minutes of training).
    """

    __constants__ = ["use_square", "square_dim"]  # TorchScript drops the branch of a False constant

    def __init__(self, irreps_hidden: str, irreps_sh: str, n_rbf: int, radial_hidden: int, avg_neighbors: float,
                 correlation: int = 2):
        super().__init__()
        ir_hidden = o3.Irreps(irreps_hidden)
        ir_sh = o3.Irreps(irreps_sh)
        allowed = {ir for _, ir in ir_hidden}
        # "uvu" convolution paths (one weight per channel and path, from the radial MLP), as NequIP.
        mid = []
        instructions = []
        for i1, (mul, ir1) in enumerate(ir_hidden):
            for i2, (_, ir2) in enumerate(ir_sh):
                for ir_out in ir1 * ir2:
                    if ir_out in allowed:
                        instructions.append((i1, i2, len(mid), "uvu", True))
                        mid.append((mul, ir_out))
        ir_mid, perm, _ = o3.Irreps(mid).sort()
        instructions = [(a, b, perm[c], mode, train) for a, b, c, mode, train in instructions]
        self.tp = o3.TensorProduct(ir_hidden, ir_sh, ir_mid, instructions, shared_weights=False,
                                   internal_weights=False)
        self.radial1 = torch.nn.Linear(n_rbf, radial_hidden)
        self.radial2 = torch.nn.Linear(radial_hidden, self.tp.weight_numel)
        scalars = o3.Irreps([(m, ir) for m, ir in ir_hidden if ir.l == 0])
        gated = o3.Irreps([(m, ir) for m, ir in ir_hidden if ir.l > 0])
        gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps > 0 else o3.Irreps("")
        self.gate = e3nn_nn.Gate(scalars, [torch.nn.functional.silu], gates,
                                 [torch.sigmoid] if gated.num_irreps > 0 else [], gated)
        if self.gate.irreps_out != ir_hidden:
            raise RuntimeError(f"gate output {self.gate.irreps_out} differs from the hidden irreps {ir_hidden}")
        self.linear = o3.Linear(ir_mid, self.gate.irreps_in)
        self.self_linear = o3.Linear(ir_hidden, self.gate.irreps_in)
        self.inv_sqrt_neighbors = 1.0 / math.sqrt(float(avg_neighbors))
        self.use_square = int(correlation) >= 2
        # Squares of the l <= 1 channels only: scalars and vectors carry the dihedral terms, and l = 2
        # squares would add cost for little.
        ir_sq = o3.Irreps([(m, ir) for m, ir in ir_mid if ir.l <= 1])
        self.square_dim = ir_sq.dim  # ir_mid is sorted by l: these channels come first
        if self.use_square:
            self.square = o3.ElementwiseTensorProduct(ir_sq, ir_sq, ["0e"])
            self.square_linear = o3.Linear(self.square.irreps_out, self.gate.irreps_in)
            with torch.no_grad():  # zero start: the block begins as NequIP and learns the products it needs
                self.square_linear.weight.zero_()
        else:
            self.square = torch.nn.Identity()
            self.square_linear = torch.nn.Identity()

    def forward(self, x: Tensor, sh: Tensor, rbf: Tensor, env: Tensor, src: Tensor, dst: Tensor) -> Tensor:
        """x (N, F); sh (E, irreps_sh.dim); rbf (E, n_rbf); env (E, 1); src, dst (E,) directed edges."""
        w = self.radial2(torch.nn.functional.silu(self.radial1(rbf))) * env
        msg = self.tp(x.index_select(0, src), sh, w)
        agg = torch.zeros(x.shape[0], msg.shape[1], dtype=msg.dtype, device=msg.device).index_add_(0, dst, msg)
        agg = agg * self.inv_sqrt_neighbors
        pre = self.linear(agg) + self.self_linear(x)
        if self.use_square:
            a = agg[:, :self.square_dim]
            pre = pre + self.square_linear(self.square(a, a))
        return self.gate(pre)


def _compile_e3nn(module: torch.nn.Module) -> None:
    """Replace, in place, every e3nn submodule by its compiled form (``e3nn.util.jit.compile``).

    e3nn modules carry a compile mode ("script" or "trace"); ``Gate``'s activations must be traced, which a
    plain ``torch.jit.script`` of the parent cannot do. Compiled children make the parent scriptable.
    """
    from e3nn.util.jit import compile as e3nn_compile
    from e3nn.util.jit import get_compile_mode

    for name, child in module.named_children():
        if isinstance(child, torch.jit.ScriptModule):
            continue
        if get_compile_mode(child) is not None:
            setattr(module, name, e3nn_compile(child))
        else:
            _compile_e3nn(child)


@register_model("equivariant")
class EquivariantModel(CGModel):
    """NequIP-like E(3)-equivariant potential: energy (kJ/mol) of atom positions (nm); see the module doc.

    Config
    ------
    cutoff : float, nm, interaction range (default 0.5)
    l_max : int, 0..3, highest rotation order of the features and spherical harmonics (default 1)
    n_layers : int, >= 1, number of interaction blocks (default 2)
    mul : int, >= 1, channels per irrep (default 16)
    n_rbf : int, >= 1, number of Bessel radial functions (default 8)
    radial_hidden : int, width of the radial MLP (default 16)
    avg_neighbors : float, > 0, the neighbour sum is divided by its square root (default 20; ~ neighbours
        within 0.5 nm in a united-atom melt; the trainer may set it from data)
    correlation : 1 (NequIP: messages enter linearly) or 2 (default: also the invariant squares of the summed
        messages, a MACE-like product that makes dihedral terms easy to learn); see :class:`Interaction`
    energy_scale : float, kJ/mol, unit of the network's per-atom energies (default 1)
    neighbor_list : "dense" | "vesin" | None; None picks "vesin" above 2000 atoms, else "dense"
    seed : int, seed of the weight initialisation (the global RNG is left untouched)

    The per-species energy shifts are the buffer ``species_energy`` (n_species,) kJ/mol, in the order of
    ``topology.type_names()``; they start at zero and are saved with the weights.
    """

    __jit_ignored_attributes__ = ["config", "topology"]

    def __init__(self, topology, cutoff: float = 0.5, l_max: int = 1, n_layers: int = 2, mul: int = 16,
                 n_rbf: int = 8, radial_hidden: int = 16, avg_neighbors: float = 20.0, energy_scale: float = 1.0,
                 neighbor_list: Optional[str] = None, seed: int = 0, correlation: int = 2):
        super().__init__(topology)
        cutoff, energy_scale, avg_neighbors = float(cutoff), float(energy_scale), float(avg_neighbors)
        l_max, n_layers, mul, n_rbf, radial_hidden = int(l_max), int(n_layers), int(mul), int(n_rbf), int(radial_hidden)
        for name, value, ok, rule in (
                ("cutoff", cutoff, cutoff > 0, "> 0 nm"), ("l_max", l_max, 0 <= l_max <= 3, "0, 1, 2 or 3"),
                ("n_layers", n_layers, n_layers >= 1, ">= 1"), ("mul", mul, mul >= 1, ">= 1"),
                ("n_rbf", n_rbf, n_rbf >= 1, ">= 1"), ("radial_hidden", radial_hidden, radial_hidden >= 1, ">= 1"),
                ("avg_neighbors", avg_neighbors, avg_neighbors > 0, "> 0"),
                ("correlation", correlation, correlation in (1, 2), "1 or 2"),
                ("energy_scale", energy_scale, energy_scale > 0, "> 0 kJ/mol")):
            if not ok:
                raise EnpcgError(f"equivariant model config field {name!r}: received {value}; it must be {rule}")
        n_atoms = topology.n_beads
        if neighbor_list is None:
            neighbor_list = "vesin" if n_atoms > DENSE_MAX_ATOMS else "dense"
        if neighbor_list not in NEIGHBOR_LISTS:
            raise EnpcgError(f"equivariant model config field 'neighbor_list': received {neighbor_list!r}; it must "
                             f"be one of {list(NEIGHBOR_LISTS)} or null (automatic)")
        if neighbor_list == "vesin":
            _vesin()
        self.config = {"cutoff": cutoff, "l_max": l_max, "n_layers": n_layers, "mul": mul, "n_rbf": n_rbf,
                       "radial_hidden": radial_hidden, "avg_neighbors": avg_neighbors,
                       "energy_scale": energy_scale, "neighbor_list": neighbor_list, "seed": int(seed),
                       "correlation": int(correlation)}
        self.cutoff = cutoff
        self.mul = mul
        self.energy_scale = energy_scale
        self.use_vesin = neighbor_list == "vesin"

        species = topology.type_index()
        n_species = max(1, len(topology.type_names()))
        self.n_species = n_species
        # Rebuilt from the topology (not saved), so weights can be bound to another system of the same species.
        self.register_buffer("species", torch.as_tensor(species, dtype=torch.long), persistent=False)
        self.register_buffer("species_energy", torch.zeros(n_species, dtype=torch.get_default_dtype()))
        irreps_hidden = hidden_irreps(mul, l_max)
        irreps_sh = str(o3.Irreps.spherical_harmonics(l_max))
        # e3nn bakes its Clebsch-Gordan coefficients in the default dtype at construction: built in float32
        # and cast later, the l = 2 coefficients keep float32 rounding, which broke the rotation symmetry of
        # float64 forces by ~1e-10 relative. Build in float64, then cast to the caller's default dtype.
        default_dtype = torch.get_default_dtype()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            torch.set_default_dtype(torch.float64)
            try:
                self.embedding = o3.Linear(o3.Irreps(f"{n_species}x0e"), o3.Irreps(irreps_hidden))
                self.sh = SphericalHarmonics(o3.Irreps(irreps_sh), normalize=True, normalization="component")
                self.radial = BesselEnvelope(cutoff, n_rbf)
                self.blocks = torch.nn.ModuleList([
                    Interaction(irreps_hidden, irreps_sh, n_rbf, radial_hidden, avg_neighbors, correlation)
                    for _ in range(n_layers)])
                self.readout1 = torch.nn.Linear(mul, mul)
                self.readout2 = torch.nn.Linear(mul, 1)
            finally:
                torch.set_default_dtype(default_dtype)
        self.to(default_dtype)

    # ------------------------------------------------------------------ TorchScript
    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script``: a copy whose e3nn submodules are compiled (see :func:`_compile_e3nn`)."""
        m = copy.deepcopy(self)
        _compile_e3nn(m)
        return m

    # ------------------------------------------------------------------ neighbour lists
    def _check_box(self, box: Tensor):
        # The dense minimum image is exact only for cutoff <= half the smallest box width (reduced form: the
        # widths are the diagonal elements).
        width = torch.min(torch.diagonal(box.detach(), dim1=-2, dim2=-1))
        if float(width) < 2.0 * self.cutoff:
            raise EnpcgError(f"equivariant model (neighbor_list='dense'): cutoff {self.cutoff} nm exceeds half the "
                             f"smallest box width ({float(width)} nm); use neighbor_list='vesin' or a larger box")

    def _dense_edges(self, positions: Tensor, box: Optional[Tensor]) -> List[Tensor]:
        """Half list over all frames: (flat i, flat j, frame, vectors r_j - r_i (E, 3) nm)."""
        n_frames = positions.shape[0]
        n = positions.shape[1]
        pairs = torch.triu_indices(n, n, 1, device=positions.device)
        if box is not None:
            self._check_box(box)
        # Select edges without gradient (a pass over all pairs), then recompute the kept vectors only.
        with torch.no_grad():
            d_all = minimum_image(positions[:, pairs[1]] - positions[:, pairs[0]], box)
            sel = torch.nonzero((d_all * d_all).sum(-1) < self.cutoff * self.cutoff)
        frame = sel[:, 0]
        pidx = sel[:, 1]
        ii = pairs[0].index_select(0, pidx) + frame * n
        jj = pairs[1].index_select(0, pidx) + frame * n
        flat = positions.reshape(n_frames * n, 3)
        d = (flat.index_select(0, jj) - flat.index_select(0, ii)).unsqueeze(1)
        if box is not None:
            d = minimum_image(d, box.index_select(0, frame))
        return [ii, jj, frame, d.squeeze(1)]

    def _vesin_edges(self, positions: Tensor, box: Optional[Tensor]) -> List[Tensor]:
        """Half list from vesin's cell list, frame by frame; vectors r_j - r_i + S box (E, 3) nm."""
        n = positions.shape[1]
        nl = _NeighborList(cutoff=self.cutoff, full_list=False)
        ii_l: List[Tensor] = []
        jj_l: List[Tensor] = []
        fr_l: List[Tensor] = []
        d_l: List[Tensor] = []
        for b in range(positions.shape[0]):
            x = positions[b]
            if box is None:
                cell = torch.zeros(3, 3, dtype=x.dtype, device=x.device)
                periodic = False
            else:
                cell = box[b]
                periodic = True
            res = nl.compute(points=x.detach(), box=cell.detach(), periodic=periodic, quantities="ijS", copy=True)
            i = res[0].to(torch.long)
            j = res[1].to(torch.long)
            d = x.index_select(0, j) - x.index_select(0, i)
            if box is not None:
                # Shifts are integer multiples of the box rows; the product keeps the strain derivative.
                d = d + res[2].to(x.dtype) @ cell
            ii_l.append(i + b * n)
            jj_l.append(j + b * n)
            fr_l.append(torch.full_like(i, b))
            d_l.append(d)
        return [torch.cat(ii_l), torch.cat(jj_l), torch.cat(fr_l), torch.cat(d_l)]

    # ------------------------------------------------------------------ energy
    @torch.jit.export
    def atom_energies(self, positions: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """Per-atom energies (B, n) kJ/mol (shifts included) of positions (B, n, 3) nm, box (B, 3, 3) nm or None."""
        n_frames = positions.shape[0]
        n = positions.shape[1]
        if self.use_vesin:
            edges = self._vesin_edges(positions, box)
        else:
            edges = self._dense_edges(positions, box)
        ii, jj, d = edges[0], edges[1], edges[3]
        # Directed edges both ways: atom dst gathers from src along r_src - r_dst.
        src = torch.cat([jj, ii])
        dst = torch.cat([ii, jj])
        vec = torch.cat([d, -d])
        r = torch.linalg.norm(vec, dim=-1)
        sh = self.sh(vec)
        rbf = self.radial.basis(r)
        env = self.radial.envelope(r).unsqueeze(-1)
        species = self.species.repeat(n_frames)
        onehot = torch.nn.functional.one_hot(species, self.n_species).to(positions.dtype)
        x = self.embedding(onehot)
        for block in self.blocks:
            x = x + block(x, sh, rbf, env, src, dst)
        s = x[:, :self.mul]  # the 0e channels come first in the hidden irreps
        e = self.readout2(torch.nn.functional.silu(self.readout1(s))).squeeze(-1) * self.energy_scale
        e = e + self.species_energy.to(e.dtype).index_select(0, species)
        return e.reshape(n_frames, n)

    @torch.jit.export
    def batch_energy(self, positions: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """Energies (B,) kJ/mol of positions (B, n, 3) nm with box (B, 3, 3) nm rows or None."""
        return self.atom_energies(positions, box).sum(dim=1)

    # ------------------------------------------------------------------ Python helpers
    @torch.jit.unused
    def virial(self, positions: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """Virial W = -dE/d(eps) (3, 3) kJ/mol (or (B, 3, 3) for batched input) by the strain derivative.

        positions (n, 3) or (B, n, 3) nm; box (3, 3) or (B, 3, 3) nm or None. Positions and box rows are
        strained as x -> x (1 + eps); W_ab = -dE/d eps_ab. For an isolated system W = sum_i x_i (x) F_i; in a
        box the pressure tensor is P = (sum_i m_i v_i (x) v_i + W) / V (kinetic part added by the caller).
        """
        single = positions.dim() == 2
        x = positions.unsqueeze(0) if single else positions
        b = None if box is None else (box.unsqueeze(0) if single else box)
        eps = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype, device=x.device, requires_grad=True)
        strain = torch.eye(3, dtype=x.dtype, device=x.device) + eps
        xs = torch.bmm(x, strain)
        bs = None if b is None else torch.bmm(b, strain)
        e = self.batch_energy(xs, bs)
        (g,) = torch.autograd.grad(e.sum(), eps, create_graph=torch.is_grad_enabled() and x.requires_grad)
        w = -g
        return w[0] if single else w
