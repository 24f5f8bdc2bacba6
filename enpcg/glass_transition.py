"""Glass transition temperature from cooling curves: a continuous two-line fit, averages over quenches, rates.

Pure numpy/scipy (no OpenMM). Units: temperatures in K; the fitted observable ``y`` in whatever unit it comes
in (density g/cm^3, number density nm^-3, enthalpy kJ/mol, volume nm^3, ...); slopes in (unit of y)/K;
cooling rates in K/ps.

The model (:func:`two_line_fit`) is the continuous piecewise-linear ("hinge") curve

    y(T) = c + s_glass (T - T_g)   for T <  T_g
    y(T) = c + s_melt  (T - T_g)   for T >= T_g

with four parameters (c, s_glass, s_melt, T_g). For a fixed T_g it is linear in (c, s_glass, s_melt), so the
residual sum of squares profile RSS(T_g) is computed exactly by linear least squares; T_g minimises it (a grid
scan, then a bounded scalar minimisation around the best grid point).

Standard error of T_g: from the profile of the residual sum of squares (a profile-likelihood interval). With
sigma^2 = RSS_min / (n - 4), the 68.27 % interval is {T_g : RSS(T_g) <= RSS_min + sigma^2 t^2}, t the 84.13 %
quantile of Student's t with n - 4 degrees of freedom (F(1, n-4) for one parameter); the standard error is
half its width. It assumes independent residuals of equal variance. Consecutive records of one MD quench are
correlated, so for simulation data the per-fit standard error is a lower bound; :func:`glass_transition`
therefore quotes the spread of T_g over independent quenches, which makes no such assumption.

>>> fit = two_line_fit(records.set_temperature, records.density)
>>> result = glass_transition([q1, q2, q3], observable="density")     # mean T_g and its standard error
>>> compare_rates(result_fast, result_slow).faster_is_higher
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from enpcg.errors import EnpcgError

# Unit labels of the observables that the protocols record (openmm_plugin.protocols.ProtocolRecords).
OBSERVABLE_UNITS = {
    "density": "g/cm^3",
    "number_density": "nm^-3",
    "enthalpy": "kJ/mol",
    "potential_energy": "kJ/mol",
    "volume": "nm^3",
}

_ONE_SIGMA = 0.841344746068543  # Phi(1): the upper end of the central 68.27 % interval


@dataclass
class TwoLineFit:
    """A continuous two-line fit y(T); see the module docstring for the model.

    Attributes
    ----------
    t_g : float
        Breakpoint (glass transition temperature), K.
    t_g_se : float
        Standard error of ``t_g`` from the RSS profile (half the width of the 68.27 % profile interval), K.
    t_g_low, t_g_high : float
        Ends of that interval, K. Where the profile stays below the threshold up to the end of the allowed
        breakpoint range the interval is cut there and ``se_bounded`` is True (``t_g_se`` is then a lower bound).
    slope_glass : float
        Slope below ``t_g`` (the glass branch), unit of y per K.
    slope_melt : float
        Slope above ``t_g`` (the liquid / melt branch), unit of y per K.
    intercept : float
        Value of both lines at ``t_g``, unit of y.
    rss : float
        Residual sum of squares at the optimum, (unit of y)^2.
    sigma : float
        Residual standard deviation sqrt(rss / (n - 4)), unit of y.
    n_points : int
        Points used (inside [t_min, t_max], finite).
    t_range : tuple of float
        (lowest, highest) temperature used, K.
    se_bounded : bool
        See ``t_g_low``.
    se_method : str
        How ``t_g_se`` was obtained ("profile RSS").
    """

    t_g: float
    t_g_se: float
    t_g_low: float
    t_g_high: float
    slope_glass: float
    slope_melt: float
    intercept: float
    rss: float
    sigma: float
    n_points: int
    t_range: tuple
    se_bounded: bool = False
    se_method: str = "profile RSS"

    def predict(self, temperature) -> np.ndarray:
        """The fitted curve at ``temperature`` (K, scalar or array), in the unit of y."""
        t = np.asarray(temperature, dtype=np.float64) - self.t_g
        return self.intercept + self.slope_glass * np.minimum(t, 0.0) + self.slope_melt * np.maximum(t, 0.0)


@dataclass
class GlassTransition:
    """T_g over several independent quenches at one cooling rate.

    Attributes
    ----------
    t_g : float
        Mean of the per-quench T_g, K.
    t_g_se : float
        Standard error of the mean over quenches, std(ddof=1) / sqrt(n), K (needs n >= 2).
    t_g_std : float
        Sample standard deviation of the per-quench T_g (ddof=1), K.
    t_g_values : np.ndarray
        Per-quench T_g, K.
    fits : list of TwoLineFit
        The per-quench fits.
    n_quenches : int
    cooling_rate : float or None
        K/ps, when given or stored with the records.
    observable : str
        Name of the fitted observable.
    """

    t_g: float
    t_g_se: float
    t_g_std: float
    t_g_values: np.ndarray
    fits: list = field(repr=False)
    n_quenches: int
    cooling_rate: Optional[float]
    observable: str


@dataclass
class RateComparison:
    """T_g at a faster against a slower cooling rate.

    Attributes
    ----------
    difference : float
        T_g(fast) - T_g(slow), K.
    se : float
        Combined standard error sqrt(se_fast^2 + se_slow^2), K.
    z : float
        difference / se (inf when se is 0 and the difference positive).
    n_se : float
        Threshold in combined standard errors.
    faster_is_higher : bool
        True when difference > n_se * se.
    rate_fast, rate_slow : float or None
        Cooling rates, K/ps, when known.
    """

    difference: float
    se: float
    z: float
    n_se: float
    faster_is_higher: bool
    rate_fast: Optional[float]
    rate_slow: Optional[float]


def _hinge_rss(t, y, breaks):
    """RSS and coefficients (c, s_glass, s_melt) of the hinge fit for each breakpoint in ``breaks``."""
    d = t[None, :] - breaks[:, None]
    x = np.stack([np.ones_like(d), np.minimum(d, 0.0), np.maximum(d, 0.0)], axis=-1)  # (G, n, 3)
    xtx = np.einsum("gni,gnj->gij", x, x)
    xty = np.einsum("gni,n->gi", x, y)
    try:
        coef = np.linalg.solve(xtx, xty[..., None])[..., 0]
    except np.linalg.LinAlgError:  # a breakpoint with no point on one side: minimum-norm solution instead
        coef = np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(xtx, xty)])
    resid = y[None, :] - np.einsum("gni,gi->gn", x, coef)
    return np.einsum("gn,gn->g", resid, resid), coef


def two_line_fit(temperature, y, *, t_min=None, t_max=None, min_points_per_side: int = 3,
                 n_grid: int = 400) -> TwoLineFit:
    """Fit ``y(T)`` with two straight lines that meet at T_g (continuous, the breakpoint a free parameter).

    Parameters
    ----------
    temperature : array_like, shape (n,)
        Temperatures, K (for a quench, the set temperature of each record).
    y : array_like, shape (n,)
        Observable (density g/cm^3, enthalpy kJ/mol, ...); non-finite points are dropped.
    t_min, t_max : float, optional
        Use only points with t_min <= T <= t_max, K.
    min_points_per_side : int
        The breakpoint is searched between the ``min_points_per_side``-th lowest and highest temperatures, so
        that each line rests on at least that many points.
    n_grid : int
        Breakpoints tried in the scan before the local refinement.

    Returns
    -------
    TwoLineFit
        T_g (K), its profile-RSS standard error (K), slopes (unit of y per K), intercept at T_g, RSS.
    """
    from scipy import optimize, stats

    t = np.asarray(temperature, dtype=np.float64).ravel()
    v = np.asarray(y, dtype=np.float64).ravel()
    if t.shape != v.shape:
        raise EnpcgError(f"two_line_fit: temperature and y must have the same length; you supplied {t.size} "
                         f"and {v.size} values. Fix: pass one y value per temperature")
    keep = np.isfinite(t) & np.isfinite(v)
    if t_min is not None:
        keep &= t >= float(t_min)
    if t_max is not None:
        keep &= t <= float(t_max)
    t, v = t[keep], v[keep]
    k = int(min_points_per_side)
    if k < 2:
        raise EnpcgError(f"two_line_fit: min_points_per_side must be >= 2; you supplied {min_points_per_side}")
    n = t.size
    if n < max(2 * k, 6):
        raise EnpcgError(f"two_line_fit: {n} finite points in [t_min={t_min}, t_max={t_max}] K; at least "
                         f"{max(2 * k, 6)} are needed (4 parameters and {k} points per line). Fix: widen "
                         "t_min/t_max or record more often (smaller record_interval)")
    order = np.argsort(t, kind="stable")
    t, v = t[order], v[order]
    lo, hi = t[k - 1], t[n - k]
    if not hi > lo:
        raise EnpcgError(f"two_line_fit: the temperatures span no range for a breakpoint ({lo} K to {hi} K "
                         f"after keeping {k} points per side). Fix: pass data over a range of temperatures")

    grid = np.linspace(lo, hi, int(n_grid))
    rss_grid, _ = _hinge_rss(t, v, grid)
    g = int(np.argmin(rss_grid))

    def profile(b):
        return float(_hinge_rss(t, v, np.array([b]))[0][0])

    a, b = grid[max(g - 1, 0)], grid[min(g + 1, grid.size - 1)]
    res = optimize.minimize_scalar(profile, bounds=(a, b), method="bounded",
                                   options={"xatol": 1e-10 * max(1.0, abs(grid[g]))})
    t_g, rss = (float(res.x), float(res.fun)) if res.fun <= rss_grid[g] else (float(grid[g]), float(rss_grid[g]))
    _, coef = _hinge_rss(t, v, np.array([t_g]))
    c, s_glass, s_melt = (float(x) for x in coef[0])

    dof = n - 4
    sigma2 = rss / dof
    threshold = rss + sigma2 * stats.t.ppf(_ONE_SIGMA, dof) ** 2

    def crossing(direction):
        # Walk the grid away from the optimum to the first point above the threshold, then root-find between.
        idx = np.searchsorted(grid, t_g)
        steps = range(idx - 1, -1, -1) if direction < 0 else range(idx, grid.size)
        inner = t_g
        for j in steps:
            if rss_grid[j] > threshold:
                outer = grid[j]
                return optimize.brentq(lambda x: profile(x) - threshold, min(inner, outer), max(inner, outer),
                                       xtol=1e-9 * max(1.0, abs(t_g))), False
            inner = grid[j]
        return (lo if direction < 0 else hi), True

    if sigma2 > 0:
        t_low, bounded_low = crossing(-1)
        t_high, bounded_high = crossing(+1)
    else:  # exact data: the breakpoint is determined exactly
        t_low, t_high, bounded_low, bounded_high = t_g, t_g, False, False
    return TwoLineFit(t_g=t_g, t_g_se=0.5 * (t_high - t_low), t_g_low=float(t_low), t_g_high=float(t_high),
                      slope_glass=s_glass, slope_melt=s_melt, intercept=c, rss=rss, sigma=math.sqrt(sigma2),
                      n_points=n, t_range=(float(t[0]), float(t[-1])),
                      se_bounded=bool(bounded_low or bounded_high))


def _field(q, name, where):
    """Array ``name`` of one quench: a Mapping, an object with that attribute, or a path to an .npz file."""
    if isinstance(q, (str, Path)):
        with np.load(q, allow_pickle=False) as z:
            if name not in z.files:
                raise EnpcgError(f"{where}: file {q} has no array {name!r}; it holds {sorted(z.files)}. Fix: "
                                 "pass observable=/temperature= naming one of them")
            return np.asarray(z[name])
    if isinstance(q, Mapping):
        if name not in q:
            raise EnpcgError(f"{where}: no {name!r} among {sorted(q)}. Fix: pass observable=/temperature= "
                             "naming one of them")
        return np.asarray(q[name])
    if not hasattr(q, name):
        raise EnpcgError(f"{where}: a {type(q).__name__} has no attribute {name!r}. Fix: pass records from "
                         "openmm_plugin.protocols.quench, a dict of arrays, a (T, y) pair or an .npz path")
    return np.asarray(getattr(q, name))


def _quench_curve(q, observable, temperature, where):
    """(T in K, y) of one quench given as a (T, y) pair, a Mapping, a records object or an .npz path."""
    if isinstance(q, (tuple, list)) and len(q) == 2:
        return np.asarray(q[0], dtype=np.float64), np.asarray(q[1], dtype=np.float64)
    return (_field(q, temperature, where).astype(np.float64), _field(q, observable, where).astype(np.float64))


def _stored_rate(q):
    """The cooling rate (K/ps) stored with a quench's records, or None."""
    meta = q.get("metadata") if isinstance(q, Mapping) else getattr(q, "metadata", None)
    if isinstance(meta, Mapping) and meta.get("cooling_rate") is not None:
        return float(meta["cooling_rate"])
    return None


def glass_transition(quenches, *, observable: str = "density", temperature: str = "set_temperature",
                     t_min=None, t_max=None, cooling_rate=None, min_points_per_side: int = 3) -> GlassTransition:
    """T_g from several independent quenches at one cooling rate: fit each, average, standard error.

    Parameters
    ----------
    quenches : sequence
        Two or more quenches; each a records object from ``openmm_plugin.protocols.quench`` (its
        ``.records``), a quench result, a dict of arrays, a path to a records .npz, or a (T in K, y) pair.
    observable : str
        Field fitted against temperature: "density" (g/cm^3), "enthalpy" (kJ/mol), "number_density" (nm^-3),
        "volume" (nm^3), "potential_energy" (kJ/mol).
    temperature : str
        Temperature field, K: "set_temperature" (exact, the default) or "kinetic_temperature".
    t_min, t_max : float, optional
        Fit window, K.
    cooling_rate : float, optional
        K/ps; default the rate stored with the records (all must agree).
    min_points_per_side : int
        Passed to :func:`two_line_fit`.

    Returns
    -------
    GlassTransition
        Mean T_g (K), its standard error over quenches std(ddof=1)/sqrt(n) (K), per-quench values and fits.
        At least two quenches are needed: one quench gives no spread, and the per-fit profile error ignores
        the correlation of consecutive records.
    """
    quenches = list(quenches)
    if len(quenches) < 2:
        raise EnpcgError(f"glass_transition: quenches holds {len(quenches)} quench(es); n >= 2 independent "
                         "quenches (different seeds) are needed for a standard error over quenches. Fix: run "
                         "more quenches at this cooling rate, or use two_line_fit for a single curve")
    fits, rates = [], []
    for i, q in enumerate(quenches):
        if hasattr(q, "records") and not isinstance(q, Mapping):
            q = q.records  # a ProtocolResult
        t, y = _quench_curve(q, observable, temperature, f"glass_transition: quenches[{i}]")
        fits.append(two_line_fit(t, y, t_min=t_min, t_max=t_max, min_points_per_side=min_points_per_side))
        rates.append(_stored_rate(q))
    if cooling_rate is None:
        known = [r for r in rates if r is not None]
        if known and not np.allclose(known, known[0], rtol=1e-9, atol=0.0):
            raise EnpcgError(f"glass_transition: the quenches were run at different cooling rates {known} K/ps. "
                             "Fix: group quenches by rate and call glass_transition once per rate")
        cooling_rate = known[0] if known else None
    values = np.array([f.t_g for f in fits])
    std = float(np.std(values, ddof=1))
    return GlassTransition(t_g=float(values.mean()), t_g_se=std / math.sqrt(values.size), t_g_std=std,
                           t_g_values=values, fits=fits, n_quenches=values.size,
                           cooling_rate=None if cooling_rate is None else float(cooling_rate),
                           observable=observable)


def _tg_and_se(result, name):
    if isinstance(result, Mapping):
        get = result.get
    else:
        def get(key, default=None):
            return getattr(result, key, default)
    t_g, se = get("t_g"), get("t_g_se")
    if t_g is None or se is None or not np.isfinite(t_g) or not np.isfinite(se) or se < 0:
        raise EnpcgError(f"compare_rates: {name} needs finite t_g (K) and t_g_se >= 0 (K); you supplied "
                         f"t_g={t_g}, t_g_se={se}. Fix: pass a GlassTransition from glass_transition()")
    rate = get("cooling_rate")
    return float(t_g), float(se), (None if rate is None else float(rate))


def compare_rates(result_fast, result_slow, *, n_se: float = 2.0) -> RateComparison:
    """Is T_g at the faster cooling rate higher than at the slower one by more than ``n_se`` standard errors?

    Parameters
    ----------
    result_fast, result_slow : GlassTransition or Mapping
        Results at the faster and the slower rate (``t_g`` and ``t_g_se`` in K; ``cooling_rate`` in K/ps
        optional: when both are known the first must be the faster).
    n_se : float
        Threshold in combined standard errors.

    Returns
    -------
    RateComparison
        difference = T_g(fast) - T_g(slow) (K), its combined standard error sqrt(se_f^2 + se_s^2) (K), z, and
        ``faster_is_higher`` = difference > n_se * se.
    """
    tf, sf, rf = _tg_and_se(result_fast, "result_fast")
    ts, ss, rs = _tg_and_se(result_slow, "result_slow")
    if rf is not None and rs is not None and not rf > rs:
        raise EnpcgError(f"compare_rates: result_fast has cooling_rate {rf} K/ps, not faster than result_slow's "
                         f"{rs} K/ps. Fix: swap the arguments")
    diff = tf - ts
    se = math.hypot(sf, ss)
    z = diff / se if se > 0 else (math.inf if diff > 0 else (-math.inf if diff < 0 else 0.0))
    return RateComparison(difference=diff, se=se, z=z, n_se=float(n_se), faster_is_higher=bool(diff > n_se * se),
                          rate_fast=rf, rate_slow=rs)


def plot_glass_transition(quenches_by_rate, path, *, observable: str = "density",
                          temperature: str = "set_temperature", t_min=None, t_max=None, dpi: int = 120) -> Path:
    """Plot ``observable`` against T for each cooling rate with the fitted lines and T_g marked; write a PNG.

    Parameters
    ----------
    quenches_by_rate : Mapping
        Cooling rate (K/ps) -> list of quenches (anything :func:`glass_transition` accepts). With two or
        more quenches the marked T_g is their mean +- standard error; with one, its fit +- profile error.
    path : str or Path
        Output PNG, written atomically.
    observable, temperature, t_min, t_max
        As in :func:`glass_transition` (temperatures in K).
    dpi : int
        Resolution.

    Returns
    -------
    Path
        ``path``.
    """
    import matplotlib
    # The Agg canvas is attached to the Figure directly: no pyplot, no change of the global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from enpcg.fileio import atomic_path

    if not isinstance(quenches_by_rate, Mapping) or not quenches_by_rate:
        raise EnpcgError("plot_glass_transition: quenches_by_rate must be a non-empty dict {cooling rate in K/ps: "
                         f"[quenches]}}; you supplied {type(quenches_by_rate).__name__}")
    fig = Figure(figsize=(6.4, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, len(quenches_by_rate)))
    for colour, (rate, quenches) in zip(colours, sorted(quenches_by_rate.items(), key=lambda kv: -float(kv[0]))):
        quenches = list(quenches)
        curves = []
        for i, q in enumerate(quenches):
            if hasattr(q, "records") and not isinstance(q, Mapping):
                q = q.records
            curves.append(_quench_curve(q, observable, temperature, f"plot_glass_transition: rate {rate}[{i}]"))
        fits = [two_line_fit(t, y, t_min=t_min, t_max=t_max) for t, y in curves]
        if len(fits) >= 2:
            gt = glass_transition(curves, t_min=t_min, t_max=t_max, cooling_rate=float(rate))
            t_g, se = gt.t_g, gt.t_g_se
        else:
            t_g, se = fits[0].t_g, fits[0].t_g_se
        for j, ((t, y), f) in enumerate(zip(curves, fits)):
            ax.plot(t, y, ".", ms=2.5, color=colour, alpha=0.5,
                    label=f"{float(rate):g} K/ps: T_g = {t_g:.1f} ± {se:.1f} K" if j == 0 else None)
            tt = np.linspace(f.t_range[0], f.t_range[1], 200)
            ax.plot(tt, f.predict(tt), "-", lw=0.9, color=colour)
        ax.axvline(t_g, color=colour, ls="--", lw=1.0)
        ax.axvspan(t_g - se, t_g + se, color=colour, alpha=0.12, lw=0)
    unit = OBSERVABLE_UNITS.get(observable)
    ax.set_xlabel(f"{temperature.replace('_', ' ')} (K)")
    ax.set_ylabel(f"{observable.replace('_', ' ')}" + (f" ({unit})" if unit else ""))
    ax.set_title("Glass transition: two-line fits, T_g (dashed) ± standard error (band)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format="png", dpi=dpi)
    return path
