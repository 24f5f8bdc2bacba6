"""Crash-safety test hook: kill this process with SIGKILL at a named checkpoint of a stage.

A ``kill -9`` gives a process no chance to flush, close or clean up, so it is the honest test of the
checkpoint/resume protocols of ``enpcg sample``, ``enpcg fit`` and ``enpcg simulate`` (a KeyboardInterrupt
runs ``finally`` blocks and context managers; SIGKILL does not). The stages call :func:`maybe_kill` at their
checkpoint points; it does nothing unless the environment variable ``ENPCG_KILL_AT`` names that point::

    ENPCG_KILL_AT="<stage>:<n>"          kill right after checkpoint n is on disk (renamed into place)
    ENPCG_KILL_AT="<stage>:<n>:mid"      kill in the middle of checkpoint n: its frames are appended and
                                         flushed, the new checkpoint is written under its temporary name,
                                         but not yet renamed; the previous checkpoint is the valid one

``stage`` and ``n``:

* ``sample``: n = frames in the H5MD file (its counter) when the checkpoint is saved; 0 is the checkpoint
  before the first frame (after equilibration). Checkpoints follow every ``flush_every`` frames (10).
* ``fit``: n = epoch (from 1) of a neural fit, after ``checkpoint.pt`` and ``history.json`` are written.
  There is no ``mid`` point: the trainer writes its checkpoint through ``fileio.atomic_path`` in one call.
  MS-CG spline fits and priors are one-shot (no checkpoints): a killed fit is simply rerun.
* ``simulate``: n = frames in the trajectory (reports done) when the checkpoint is saved; 0 is the
  checkpoint of the starting state (after minimisation).

"Durably" here means the data were handed to the kernel (written and flushed; the simulate and sample
checkpoints are also fsync'ed): what a killed process wrote survives it. Losing power is another matter.
"""
from __future__ import annotations

import os
import signal
import sys

from .errors import EnpcgError

ENV = "ENPCG_KILL_AT"
STAGES = ("sample", "fit", "simulate")
POINTS = ("after", "mid")


def parse(spec: str):
    """``"<stage>:<n>[:<point>]"`` -> (stage, n, point); EnpcgError naming the variable if malformed."""
    parts = spec.strip().split(":")
    ok = len(parts) in (2, 3) and parts[0] in STAGES and parts[1].strip().isdigit()
    point = parts[2] if len(parts) == 3 else "after"
    if not ok or point not in POINTS:
        raise EnpcgError(f"{ENV}={spec!r}: expected '<stage>:<n>' or '<stage>:<n>:mid' with stage one of "
                         f"{list(STAGES)} and n a whole number. Fix: correct or unset {ENV} (a test hook)")
    return parts[0], int(parts[1]), point


def maybe_kill(stage: str, index: int, point: str = "after") -> None:
    """SIGKILL this process if ``ENPCG_KILL_AT`` names (stage, index, point); otherwise return at once."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    if parse(spec) == (stage, int(index), point):
        # Python's own buffers die with the process, as they would in a real crash; flush the console
        # streams only, so that the test's captured output shows how far the stage got.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os.kill(os.getpid(), signal.SIGKILL)
