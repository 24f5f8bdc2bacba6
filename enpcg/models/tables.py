"""Tabulated 1D functions evaluated exactly as OpenMM's ``Continuous1DFunction`` does.

OpenMM (``SplineFitter.cpp``, ``ReferenceTabulatedFunction.cpp``) places ``n`` values on the uniform grid
``x_k = min + k (max - min) / (n - 1)``, computes the second derivatives ``y2`` of the natural cubic spline
(zero curvature at both ends) or of the periodic spline (``y[0] == y[n-1]``), and evaluates, on the interval
``[x_k, x_k+1]`` of width ``h`` with ``a = (x_k+1 - t) / h`` and ``b = 1 - a``::

    f(t) = a y_k + b y_k+1 + ((a^3 - a) y2_k + (b^3 - b) y2_k+1) h^2 / 6

A non-periodic function is zero outside ``[min, max]``; a periodic one wraps ``t`` into ``[min, max)``.
This module computes the same second derivatives (numpy, float64) and evaluates the same formula in torch
(TorchScript-able, any float dtype), so a model built on these tables and its native OpenMM export agree to
round-off. Units are those of the caller (nm or rad for ``t``, kJ/mol for values).
"""
from typing import List

import numpy as np
import torch
from torch import Tensor

from ..errors import EnpcgError


def natural_spline_second_derivatives(values, spacing: float) -> np.ndarray:
    """Second derivatives (n,) of the natural cubic spline through ``values`` (n,) on a uniform grid.

    spacing : grid step h (unit of x). Returns y'' in units of values / x^2; y''[0] = y''[-1] = 0.
    """
    y = np.asarray(values, dtype=np.float64)
    n = len(y)
    if n < 2:
        raise EnpcgError(f"a spline table needs at least 2 values; it has {n}")
    d2 = np.zeros(n)
    if n == 2:
        return d2
    from scipy.linalg import solve_banded

    h = float(spacing)
    m = n - 2  # interior unknowns; the natural ends are fixed at zero
    ab = np.zeros((3, m))
    ab[0, 1:] = h
    ab[1, :] = 4.0 * h
    ab[2, :-1] = h
    rhs = 6.0 * (y[2:] - 2.0 * y[1:-1] + y[:-2]) / h
    d2[1:-1] = solve_banded((1, 1), ab, rhs)
    return d2


def periodic_spline_second_derivatives(values, spacing: float) -> np.ndarray:
    """Second derivatives (n,) of the periodic cubic spline through ``values`` (n,), ``values[0] == values[-1]``.

    spacing : grid step h. The period is (n - 1) h; y''[-1] equals y''[0].
    """
    y = np.asarray(values, dtype=np.float64)
    n = len(y)
    if n < 4:
        raise EnpcgError(f"a periodic spline table needs at least 4 values; it has {n}")
    if y[0] != y[-1]:
        raise EnpcgError(f"a periodic spline table must end with its first value; got {y[0]!r} and {y[-1]!r}")
    h = float(spacing)
    m = n - 1  # distinct points on the circle
    yc = y[:-1]
    mat = np.zeros((m, m))
    idx = np.arange(m)
    mat[idx, idx] = 4.0 * h
    mat[idx, (idx + 1) % m] += h
    mat[idx, (idx - 1) % m] += h
    rhs = 6.0 * (np.roll(yc, -1) - 2.0 * yc + np.roll(yc, 1)) / h
    d2 = np.linalg.solve(mat, rhs)
    return np.append(d2, d2[0])


def spline_second_derivatives(values, spacing: float, periodic: bool) -> np.ndarray:
    """Natural or periodic spline second derivatives, as OpenMM's ``SplineFitter::createSpline``."""
    if periodic:
        return periodic_spline_second_derivatives(values, spacing)
    return natural_spline_second_derivatives(values, spacing)


class TableSet:
    """Several tables of one term family packed into padded arrays (numpy, float64).

    tables : list of dicts ``{"min": float, "max": float, "values": list}``; each table may have its own
    range and number of points. ``values`` (T, n_max) and ``d2`` (T, n_max) are zero-padded; ``xmin`` (T,),
    ``spacing`` (T,) and ``n_points`` (T,) describe each grid.
    """

    def __init__(self, tables: List[dict], periodic: bool, family: str):
        n_max = max([len(t["values"]) for t in tables], default=2)
        count = max(len(tables), 1)
        self.values = np.zeros((count, n_max))
        self.d2 = np.zeros((count, n_max))
        self.xmin = np.zeros(count)
        self.spacing = np.ones(count)
        self.n_points = np.full(count, 2, dtype=np.int64)
        for i, t in enumerate(tables):
            y = np.asarray(t["values"], dtype=np.float64)
            lo, hi = float(t["min"]), float(t["max"])
            if y.ndim != 1 or len(y) < (4 if periodic else 2) or not hi > lo or not np.all(np.isfinite(y)):
                raise EnpcgError(
                    f"spline table {family}[{i}]: needs finite values (at least {4 if periodic else 2}) and "
                    f"max > min; got {len(y)} values on [{lo}, {hi}]")
            h = (hi - lo) / (len(y) - 1)
            self.values[i, :len(y)] = y
            self.d2[i, :len(y)] = spline_second_derivatives(y, h, periodic)
            self.xmin[i] = lo
            self.spacing[i] = h
            self.n_points[i] = len(y)


def evaluate_tables(x: Tensor, table: Tensor, values: Tensor, d2: Tensor, xmin: Tensor, spacing: Tensor,
                    n_points: Tensor, periodic: bool) -> Tensor:
    """Evaluate tabulated splines at ``x`` as OpenMM's Continuous1DFunction does (differentiable in x).

    x : (B, P) arguments; table : (P,) int64 index of the table used by each column; values, d2 : (T, n_max);
    xmin, spacing : (T,); n_points : (T,) int64. Returns (B, P) values; zero outside a non-periodic table's
    range, wrapped into [min, max) for a periodic one.
    """
    x0 = xmin[table].unsqueeze(0)
    h = spacing[table].unsqueeze(0)
    last = (n_points[table] - 1).unsqueeze(0).to(x.dtype)
    s = (x - x0) / h
    if periodic:
        s = s - last * torch.floor(s / last)
    # nan_to_num: a NaN argument (e.g. a pair list poisoned on overflow) must give a NaN value, not an
    # out-of-range index (an index error on the CPU, a device-side assert that kills a CUDA context).
    lower = torch.minimum(torch.clamp(torch.floor(torch.nan_to_num(s.detach(), nan=0.0)), min=0.0), last - 1.0)
    a = lower + 1.0 - s
    b = 1.0 - a
    n_max = values.shape[1]
    flat = (table.unsqueeze(0) * n_max + lower.to(torch.int64)).reshape(-1)
    v = values.reshape(-1)
    c = d2.reshape(-1)
    y0 = v[flat].reshape(s.shape)
    y1 = v[flat + 1].reshape(s.shape)
    c0 = c[flat].reshape(s.shape)
    c1 = c[flat + 1].reshape(s.shape)
    f = a * y0 + b * y1 + ((a * a * a - a) * c0 + (b * b * b - b) * c1) * (h * h / 6.0)
    if periodic:
        return f
    inside = (s >= 0.0) & (s <= last)
    return torch.where(inside, f, torch.zeros_like(f))


def continuous_function(values, xmin: float, xmax: float, periodic: bool = False):
    """An ``openmm.Continuous1DFunction`` of a table (values in kJ/mol on [xmin, xmax])."""
    import openmm

    return openmm.Continuous1DFunction([float(v) for v in values], float(xmin), float(xmax), bool(periodic))
