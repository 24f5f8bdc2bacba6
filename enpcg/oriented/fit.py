"""Force-and-torque matching of oriented-bead models.

Loss (per bead, averaged over beads and frames), units (kJ/mol/nm)^2:

    |F_model - F_ref|^2 + |tau_model - tau_ref|^2 / l^2

with a stated length scale l (nm), by default the beads' radius of gyration sqrt(tr C / M) from the mapped
body moments (so a torque error counts like the force error that would produce it at the bead's rim). For
director beads the torque component along the bead's own axis is left out: a uniaxial bead's energy cannot
depend on rotations about it, so the model carries none, while the mapped atoms do.

Runs on the GPU when one is present (``device="auto"``), on the CPU otherwise, in the model's dtype
(``model.double()`` for float64; float32 is 2-3x faster on the CPU). For the small tensors of a few hundred
beads, one torch thread is fastest on the CPU (``torch.set_num_threads(1)``): extra threads that compete
for busy cores slow tiny operations down by orders of magnitude. With an ``out_dir`` the state is
checkpointed after every epoch (atomically) and a rerun resumes from it.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import EnpcgError
from ..fileio import atomic_path, write_json
from ..models.base import model_dtype
from .base import OrientedModel, batch_forces_and_torques
from .data import OrientedData


def default_length_scale(topology) -> float:
    """Mass-weighted radius of gyration (nm) of the oriented bead types, from ``topology.body_moments``."""
    vals, weights = [], []
    for t, c in (topology.body_moments or {}).items():
        mass = float(np.mean([m for m, bt in zip(topology.masses, topology.bead_types) if bt == t]))
        n = sum(1 for bt in topology.bead_types if bt == t)
        vals.append(math.sqrt(max(np.trace(np.asarray(c)), 0.0) / mass))
        weights.append(n)
    if not vals or not all(v > 0 for v in vals):
        raise EnpcgError("the torque length scale l is unknown: the topology has no body_moments (map the data "
                         "with enpcg.mapping.map_trajectory, which records them) — pass length_scale= in nm")
    return float(np.average(vals, weights=weights))


def mean_body_coordinates(mapping, positions, box=None, bead: int = 0) -> np.ndarray:
    """Mean body-frame coordinates (k, 3) nm of the atoms of the beads of ``bead``'s type, relative to the
    bead centre, averaged over those beads and the frames: initial site offsets of a ``rigid_sites`` model."""
    x, _ = mapping._frames(positions, "positions")
    axes = mapping.map_axes(x, box)
    arms = mapping._arms(x, box)
    t = mapping.topology.bead_types[bead]
    beads = [i for i, bt in enumerate(mapping.topology.bead_types) if bt == t]
    out = []
    for i in beads:
        s = mapping._starts[i]
        k = len(mapping.bead_atoms[i])
        out.append(np.einsum("fji,faj->fai", axes[:, i], arms[:, s:s + k]))
    return np.mean(np.concatenate(out, axis=0), axis=0)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _director_mask(topology) -> np.ndarray:
    return np.array([o == "director" for o in topology.orientations])


def _tensors(data: OrientedData, dtype, device):
    as_t = (lambda a: None if a is None else torch.tensor(np.asarray(a), dtype=dtype, device=device))
    return (as_t(data.positions), as_t(data.axes), as_t(data.forces), as_t(data.torques), as_t(data.box))


def _torque_residual(dt, axes, director):
    """Torque residual with the axial component removed for director beads."""
    if director.any():
        u = axes[..., 0]
        along = (dt * u).sum(-1, keepdim=True) * u
        mask = torch.as_tensor(director, device=dt.device).reshape(1, -1, 1)
        dt = torch.where(mask, dt - along, dt)
    return dt


def predict(model: OrientedModel, data: OrientedData, batch_size: int = 16):
    """Energies (F,) kJ/mol, forces (F, n, 3) kJ/mol/nm and torques (F, n, 3) kJ/mol of the model on data."""
    dt = model_dtype(model)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    pos, ax, _, _, box = _tensors(data, dt, dev)
    es, fs, ts = [], [], []
    for s in range(0, data.n_frames, batch_size):
        sl = slice(s, s + batch_size)
        e, f, t = batch_forces_and_torques(model, pos[sl], ax[sl], None if box is None else box[sl])
        es.append(e.detach().cpu().numpy())
        fs.append(f.detach().cpu().numpy())
        ts.append(t.detach().cpu().numpy())
    return np.concatenate(es), np.concatenate(fs), np.concatenate(ts)


def oriented_errors(model: OrientedModel, data: OrientedData, batch_size: int = 16) -> dict:
    """Relative RMS errors of the model on data: force ||dF||/||F||, torque ||dtau||/||tau|| (axial
    components of director beads left out of both), energy ||dE - <dE>|| / ||E - <E>|| when the data hold
    energies (energies are defined up to a constant). The energy error is meaningful only for data whose
    energies are the CG energy itself (known-answer data); mapped atomistic data carry the atomistic
    potential energy, intramolecular terms included, which a CG model does not represent."""
    e, f, t = predict(model, data, batch_size)
    director = _director_mask(data.topology)
    tref, tmod = data.torques.copy(), t.copy()
    if director.any():
        u = data.axes[..., 0][:, director]
        for arr in (tref, tmod):
            arr[:, director] -= np.sum(arr[:, director] * u, axis=-1, keepdims=True) * u
    out = {"force": float(np.linalg.norm(f - data.forces) / np.linalg.norm(data.forces)),
           "torque": float(np.linalg.norm(tmod - tref) / np.linalg.norm(tref))}
    if data.energies is not None:
        de = e - data.energies
        out["energy"] = float(np.linalg.norm(de - de.mean()) / np.linalg.norm(data.energies - data.energies.mean()))
    return out


def energy_parts(model: OrientedModel, data: OrientedData, batch_size: int = 16):
    """(even, odd) energies (F,) kJ/mol: the mirror-symmetric and the pseudoscalar (chiral) parts, summed over
    the model's ``oriented_neural`` terms (other terms count as even)."""
    dt = model_dtype(model)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    pos, ax, _, _, box = _tensors(data, dt, dev)
    terms = list(model.terms) if hasattr(model, "terms") else [model]
    even, odd = [], []
    with torch.no_grad():
        for s in range(0, data.n_frames, batch_size):
            sl = slice(s, s + batch_size)
            b = None if box is None else box[sl]
            ev = torch.zeros(pos[sl].shape[0], dtype=dt, device=dev)
            od = torch.zeros_like(ev)
            for term in terms:
                if hasattr(term, "batch_energy_parts"):
                    a, c = term.batch_energy_parts(pos[sl], ax[sl], b)
                    ev, od = ev + a, od + c
                else:
                    ev = ev + term.batch_energy(pos[sl], ax[sl], b)
            even.append(ev.cpu().numpy())
            odd.append(od.cpu().numpy())
    return np.concatenate(even), np.concatenate(odd)


def chiral_energy_fraction(model: OrientedModel, data: OrientedData) -> float:
    """Share of the model's energy variance over the frames carried by its pseudoscalar (chiral) channel,
    Var(E_odd) / (Var(E_even) + Var(E_odd)), in [0, 1]."""
    even, odd = energy_parts(model, data)
    total = np.var(even) + np.var(odd)
    return float(np.var(odd) / total) if total > 0 else 0.0


def fit_oriented(model: OrientedModel, data: OrientedData, *, epochs: int = 200, lr: float = 1e-2,
                 batch_size: int = 8, length_scale: Optional[float] = None, val_fraction: float = 0.2,
                 seed: int = 0, max_seconds: Optional[float] = None, out_dir=None, device: str = "auto",
                 progress: bool = False, lr_final: float = 0.05, optimizer: str = "adam",
                 odd_decay: float = 1.0, grad_clip: Optional[float] = None, weight_decay: float = 0.0) -> dict:
    """Fit ``model`` in place to ``data`` by force-and-torque matching (module docstring); returns the history.

    epochs : passes over the training frames; lr : Adam step, decayed by a cosine to lr * lr_final;
    batch_size : frames per step; length_scale : l, nm (default :func:`default_length_scale`);
    val_fraction : share of frames held out (the best validation state is kept); max_seconds : stop after
    this wall time (the schedule follows time then); out_dir : checkpoint and history folder (resumable).
    optimizer : "adam" (minibatches; neural models) or "lbfgs" (full batch, strong-Wolfe line search, one
    epoch = up to 20 iterations; a step to non-finite values is undone and ends the fit; analytic models
    with a few parameters, e.g. Gay-Berne, converge tightly).
    odd_decay : decoupled weight decay (AdamW; each step multiplies the weights by 1 - lr * odd_decay) of the
    parity-odd (pseudoscalar) channel of ``oriented_neural`` terms (parameters named ``odd.*``): the chiral
    channel stays near zero unless the data need it (on achiral data it would otherwise absorb noise and make
    an achiral system look chiral).
    weight_decay : decoupled weight decay of every other trainable parameter (default 0). Use it for a neural
    correction on top of a fitted prior (:func:`fit_prior_and_correction`): force matching barely sees an energy
    that is nearly constant per pair inside the cutoff (it only shows in the switching region's forces), yet
    such a term changes the energy of each frame with its number of pairs; the decay keeps the correction at
    zero wherever the forces do not ask for it.
    grad_clip : Adam only: the gradient's norm is clipped to this many times the median norm of the steps so
    far (None: no clipping). Why: a frame with a pair deep on an r^-12 wall gives a gradient orders of magnitude
    above the rest; one such step inflates Adam's second-moment estimate for thousands of steps and stalls
    the parameters it touches (seen on Gay-Berne data: the learned anisotropies froze at their start values).
    """
    if optimizer not in ("adam", "lbfgs"):
        raise EnpcgError(f"fit_oriented: optimizer must be 'adam' or 'lbfgs'; received {optimizer!r}")
    if data.n_frames < 2:
        raise EnpcgError(f"fit_oriented needs at least 2 frames; the data have {data.n_frames}")
    l = float(length_scale) if length_scale is not None else default_length_scale(data.topology)
    dev = _device(device)
    model.to(dev)
    dt = model_dtype(model)
    pos, ax, frc, trq, box = _tensors(data, dt, dev)
    director = _director_mask(data.topology)
    rng = np.random.default_rng(seed)
    order = rng.permutation(data.n_frames)
    n_val = max(1, int(round(val_fraction * data.n_frames))) if val_fraction > 0 else 0
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    params = [p for p in model.parameters() if p.requires_grad]
    odd = [p for n, p in model.named_parameters() if p.requires_grad and (n.startswith("odd.") or ".odd." in n)]
    rest = [p for p in params if all(p is not q for q in odd)]
    groups = [{"params": rest, "weight_decay": float(weight_decay)}] + ([{"params": odd, "weight_decay": odd_decay}] if odd else [])
    opt = torch.optim.AdamW(groups, lr=lr) if optimizer == "adam" else \
        torch.optim.LBFGS(params, lr=1.0, max_iter=20, history_size=20, line_search_fn="strong_wolfe")
    history = {"epoch": [], "train_loss": [], "val_loss": [], "lr": [], "seconds": [], "length_scale": l,
               "val_frames": val_idx.tolist()}
    start_epoch, best, best_state, elapsed0 = 0, math.inf, None, 0.0
    ckpt = Path(out_dir) / "checkpoint.pt" if out_dir is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=dev, weights_only=True)  # tensors and plain containers only
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, start_epoch, best = state["history"], state["epoch"] + 1, state["best"]
        best_state, elapsed0 = state["best_state"], state["seconds"]

    def loss_of(idx, create_graph):
        b = None if box is None else box[idx]
        _, f, t = batch_forces_and_torques(model, pos[idx], ax[idx], b, create_graph=create_graph)
        df = f - frc[idx]
        dtau = _torque_residual(t - trq[idx], ax[idx], director)
        return (df.pow(2).sum(-1) + dtau.pow(2).sum(-1) / (l * l)).mean()

    def val_loss():
        if n_val == 0:
            return float("nan")
        tot = 0.0
        for s in range(0, n_val, batch_size):
            idx = torch.as_tensor(val_idx[s:s + batch_size], device=dev)
            tot += float(loss_of(idx, False).detach()) * len(idx)
        return tot / n_val

    t0 = time.perf_counter() - elapsed0
    grad_norms: list = []  # recent gradient norms (for grad_clip)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs, initial=start_epoch, desc="fit oriented", unit="epoch")
    for epoch in range(start_epoch, epochs):
        frac = epoch / max(1, epochs)
        if max_seconds:
            frac = max(frac, (time.perf_counter() - t0) / max_seconds)
        if frac >= 1.0:
            break
        perm = train_idx[np.random.default_rng(seed + epoch).permutation(len(train_idx))]
        tot = 0.0
        if optimizer == "lbfgs":
            def closure():
                opt.zero_grad()
                total = 0.0
                for s in range(0, len(perm), batch_size):
                    idx = torch.as_tensor(perm[s:s + batch_size], device=dev)
                    part = loss_of(idx, True) * (len(idx) / len(perm))
                    part.backward()
                    total = total + float(part.detach())
                return torch.tensor(total, dtype=torch.float64)

            # A step that leaves the loss or the weights non-finite (r^-12 walls overflow far from the optimum)
            # is undone and ends the fit.
            before = [p.detach().clone() for p in params]
            tot = float(opt.step(closure)) * len(perm)
            after = float(closure())
            if not math.isfinite(after) or not all(bool(torch.isfinite(p).all()) for p in params):
                with torch.no_grad():
                    for p, b in zip(params, before):
                        p.copy_(b)
                break
        for g in opt.param_groups:
            if optimizer == "adam":
                g["lr"] = lr * (lr_final + (1 - lr_final) * 0.5 * (1 + math.cos(math.pi * frac)))
        for s in range(0, len(perm) if optimizer == "adam" else 0, batch_size):
            idx = torch.as_tensor(perm[s:s + batch_size], device=dev)
            opt.zero_grad()
            loss = loss_of(idx, True)
            loss.backward()
            if grad_clip is not None:
                norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
                if grad_norms:
                    limit = float(grad_clip) * float(np.median(grad_norms))
                    if norm > limit:
                        for p in params:
                            if p.grad is not None:
                                p.grad.mul_(limit / norm)
                grad_norms.append(norm)
                del grad_norms[:-200]
            opt.step()
            tot += float(loss.detach()) * len(idx)
        vl = val_loss()
        history["epoch"].append(epoch)
        history["train_loss"].append(tot / len(perm))
        history["val_loss"].append(vl)
        history["lr"].append(opt.param_groups[0]["lr"])
        history["seconds"].append(time.perf_counter() - t0)
        score = vl if n_val else tot / len(perm)
        if score < best:
            best = score
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(ckpt) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "history": history,
                            "epoch": epoch, "best": best, "best_state": best_state,
                            "seconds": time.perf_counter() - t0}, tmp)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(train=f"{tot / len(perm):.3g}", val=f"{vl:.3g}")
    if bar is not None:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    history["best_val_loss"] = best
    if out_dir is not None:
        write_json(Path(out_dir) / "history.json", history)
    return history


def fit_prior_and_correction(prior: OrientedModel, correction: OrientedModel, data: OrientedData, *,
                             prior_epochs: int = 150, prior_lr: float = 0.05, prior_batch_size: int = 10,
                             lbfgs_epochs: int = 3, epochs: int = 80, lr: float = 3e-3, batch_size: int = 2,
                             weight_decay: float = 1.0, val_fraction: float = 0.2, grad_clip: Optional[float] = 3.0,
                             length_scale: Optional[float] = None, seed: int = 0, device: str = "auto",
                             progress: bool = False, out_dir=None, max_seconds: Optional[float] = None):
    """A physical prior (e.g. ``gay_berne``) fitted first, then a neural correction on top of it, frozen prior.

    Returns (``oriented_sum`` model of prior + correction in the correction's dtype, {"prior": history,
    "correction": history}). Units as :func:`fit_oriented` (nm, kJ/mol, kJ/mol/nm).

    Why two stages: a few-parameter prior of the right form converges tightly under L-BFGS (Adam first brings
    it near the optimum; ``prior_epochs`` Adam epochs at ``prior_lr``, then ``lbfgs_epochs`` full-batch L-BFGS
    epochs in the prior's own dtype, float64 recommended), while a network trained from scratch on the same
    data stops in a local minimum whose energies are far less accurate than its forces (on Gay-Berne data
    0.04 relative force error but 0.13 centred energy error, tests/test_oriented_fitting.py). The correction
    (zero at the start: oriented_neural's output layers start at zero) then learns only what the prior lacks;
    its decoupled ``weight_decay`` and the held-out ``val_fraction`` of frames (the best validation state is
    kept) stop it from turning the data's noise into energy fluctuations (see ``weight_decay`` in
    :func:`fit_oriented`).

    out_dir : checkpoints of the three stages in ``prior/``, ``prior_lbfgs/`` and ``correction/`` below it; a
    rerun resumes (finished stages return at once). max_seconds : wall-time limit of the correction stage.
    """
    from ..models.base import create_model
    from . import sites  # noqa: F401  (registers "oriented_sum")

    l = float(length_scale) if length_scale is not None else None
    stage = (lambda name: None) if out_dir is None else (lambda name: Path(out_dir) / name)
    hist_prior = fit_oriented(prior, data, epochs=prior_epochs, lr=prior_lr, batch_size=prior_batch_size,
                              length_scale=l, val_fraction=0.0, seed=seed, device=device, progress=progress,
                              out_dir=stage("prior"))
    if lbfgs_epochs > 0:
        hist_prior["lbfgs"] = fit_oriented(prior, data, epochs=lbfgs_epochs, batch_size=max(prior_batch_size, 1),
                                           length_scale=l, val_fraction=0.0, seed=seed, device=device,
                                           optimizer="lbfgs", progress=progress, out_dir=stage("prior_lbfgs"))
    dtype = model_dtype(correction)
    model = create_model("oriented_sum", data.topology, terms=[prior, correction]).to(dtype)
    for p in model.terms[0].parameters():
        p.requires_grad_(False)
    hist = fit_oriented(model, data, epochs=epochs, lr=lr, batch_size=batch_size, length_scale=l,
                        val_fraction=val_fraction, seed=seed, device=device, progress=progress,
                        weight_decay=weight_decay, grad_clip=grad_clip, out_dir=stage("correction"),
                        max_seconds=max_seconds)
    return model, {"prior": hist_prior, "correction": hist}
