"""Atomistic reference systems (OpenMM Systems built from scratch) and their bundled data.

``systems.polyethylene``: united-atom polyethylene melt (TraPPE-UA, flexible bonds); the bundled
equilibrated melt (21 chains x 48 sites, 450 K, 1 bar) lies in ``systems/data/pe_melt.*``.

``systems.otp``: Lewis-Wahnstrom ortho-terphenyl, a rigid three-site LJ glass former (``build_liquid``,
``create_system``, ``site_coordinates``; mapping ``systems/mappings/otp_frame.yaml``, one oriented bead per
molecule). ``systems.methylpentane``: TraPPE-UA 3-methylpentane with flexible bonds, a molecular glass former
(``build_liquid``, ``create_system``; mapping ``systems/mappings/methylpentane_frame.yaml``).

Glass formers in reduced Lennard-Jones units (sigma = 1 nm, epsilon = 1 kJ/mol, m = 1 amu, so tau = 1 ps and
T* = 1 is 120.27 K): ``systems.kob_andersen``, the Kob-Andersen 80:20 binary mixture (a model of Ni80P20);
``systems.bead_spring``, the Kremer-Grest melt (FENE + WCA) and a bead-spring polymer glass former (FENE +
LJ cut at 2.5 sigma). Import those modules directly (``from systems import otp``).

The names in ``__all__`` (all from ``systems.polyethylene``) are imported lazily, so that ``import systems``
does not load OpenMM.
"""
_EXPORTS = {"PolymerSystem", "build_melt", "create_system", "default_melt", "load_melt", "load_reference",
            "save_melt", "reference_paths"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        from . import polyethylene

        return getattr(polyethylene, name)
    raise AttributeError(f"module 'systems' has no attribute {name!r}")
