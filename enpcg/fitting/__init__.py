"""Fitting CG models to mapped data: Boltzmann-inverted priors and MS-CG splines (units nm, kJ/mol, K).

``fit_priors`` and ``fit_spline`` are imported lazily so that importing this package stays cheap.
"""

__all__ = ["fit_priors", "fit_spline"]


def __getattr__(name):
    if name == "fit_priors":
        from .boltzmann import fit_priors
        return fit_priors
    if name == "fit_spline":
        from .mscg import fit_spline
        return fit_spline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
