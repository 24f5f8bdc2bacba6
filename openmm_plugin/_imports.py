"""The one place that imports ``openmmtorch`` (and ``vesin_torch``), always after ``torch``.

``openmmtorch`` links against libtorch; importing it before ``torch`` has loaded its shared libraries fails
(typically with a missing ``libnvrtc``/``libtorch`` error). Every module of this package that needs
``openmmtorch`` gets it from :func:`import_openmmtorch`.

``vesin_torch`` registers TorchScript operators (neighbour lists) when imported. A TorchScript model that
calls them can be scripted, loaded by OpenMM (also from a serialized System) and run only once it is
imported, so both helpers below import it when it is installed.

OpenMM loads its plugin libraries when ``openmm`` is first imported. If that happened before ``torch`` was
imported, the openmm-torch kernel plugins failed to load (libtorch/libnvrtc not yet loaded) and a Context
with a TorchForce fails with "Specified a Platform for a Context which does not support all required
kernels". :func:`import_openmmtorch` loads those plugins again once torch is in, so import order in user
scripts does not matter.
"""
import importlib
import logging
import re

import torch  # noqa: F401  (must precede openmmtorch: it loads libtorch)

from enpcg.errors import EnpcgError

_INSTALL_HINT = ("install it with 'conda install -c conda-forge openmm-torch' (or 'pip install openmmtorch'), "
                 "built against the same torch and openmm as this environment")


_reloaded_plugins = False


def _reload_torch_plugins():
    """Retry loading openmm-torch kernel plugins that failed because openmm was imported before torch."""
    global _reloaded_plugins
    if _reloaded_plugins:
        return
    _reloaded_plugins = True
    import openmm

    for failure in openmm.Platform.getPluginLoadFailures():
        m = re.match(r"Error loading library (.+?libOpenMMTorch\w*\.\w+): ", failure)
        if m is None:
            continue
        try:
            openmm.Platform.loadPluginLibrary(m.group(1))
        except Exception:
            pass  # still unloadable (e.g. the OpenCL plugin on a machine without libOpenCL): nothing to do


class _DropSimtkWarning(logging.Filter):
    def filter(self, record):
        return "simtk.openmm" not in record.getMessage()


def ensure_vesin(required: bool = True):
    """Import ``vesin_torch`` (after torch) so its TorchScript operators are registered.

    Returns the module, or None when it is missing and ``required`` is False.
    """
    try:
        return importlib.import_module("vesin_torch")
    except ImportError as e:
        if not required:
            return None
        raise EnpcgError(f"this model needs the 'vesin_torch' neighbour-list package, which failed to import "
                         f"({e}); install it with 'pip install vesin-torch'") from None


def import_openmmtorch():
    """Return the ``openmmtorch`` module (imported after torch), or raise EnpcgError with an install hint."""
    from enpcg.allocator import keep_freed_memory

    keep_freed_memory()  # large per-step tensors: no page faults on every call (see enpcg.allocator)
    ensure_vesin(required=False)
    # openmmtorch's SWIG wrapper imports the deprecated ``simtk.openmm`` alias, which logs a warning on the
    # root logger that users cannot act on; filter that one record out while importing.
    root = logging.getLogger()
    quiet = _DropSimtkWarning()
    root.addFilter(quiet)
    try:
        module = importlib.import_module("openmmtorch")
    except ImportError as e:
        raise EnpcgError(f"backend='torch' needs the openmm-torch plugin, which failed to import ({e}); "
                         f"{_INSTALL_HINT}; or export with backend='python' (PythonForce) instead") from None
    finally:
        root.removeFilter(quiet)
    _reload_torch_plugins()
    return module
