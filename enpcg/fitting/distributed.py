"""Data-parallel fitting across processes started by ``torchrun`` (PyTorch distributed).

``torchrun --nproc_per_node=N -m enpcg fit ...`` starts N copies of the fit with the environment variables
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. The fitting functions call
:func:`init_from_env`, which joins the process group when ``WORLD_SIZE > 1`` (gloo for CPU fits, NCCL for
GPU fits); without those variables (or with ``WORLD_SIZE=1``) nothing is initialised and every helper below
is the identity (one process owns all frames, ``is_main()`` is true), so single-process fits are unchanged.

Contract used by :mod:`enpcg.fitting.trainer` and :mod:`enpcg.fitting.mscg`:

* every rank holds the whole (CG-sized) dataset and takes a fixed share of frames: :func:`shard` splits an
  index array into ``world_size`` contiguous, ordered pieces (``numpy.array_split``; the first pieces get the
  extra frame), so the union over ranks is exactly the single-process batch;
* sums over frames are combined with :func:`all_reduce` (sum, min or max), after which every rank holds the
  same numbers and takes the same decisions (early stopping, learning rate, solution of the normal
  equations);
* only rank 0 writes files (:func:`is_main`); the others wait at :func:`barrier`.

No units: these helpers move numbers, not physics.
"""
from __future__ import annotations

import atexit
import os
from datetime import timedelta

import numpy as np
import torch

from ..errors import EnpcgError

# A fit's ranks wait for each other at every all-reduce; one slow collective (a long validation pass, rank 0
# writing a large checkpoint) must not time out, so the limit is generous.
TIMEOUT = timedelta(hours=2)


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise EnpcgError(f"environment variable WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer. Fix: "
                         "launch with torchrun, which sets it, or unset it") from None


def is_distributed() -> bool:
    """True when this process is one of several ranks of an initialised process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def rank() -> int:
    """This process's rank: from the process group, else from torchrun's ``RANK`` (0 without torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """Number of ranks of the process group (1 when none is initialised)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the process that writes files: rank 0, or the only process."""
    return rank() == 0


def init_from_env(device=None) -> bool:
    """Join the process group described by torchrun's environment, once; returns :func:`is_distributed`.

    device : the fitting device ("cpu", "cuda", a torch.device or None). CPU fits use the gloo backend; CUDA
    fits use NCCL and bind this rank to ``cuda:LOCAL_RANK``. Does nothing when ``WORLD_SIZE`` is unset or 1,
    or when a process group already exists (a caller may initialise its own).
    """
    if _env_world_size() <= 1 or not torch.distributed.is_available():
        return False
    if torch.distributed.is_initialized():
        return is_distributed()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise EnpcgError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set. Fix: launch with "
                         "`torchrun --nproc_per_node=N -m enpcg fit ...`, which sets them, or unset WORLD_SIZE")
    cuda = torch.device(device).type == "cuda" if device is not None else False
    if cuda:
        if not torch.distributed.is_nccl_available():
            raise EnpcgError("fit.device is cuda under torchrun but this torch build has no NCCL. Fix: pass "
                             "--device cpu (gloo) or install a CUDA build of torch")
        torch.cuda.set_device(local_device("cuda"))
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
    atexit.register(_destroy)
    return is_distributed()


def _destroy():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def local_device(device) -> torch.device:
    """``device`` with a CUDA device bound to this rank (``cuda`` -> ``cuda:LOCAL_RANK``) under torchrun."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and _env_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return device


def shard(indices) -> np.ndarray:
    """This rank's share of ``indices`` (1-D): contiguous pieces in order, sizes differing by at most one.

    Ranks 0..W-1 get ``np.array_split(indices, W)``; some ranks get none when there are fewer indices than
    ranks. One process gets all of them.
    """
    indices = np.asarray(indices)
    if not is_distributed():
        return indices
    return np.array_split(indices, world_size())[rank()]


def _collective_device():
    # NCCL reduces only CUDA tensors, gloo reduces CPU tensors.
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Combine ``tensor`` over all ranks in place (``op``: "sum", "min" or "max") and return it.

    Every rank ends with the same values. Without a process group the tensor is returned untouched.
    """
    if not is_distributed():
        return tensor
    ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN,
           "max": torch.distributed.ReduceOp.MAX}
    dev = _collective_device()
    buf = tensor if tensor.device == dev else tensor.to(dev)
    torch.distributed.all_reduce(buf, op=ops[op])
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def all_reduce_floats(values, op: str = "sum") -> list:
    """Python floats combined over all ranks (float64, one collective); returned as a list of floats."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return all_reduce(t, op).tolist()


def broadcast_floats(values, src: int = 0) -> list:
    """Rank ``src``'s floats on every rank (e.g. its wall clock, so that time-based decisions agree)."""
    if not is_distributed():
        return [float(v) for v in values]
    dev = _collective_device()
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
    torch.distributed.broadcast(t, src=src)
    return t.cpu().tolist()


def barrier():
    """Wait for every rank (no-op for one process): used after rank 0 writes files the others may read."""
    if is_distributed():
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch.distributed.barrier()
