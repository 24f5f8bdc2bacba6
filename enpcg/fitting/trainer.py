"""Minibatch force matching of a neural (or any trainable) CG model.

Units: positions and box in nm, forces in kJ/mol/nm, losses in (kJ/mol/nm)^2, RMSEs in kJ/mol/nm.

The model is fitted to the residual forces F_ref - F_prior (the prior's forces are computed once, up front).
Loss: mean squared force error over the beads and components of a minibatch of frames, times
``force_weight``; with reference ``energies`` (kJ/mol per frame) it adds ``energy_weight`` times the mean
squared energy error per bead ((E - E_ref) / n)^2, (kJ/mol)^2, and validation ranks epochs by that sum. AdamW (Adam when
``weight_decay=0``) with ReduceLROnPlateau on the validation loss or a cosine decay, optionally an exponential
moving average (EMA) of the weights; the validation frames are a fixed, seeded split; training stops early
when the validation loss has not improved for ``patience`` epochs, and the best weights are returned (or the
last ones, ``select_best=False``: on very noisy forces the validation loss cannot rank late epochs).

Every epoch ends with an atomic checkpoint (``checkpoint.pt``: model, optimizer, scheduler, epoch, best
weights, history, RNG states, all as tensors and plain containers so that ``torch.load(weights_only=True)``
reads it). Frame shuffles are seeded from ``(seed, epoch)``, so a fit that is interrupted and resumed follows
the same path as an uninterrupted one. Outputs in ``out_dir``: ``checkpoint.pt``, ``history.json``,
``training_curve.png``.

Test hook: with the environment variable ``ENPCG_STOP_AFTER_EPOCH=k``, the trainer raises KeyboardInterrupt
right after the checkpoint of epoch k (epochs count from 1) is written.

Data parallel (``torchrun --nproc_per_node=N``; :mod:`enpcg.fitting.distributed`): every minibatch is split
into N contiguous shards, one per rank, and gradients are averaged by PyTorch's DistributedDataParallel. Each
rank's loss is its shard's mean times N x (shard frames / batch frames), so the averaged gradient is the
gradient of the whole batch's mean loss: the fit follows the single-process path up to round-off.
Validation sums are all-reduced, time budgets follow rank 0's clock, and only rank 0 writes files.
"""
from __future__ import annotations

import copy
import math
import os
import time
import types
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import EnpcgError
from ..fileio import atomic_path, write_json
from ..models.base import batch_forces, model_dtype
from . import distributed

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"
CURVE = "training_curve.png"
STOP_ENV = "ENPCG_STOP_AFTER_EPOCH"


def _as_frames(x, name, dtype, shape_tail=None, n_frames=None) -> torch.Tensor:
    # A copy: the caller's arrays (possibly read-only) are never aliased or modified.
    t = torch.tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x), dtype=dtype)
    ok = t.ndim == 3 and (shape_tail is None or tuple(t.shape[1:]) == shape_tail)
    if n_frames is not None:
        ok = ok and t.shape[0] == n_frames
    if not ok:
        want = f"({n_frames if n_frames is not None else 'F'}, " + ", ".join(
            str(s) for s in (shape_tail or ("n", 3))) + ")"
        raise EnpcgError(f"train_force_matching: {name} must be shape {want}; you supplied {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise EnpcgError(f"train_force_matching: {name} contains NaN or infinite values; clean the data set")
    return t


def _prior_forces(prior, pos, box, batch_size, device):
    """Energies (F,) kJ/mol and forces (F, n, 3) kJ/mol/nm of a fixed prior, evaluated in batches on
    ``device``, returned on the CPU."""
    out, energies = [], []
    for start in range(0, pos.shape[0], batch_size):
        x = pos[start:start + batch_size].to(device)
        b = None if box is None else box[start:start + batch_size].to(device)
        e, f = batch_forces(prior, x, b)
        out.append(f.detach().cpu())
        energies.append(e.detach().cpu())
    return torch.cat(energies), torch.cat(out)


def _split(n_frames: int, val_fraction: float, seed: int):
    """Fixed seeded split of frame indices into (train, val); at least one frame on each side."""
    if not 0.0 < val_fraction < 1.0:
        raise EnpcgError(f"train_force_matching: val_fraction must be in (0, 1); you supplied {val_fraction}")
    if n_frames < 2:
        raise EnpcgError(f"train_force_matching: need at least 2 frames to split train/val; got {n_frames}")
    perm = np.random.default_rng(seed).permutation(n_frames)
    n_val = min(n_frames - 1, max(1, int(round(val_fraction * n_frames))))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _epoch_order(train_idx: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    # The shuffle of epoch k depends only on (seed, k): resuming reproduces it without any saved RNG stream.
    return train_idx[np.random.default_rng([seed, epoch]).permutation(len(train_idx))]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _fingerprint(model, pos, forces, box, prior, settings: dict) -> dict:
    """What must match for a checkpoint to be resumed (plain Python values): model, data, settings."""
    return {"kind": getattr(model, "kind", type(model).__name__), "config": repr(getattr(model, "config", {})),
            "prior": None if prior is None else repr(getattr(prior, "config", type(prior).__name__)),
            "n_frames": int(pos.shape[0]), "n_beads": int(pos.shape[1]), "periodic": box is not None,
            "data_sum": float(pos.double().sum() + forces.double().sum()), **settings}


class _BatchEnergy(torch.nn.Module):
    """``forward`` = ``model.batch_energy``: DistributedDataParallel synchronises gradients of what its own
    forward computes, and force matching differentiates batch energies."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, positions, box):
        return self.model.batch_energy(positions, box)


def _data_parallel(model, device, inactive):
    """An object with ``batch_energy`` (what :func:`batch_forces` calls) that runs ``model`` under
    DistributedDataParallel.

    inactive : names of parameters that the force-matching loss never reaches (an energy offset has no force),
    so they never get a gradient. DDP would wait for them forever; it ignores them instead, and they stay
    without gradient as in a single process (where AdamW skips them, weight decay included).
    """
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    # Autograd may give a (1, k) weight's gradient strides (1, 1) where DDP's bucket has (k, 1): the same
    # memory layout (a dimension of size 1 has no stride), so DDP's performance warning is noise.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    wrapper = _BatchEnergy(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, [f"model.{n}" for n in inactive])
    ddp = DistributedDataParallel(wrapper, device_ids=[device.index] if device.type == "cuda" else None,
                                  broadcast_buffers=False)  # buffers are identical on every rank
    return types.SimpleNamespace(batch_energy=ddp)


def write_training_curve(history: dict, path):
    """Plot train/val force RMSE (kJ/mol/nm) and the learning rate per epoch into a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ep = history["epoch"]
    ax.semilogy(ep, history["train_rmse"], label="train")
    ax.semilogy(ep, history["val_rmse"], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("force RMSE (kJ/mol/nm)")
    ax2 = ax.twinx()
    ax2.semilogy(ep, history["lr"], color="0.6", ls=":", label="learning rate")
    ax2.set_ylabel("learning rate")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def train_force_matching(model, positions, forces, box=None, *, prior=None, out_dir, epochs: int = 100,
                         batch_size: int = 16, lr: float = 1e-3, val_fraction: float = 0.1, patience: int = 20,
                         seed: int = 0, device=None, progress: bool = True, resume: bool = True,
                         max_minutes: Optional[float] = None, schedule: str = "plateau",
                         weight_decay: float = 0.0, ema_decay: float = 0.0, select_best: bool = True,
                         lr_factor: float = 0.5, lr_patience: int = 5, min_lr: float = 1e-6,
                         energies=None, energy_weight: float = 0.0, force_weight: float = 1.0,
                         force_groups=None):
    """Fit ``model`` to reference forces by minibatch force matching; returns ``(model, history)``.

    Parameters
    ----------
    model : CGModel, its trainable parameters are fitted (in its own dtype); returned with the best weights,
        on the device it came in on.
    positions : array, shape=(F, n, 3), nm
    forces : array, shape=(F, n, 3), kJ/mol/nm, reference (mapped) forces
    box : array, shape=(F, 3, 3), nm rows, or None for a non-periodic system
    prior : CGModel or None, fixed model whose forces are subtracted from the reference forces
    out_dir : folder for ``checkpoint.pt``, ``history.json`` and ``training_curve.png``
    epochs : maximum number of epochs; batch_size : frames per minibatch; lr : initial Adam learning rate
    val_fraction : fraction of frames held out (a fixed split from ``seed``)
    patience : epochs without validation improvement before stopping early
    device : torch device or None (cuda when available, else cpu)
    resume : continue from ``out_dir/checkpoint.pt`` when present (it must come from the same data and
        settings); False starts afresh and overwrites it
    max_minutes : stop (resumably) after this wall time in minutes
    weight_decay : decoupled (AdamW) weight decay, per unit learning rate; applied to the parameters the model
        names in ``model.optimizer_groups(weight_decay)`` when it has that method, else to all
    ema_decay : if > 0, validate and keep an exponential moving average of the weights (per step:
        w_ema <- ema_decay w_ema + (1 - ema_decay) w), which averages out minibatch noise; 0.99 suits noisy
        forces
    schedule : "plateau" (ReduceLROnPlateau on the validation loss: factor ``lr_factor`` after ``lr_patience``
        epochs without improvement, down to ``min_lr``), "cosine" (cosine decay from ``lr`` to ``min_lr``
        over ``epochs``; it averages out minibatch noise on noisy forces) or "cosine_time" (the same decay over
        the wall-time budget ``max_minutes``, set at every step: the way to spend a fixed budget well; the
        path then depends on the machine's speed)
    select_best : keep the weights of the epoch with the lowest validation loss (True) or of the last epoch
    energies : array, shape=(F,), kJ/mol, reference potential energies, or None (forces only); they matter
        only with ``energy_weight > 0``
    energy_weight : weight of the energy term, per (kJ/mol per bead)^2; force_weight : weight of the force
        term, per (kJ/mol/nm)^2
    force_groups : list of ``(group_index, weight)`` or None. ``group_index`` (n,) int assigns each particle
        to a group (e.g. its CG bead, or its molecule); the loss gains ``weight`` x the mean squared error of
        the group force sums, per (kJ/mol/nm)^2. Multiscale force matching: an atomistic model is judged
        on the mapped bead forces and on whole-molecule (intermolecular) forces, which atom forces dominated
        by stiff bonds hardly constrain.

    Returns
    -------
    model, history : history is a dict of per-epoch lists ``epoch``, ``train_rmse``, ``val_rmse`` (kJ/mol/nm),
        ``lr`` (with energies also ``train_energy_rmse``, ``val_energy_rmse``, kJ/mol per bead), plus
        ``best_epoch`` and ``best_val_rmse`` (force RMSE at the lowest validation loss), ``kept_epoch`` (the epoch
        whose weights are returned) and ``stopped`` (why training ended: "early_stopping", "max_epochs",
        "max_minutes").
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("patience", patience)):
        if int(value) < 1:
            raise EnpcgError(f"train_force_matching: {name} must be a positive integer; you supplied {value}")
    if not lr > 0:
        raise EnpcgError(f"train_force_matching: lr must be positive; you supplied {lr}")
    if not (energy_weight >= 0 and force_weight >= 0 and energy_weight + force_weight > 0):
        raise EnpcgError(f"train_force_matching: energy_weight and force_weight must be >= 0, not both 0; you "
                         f"supplied {energy_weight}, {force_weight}")
    if energy_weight > 0 and energies is None:
        raise EnpcgError("train_force_matching: energy_weight > 0 needs reference energies; pass energies= "
                         "(kJ/mol per frame) or set energy_weight=0")
    if not 0.0 <= ema_decay < 1.0:
        raise EnpcgError(f"train_force_matching: ema_decay must be in [0, 1); you supplied {ema_decay}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # Under torchrun (WORLD_SIZE > 1) join the process group; a CUDA fit then uses this rank's GPU.
    parallel = distributed.init_from_env(device)
    device = distributed.local_device(device) if parallel else torch.device(device)
    main = distributed.is_main()
    home = next(iter(model.parameters())).device
    dtype = model_dtype(model)

    pos = _as_frames(positions, "positions", dtype)
    n_frames, n_beads = pos.shape[0], pos.shape[1]
    ref = _as_frames(forces, "forces", dtype, (n_beads, 3), n_frames)
    cell = None if box is None else _as_frames(box, "box", dtype, (3, 3), n_frames)
    use_energy = energies is not None and energy_weight > 0
    groups_loss = []
    for g_index, g_weight in (force_groups or []):
        g_index = torch.as_tensor(np.asarray(g_index, dtype=np.int64).reshape(-1))
        if g_index.shape[0] != n_beads or int(g_index.min()) < 0 or not float(g_weight) >= 0:
            raise EnpcgError(f"train_force_matching: each force group needs one non-negative group index per "
                             f"particle ({n_beads}) and a weight >= 0; you supplied {tuple(g_index.shape)} "
                             f"indices and weight {g_weight}")
        if float(g_weight) > 0:
            groups_loss.append((g_index.to(device), int(g_index.max()) + 1, float(g_weight)))
    if use_energy:
        e_ref = _as_frames(np.asarray(energies, dtype=np.float64).reshape(-1, 1, 1), "energies", dtype, (1, 1),
                           n_frames).reshape(-1)
    n_model = getattr(getattr(model, "topology", None), "n_beads", n_beads)
    if n_model != n_beads:
        raise EnpcgError(f"train_force_matching: positions have {n_beads} beads but the model's topology has "
                         f"{n_model}; map the data with the same CG topology")
    cutoff = getattr(model, "config", {}).get("cutoff")
    if cell is not None and cutoff is not None:
        # Smallest box width (distance between opposite faces) must exceed twice the cutoff.
        a, b, c = cell[:, 0], cell[:, 1], cell[:, 2]
        vol = torch.abs(torch.linalg.det(cell))
        widths = torch.stack([vol / torch.linalg.norm(torch.linalg.cross(b, c, dim=-1), dim=-1),
                              vol / torch.linalg.norm(torch.linalg.cross(c, a, dim=-1), dim=-1),
                              vol / torch.linalg.norm(torch.linalg.cross(a, b, dim=-1), dim=-1)])
        if float(widths.min()) < 2.0 * cutoff:
            raise EnpcgError(f"train_force_matching: model cutoff {cutoff} nm exceeds half the smallest box width "
                             f"({float(widths.min()):.4g} nm); lower the cutoff in the model config")

    model.to(device)
    if prior is not None:
        # The prior is evaluated in its own dtype (float64 data give float64 prior forces).
        prior.to(device)
        pdt = model_dtype(prior)
        p_pos = _as_frames(positions, "positions", pdt)
        p_box = None if box is None else _as_frames(box, "box", pdt)
        prior_e, prior_f = _prior_forces(prior, p_pos, p_box, batch_size, device)
        target = ref - prior_f.to(dtype)
        if use_energy:
            e_ref = e_ref - prior_e.to(dtype)
    else:
        target = ref
    train_idx, val_idx = _split(n_frames, val_fraction, seed)
    # The data stay where the model is: a few hundred MB at most for CG data sets.
    pos, target = pos.to(device), target.to(device)
    e_target = e_ref.to(device) if use_energy else None
    cell = None if cell is None else cell.to(device)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EnpcgError("train_force_matching: the model has no trainable parameters")
    # AdamW: with weight_decay=0 it is Adam. A model may say which parameters to decay (optimizer_groups);
    # the neural model decays only its many-body branch, so that pair-like effects go to its pair channel.
    groups_fn = getattr(model, "optimizer_groups", None)
    if weight_decay and callable(groups_fn):
        groups = groups_fn(float(weight_decay))
    else:
        groups = [{"params": params, "weight_decay": float(weight_decay)}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    if schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=lr_factor,
                                                               patience=lr_patience, min_lr=min_lr)
    elif schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=min_lr)
    elif schedule == "cosine_time":
        if not max_minutes:
            raise EnpcgError("train_force_matching: schedule 'cosine_time' decays over max_minutes; set "
                             "max_minutes > 0 or use schedule 'cosine'")
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)  # lr set per step
    else:
        raise EnpcgError(f"train_force_matching: schedule must be 'plateau', 'cosine' or 'cosine_time'; you "
                         f"supplied {schedule!r}")
    # Settings that shape the optimisation path (epochs may grow on resume; patience, max_minutes may change).
    settings = {"batch_size": int(batch_size), "lr": float(lr), "seed": int(seed),
                "val_fraction": float(val_fraction), "schedule": schedule, "weight_decay": float(weight_decay), "ema_decay": float(ema_decay),
                "select_best": bool(select_best), "lr_factor": float(lr_factor), "lr_patience": int(lr_patience),
                "min_lr": float(min_lr)}
    if use_energy:  # absent otherwise, so force-only checkpoints keep their fingerprint
        settings.update(energy_weight=float(energy_weight), force_weight=float(force_weight),
                        energy_sum=float(e_target.double().sum()))
    elif force_weight != 1.0:
        settings["force_weight"] = float(force_weight)
    if groups_loss:
        settings["force_groups"] = [[w, n, int(g.sum())] for g, n, w in groups_loss]
    fingerprint = _fingerprint(model, pos, target, cell, prior, settings)
    history = {"epoch": [], "train_rmse": [], "val_rmse": [], "lr": [], "best_epoch": 0,
               "best_val_rmse": math.inf, "kept_epoch": 0, "stopped": "running", "units": "kJ/mol/nm"}
    if use_energy:
        history.update(train_energy_rmse=[], val_energy_rmse=[], energy_units="kJ/mol per bead")
    # The weights that are validated and kept: the live model, or its moving average.
    averaged = copy.deepcopy(model) if ema_decay > 0 else model
    best_state = _cpu_state(model)
    best_val = math.inf
    bad_epochs = 0
    start_epoch = 1
    ckpt_path = out_dir / CHECKPOINT

    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt.get("fingerprint") != fingerprint:
            raise EnpcgError(f"{ckpt_path}: checkpoint was written for other data or settings "
                             f"({ckpt.get('fingerprint')} vs {fingerprint}); delete it or pass resume=False")
        model.load_state_dict(ckpt["model"])
        if ema_decay > 0:
            averaged.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        best_state, best_val, bad_epochs = ckpt["best_state"], float(ckpt["best_val"]), int(ckpt["bad_epochs"])
        history = ckpt["history"]
        _set_rng_state(ckpt["rng"])
        start_epoch = int(ckpt["epoch"]) + 1
        if history.get("stopped") == "early_stopping":
            start_epoch = epochs + 1  # nothing left to do: return the best weights

    def group_loss(df):
        """Weighted mean squared group-sum force errors of df (B, n, 3) kJ/mol/nm; a 0-d tensor."""
        loss = df.new_zeros(())
        for g_index, n_groups, g_weight in groups_loss:
            sums = df.new_zeros(df.shape[0], n_groups, 3).index_add_(1, g_index, df)
            loss = loss + g_weight * (sums ** 2).mean()
        return loss

    def evaluate(idx):
        """Mean squared force error (kJ/mol/nm)^2, energy error per bead (kJ/mol)^2 and weighted group-force
        loss over frames idx."""
        total, e_total, g_total = 0.0, 0.0, 0.0
        mine = distributed.shard(idx)  # each rank sums over its share of the frames; one process: all
        for s in range(0, len(mine), batch_size):
            b = torch.as_tensor(mine[s:s + batch_size], device=device)
            e, f = batch_forces(averaged, pos[b], None if cell is None else cell[b])
            df = f.detach() - target[b]
            total += float((df ** 2).sum())
            g_total += float(group_loss(df)) * len(b)
            if use_energy:
                e_total += float((((e.detach() - e_target[b]) / n_beads) ** 2).sum())
        if parallel:
            total, e_total, g_total = distributed.all_reduce_floats([total, e_total, g_total])
        return total / (len(idx) * n_beads * 3), e_total / len(idx), g_total / len(idx)

    def combined(f_mse, e_mse, g_mse):
        # Force-only fits rank epochs by the force error itself (force_weight 1 leaves it unchanged).
        return force_weight * f_mse + (energy_weight * e_mse if use_energy else 0.0) + g_mse

    stop_after = os.environ.get(STOP_ENV)
    stop_after = int(stop_after) if stop_after else None
    t0 = time.monotonic()
    seconds_before = float(history.get("train_seconds", 0.0))  # wall time of earlier runs (resume)
    eval_seconds = 0.0  # duration of the last validation pass

    def time_cosine_lr(elapsed):
        frac = min(1.0, elapsed / (60.0 * max_minutes))
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def batch_loss(energy_model, b, share):
        """Training loss of frames b (a 0-d tensor), and its force and energy terms (means over b).

        share scales the loss of a rank's shard (1 for one process, see the module docstring)."""
        e, f = batch_forces(energy_model, pos[b], None if cell is None else cell[b], create_graph=True)
        df = f - target[b]
        f_loss = (df ** 2).mean()
        loss = f_loss * force_weight
        if groups_loss:
            loss = loss + group_loss(df)
        e_loss = None
        if use_energy:
            e_loss = (((e - e_target[b]) / n_beads) ** 2).mean()
            loss = loss + energy_weight * e_loss
        if parallel:
            loss = loss * share
        return loss, f_loss, e_loss

    energy_model = model  # what the training steps differentiate: the model, or the model under DDP
    if parallel:
        # Parameters the loss does not reach (found once, on the same frames on every rank) are left to DDP
        # as ignored. Building DDP is a collective, so no rank passes here before all have read the checkpoint.
        probe = torch.as_tensor(train_idx[:batch_size], device=device)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(batch_loss(model, probe, 1.0)[0], [p for _, p in named], allow_unused=True)
        energy_model = _data_parallel(model, device, [n for (n, _), g in zip(named, grads) if g is None])
        del grads
    world = distributed.world_size()
    bar = tqdm(total=epochs, initial=min(start_epoch - 1, epochs), disable=not (progress and main),
               desc="force matching", unit="epoch")
    stopped = history.get("stopped", "running") if start_epoch > epochs else "max_epochs"
    try:
        for epoch in range(start_epoch, epochs + 1):
            model.train()
            order = _epoch_order(train_idx, seed, epoch)
            sq_sum, e_sq_sum, n_seen, budget_hit = 0.0, 0.0, 0, False
            for s in range(0, len(order), batch_size):
                batch = order[s:s + batch_size]
                mine = distributed.shard(batch)  # this rank's frames of the batch (one process: all)
                # DDP averages gradients over ranks: a shard's mean loss enters with weight world x its share
                # of the batch. A rank with no frame evaluates one with weight 0, so it still joins the
                # gradient all-reduce.
                share = world * len(mine) / len(batch)
                n_mine = len(mine)
                if not n_mine:
                    mine = batch[:1]
                b = torch.as_tensor(mine, device=device)
                if schedule == "cosine_time":
                    # The budget covers everything: stop stepping in time for the epoch's validation pass.
                    # Ranks follow rank 0's clock, so they stop at the same step with the same rates.
                    elapsed, eval_time = distributed.broadcast_floats(
                        [seconds_before + time.monotonic() - t0, eval_seconds])
                    if s and elapsed + eval_time >= 60.0 * max_minutes:
                        budget_hit = True
                        break
                    for group in optimizer.param_groups:
                        group["lr"] = time_cosine_lr(elapsed)
                loss, f_loss, e_loss = batch_loss(energy_model, b, share)
                if use_energy:
                    e_sq_sum += float(e_loss.detach()) * n_mine
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if ema_decay > 0:
                    with torch.no_grad():
                        torch._foreach_lerp_(list(averaged.parameters()), list(model.parameters()),
                                             1.0 - ema_decay)
                sq_sum += float(f_loss.detach()) * n_mine
                n_seen += n_mine
            if parallel:
                sq_sum, e_sq_sum, n_seen = distributed.all_reduce_floats([sq_sum, e_sq_sum, n_seen])
            train_mse = sq_sum / max(1, n_seen)
            model.eval()
            t_eval = time.monotonic()
            val_force_mse, val_energy_mse, val_group_mse = evaluate(val_idx)
            eval_seconds = time.monotonic() - t_eval
            val_mse = combined(val_force_mse, val_energy_mse, val_group_mse)
            if schedule == "plateau":
                scheduler.step(val_mse)
            elif schedule == "cosine":
                scheduler.step()
            history["train_seconds"] = seconds_before + time.monotonic() - t0
            improved = val_mse < best_val
            if improved:
                best_val, bad_epochs = val_mse, 0
                history["best_epoch"], history["best_val_rmse"] = epoch, math.sqrt(val_force_mse)
            else:
                bad_epochs += 1
            if improved or not select_best:
                best_state = _cpu_state(averaged)
                history["kept_epoch"] = epoch
            history["epoch"].append(epoch)
            history["train_rmse"].append(math.sqrt(train_mse))
            history["val_rmse"].append(math.sqrt(val_force_mse))
            if use_energy:
                history["train_energy_rmse"].append(math.sqrt(e_sq_sum / max(1, n_seen)))
                history["val_energy_rmse"].append(math.sqrt(val_energy_mse))
            history["lr"].append(float(optimizer.param_groups[0]["lr"]))
            finished = bad_epochs >= patience or epoch == epochs
            spent = time.monotonic() - t0 + (seconds_before if schedule == "cosine_time" else 0.0)
            if parallel:
                (spent,) = distributed.broadcast_floats([spent])  # rank 0's clock: every rank stops alike
            out_of_time = max_minutes is not None and (spent / 60.0 >= max_minutes or budget_hit)
            history["stopped"] = ("early_stopping" if bad_epochs >= patience else
                                  "max_epochs" if epoch == epochs else
                                  "max_minutes" if out_of_time else "running")
            ckpt = {"model": _cpu_state(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch, "best_state": best_state,
                    "best_val": best_val, "bad_epochs": bad_epochs, "history": history, "rng": _rng_state(),
                    "fingerprint": fingerprint}
            if ema_decay > 0:
                ckpt["ema"] = _cpu_state(averaged)
            if main:  # one writer; the others wait until the checkpoint is complete
                with atomic_path(ckpt_path) as tmp:
                    torch.save(ckpt, tmp)
                write_json(out_dir / HISTORY, history)  # cheap; lets a user follow a long fit
                __import__("enpcg.crash_test", fromlist=["_"]).maybe_kill("fit", epoch)  # ENPCG_KILL_AT test hook
            distributed.barrier()
            bar.update(1)
            bar.set_postfix(train=f"{history['train_rmse'][-1]:.4g}", val=f"{history['val_rmse'][-1]:.4g}",
                            lr=f"{history['lr'][-1]:.2g}")
            if stop_after is not None and epoch == stop_after:
                raise KeyboardInterrupt(f"{STOP_ENV}={stop_after}: stopped after the checkpoint of epoch {epoch}")
            if finished or out_of_time:
                stopped = history["stopped"]
                break
    finally:
        bar.close()

    history["stopped"] = stopped
    del energy_model  # drops DDP's gradient hooks from the model's parameters
    model.load_state_dict(best_state)
    model.eval()
    model.to(home)
    if prior is not None:
        prior.to(home)
    if main:
        write_json(out_dir / HISTORY, history)
        if history["epoch"]:
            write_training_curve(history, out_dir / CURVE)
    distributed.barrier()
    return model, history
