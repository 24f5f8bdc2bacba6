"""Atomistic reference systems (OpenMM Systems built from scratch) and their bundled data.

``systems.polyethylene``: united-atom polyethylene melt (TraPPE-UA, flexible bonds); the bundled
equilibrated melt (21 chains x 48 sites, 450 K, 1 bar) lies in ``systems/data/pe_melt.*``. Names are
imported lazily so that ``import systems`` does not load OpenMM.
"""
_EXPORTS = {"PolymerSystem", "build_melt", "create_system", "default_melt", "load_melt", "load_reference",
            "save_melt", "reference_paths"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        from . import polyethylene

        return getattr(polyethylene, name)
    raise AttributeError(f"module 'systems' has no attribute {name!r}")
