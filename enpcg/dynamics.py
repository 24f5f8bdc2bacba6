"""Time correlation functions of particle trajectories: MSD, diffusion, F_s(q, t), alpha_2 and rotations.

Plain functions over :class:`mdtraj.Trajectory` objects (or arrays), arrays in and arrays out, like
:func:`mdtraj.compute_rdf`. They are meant for comparing the dynamics of a coarse-grained model with the
mapped atomistic reference, in particular near the glass transition.

Conventions and units
---------------------
* Positions and displacements in nm, times in ps (mdtraj's ``traj.xyz`` and ``traj.time``), wavenumbers q in
  1/nm, diffusion coefficients in nm^2/ps, rotational diffusion coefficients in 1/ps, masses in amu.
* Reduced Lennard-Jones systems map onto OpenMM units exactly with sigma = 1 nm, epsilon = 1 kJ/mol and
  m = 1 amu: the LJ time tau = sigma sqrt(m / epsilon) is then exactly 1 ps, so times in ps *are* times in
  tau, D in nm^2/ps is D* and q in 1/nm is q* sigma; temperature T[K] = T* epsilon / R with
  R = ``openmm.unit.MOLAR_GAS_CONSTANT_R`` = 0.0083144626 kJ/mol/K, pressure 1 kJ/mol/nm^3 = 16.6054 bar.
* Frames must be equally spaced in time (the usual fixed reporter interval); every function averages over all
  time origins at a fixed frame lag. A lag is an integer number of frames; :func:`lag_indices` gives
  quasi-logarithmically spaced lags, and the ``lag_times`` returned are ``lag * dt`` in ps.
* Positions are unwrapped with :func:`unwrap` (continuous across periodic boundaries), which requires frames
  saved often enough that no particle moves more than half a box length between two frames.
* ``remove_drift=True`` subtracts the displacement of the centre of mass of all particles in the trajectory
  before any average. Long runs accumulate a centre-of-mass drift (thermostats such as Langevin or Andersen
  do not conserve total momentum, and a barostat rescales positions), and that collective motion would
  otherwise be counted as self diffusion. The price is a known 1/N finite-size effect: for N independent
  equal-mass particles the MSD relative to the centre of mass is (1 - 1/N) of the MSD in the lab frame.
* Self correlation functions follow Kob & Andersen, Phys. Rev. E 51, 4626 (1995) (arXiv:cond-mat/9501102):
  F_s(q, t) = < sin(q r) / (q r) > (the isotropic average of exp(i q . dr)), and the non-Gaussian parameter
  alpha_2(t) = 3 <r^4> / (5 <r^2>^2) - 1, which is 0 for Gaussian displacements.

Typical use::

    res = {name: dynamics_summary(md.load(f"{name}.dcd", top="cg.pdb"), q=7.2) for name in ("mapped", "cg")}
    plot_dynamics(list(res.values()), "out/dynamics.png", labels=list(res))
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import EnpcgError
from .fileio import atomic_path

# A step longer than this fraction of the box edge is too close to the minimum-image ambiguity (1/2) to be
# trusted: the particle may as well have jumped the other way.
MAX_STEP_FRACTION = 0.45
# Local log-log slope bounds of the MSD taken as "diffusive" by diffusion_coefficient.
DIFFUSIVE_SLOPE_LOW = 0.9
DIFFUSIVE_SLOPE_HIGH = 1.1
# relaxation_time(method="integral") integrates up to where the curve first drops below this level.
INTEGRAL_CUTOFF = 0.05
# Displacement blocks (origins x particles x 3) are processed in chunks of at most this many numbers to keep
# memory bounded for long trajectories.
_CHUNK_ELEMENTS = 6_000_000


# --------------------------------------------------------------------------------------- helpers
def _progress(iterable, progress, desc, total=None):
    """Wrap in a tqdm bar; progress=True shows it on a terminal only (tqdm's disable=None)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=None if progress else True, leave=False)


def _frame_interval(time, name="traj.time"):
    """Frame interval in ps of equally spaced frames; EnpcgError when the spacing is not uniform."""
    time = np.asarray(time, dtype=np.float64)
    if time.ndim != 1 or len(time) < 2:
        raise EnpcgError(f"{name}: time correlation functions need at least 2 frames; you supplied "
                         f"{np.shape(time)[0] if time.ndim else 0}. Fix: analyse a trajectory with several frames")
    steps = np.diff(time)
    dt = (time[-1] - time[0]) / (len(time) - 1)
    # mdtraj stores times as float32 in some formats: allow their rounding on top of a 1% spacing jitter.
    tol = 0.01 * abs(dt) + 4 * np.finfo(np.float32).eps * np.max(np.abs(time))
    if not dt > 0 or np.max(np.abs(steps - dt)) > tol:
        raise EnpcgError(f"{name}: frames must be equally spaced and increasing in time; you supplied steps "
                         f"from {steps.min():.6g} to {steps.max():.6g} ps. Fix: analyse one continuous run saved "
                         "at a fixed interval (do not concatenate runs with different intervals or restarts "
                         "that reset the clock), or set traj.time = dt * np.arange(traj.n_frames)")
    return float(dt)


def lag_indices(n_frames, n_lags=60):
    """Quasi-logarithmically spaced, unique integer frame lags from 0 to n_frames - 1.

    Parameters
    ----------
    n_frames : int, number of frames (>= 2)
    n_lags : int, number of log-spaced candidates (>= 2); duplicates after rounding are dropped, so fewer
        lags may come back for short trajectories

    Returns
    -------
    np.ndarray of int, increasing, always starting 0, 1 and ending at n_frames - 1 (in frames)
    """
    n_frames = int(n_frames)
    n_lags = int(n_lags)
    if n_frames < 2:
        raise EnpcgError(f"n_frames must be >= 2 to form a time lag; you supplied {n_frames}. "
                         "Fix: analyse a trajectory with several frames")
    if n_lags < 2:
        raise EnpcgError(f"n_lags must be >= 2; you supplied {n_lags}. Fix: use e.g. the default 60")
    log_lags = np.round(np.logspace(0.0, math.log10(n_frames - 1), n_lags - 1)).astype(np.int64)
    return np.unique(np.concatenate([[0, 1], log_lags, [n_frames - 1]]))


def _check_lags(lags, n_frames):
    if lags is None:
        return lag_indices(n_frames)
    lags = np.asarray(lags)
    if lags.ndim != 1 or len(lags) == 0 or not np.issubdtype(lags.dtype, np.integer):
        raise EnpcgError(f"lags must be a non-empty 1-D array of integer frame lags; you supplied shape "
                         f"{lags.shape}, dtype {lags.dtype}. Fix: use lag_indices(n_frames) or np.arange(...)")
    if lags.min() < 0 or lags.max() >= n_frames:
        raise EnpcgError(f"lags must lie in [0, n_frames - 1] = [0, {n_frames - 1}] frames; you supplied "
                         f"{lags.min()}..{lags.max()}. Fix: drop the lags longer than the trajectory")
    return np.unique(lags.astype(np.int64))


def _check_indices(atom_indices, n_atoms, name="atom_indices"):
    if atom_indices is None:
        return np.arange(n_atoms)
    idx = np.asarray(atom_indices)
    if idx.ndim != 1 or len(idx) == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise EnpcgError(f"{name} must be a non-empty 1-D array of integer particle indices; you supplied "
                         f"shape {idx.shape}, dtype {idx.dtype}. Fix: e.g. traj.topology.select('name A')")
    if idx.min() < 0 or idx.max() >= n_atoms:
        raise EnpcgError(f"{name} must lie in [0, {n_atoms - 1}] (the trajectory has {n_atoms} particles); "
                         f"you supplied {idx.min()}..{idx.max()}")
    return idx


_UNWRAP_TRICLINIC_FIX = ("write the trajectory without wrapping (e.g. DCDReporter(..., enforcePeriodicBox=False)) "
                         "and remove the unit cell (traj.unitcell_vectors = None) so no unwrapping is needed")


def _orthorhombic_lengths(traj, what="unwrap", fix=_UNWRAP_TRICLINIC_FIX):
    """(F, 3) box edge lengths in nm, or None without a box; EnpcgError for triclinic boxes naming ``what``
    (the function that needs the orthorhombic box) and ``fix``."""
    if traj.unitcell_vectors is None:
        return None
    box = np.asarray(traj.unitcell_vectors, dtype=np.float64)
    diag = np.diagonal(box, axis1=1, axis2=2)
    off = box - diag[:, :, None] * np.eye(3)
    if np.max(np.abs(off)) > 1e-5 * np.max(np.abs(diag)):
        raise EnpcgError(f"traj.unitcell_vectors: {what} supports orthorhombic boxes only; this trajectory has a "
                         f"triclinic box (largest off-diagonal {np.max(np.abs(off)):.4g} nm). Fix: {fix}")
    if np.any(diag <= 0):
        raise EnpcgError(f"traj.unitcell_vectors: box edge lengths must be positive; you supplied a minimum of "
                         f"{diag.min():.4g} nm. Fix: load the trajectory with its real box")
    return diag


def unwrap(traj):
    """Positions made continuous across periodic boundaries.

    Each frame adds the minimum-image displacement from the previous frame, using the box of the new frame
    (the scheme of von Buelow, Bullerjahn & Hummer, J. Chem. Phys. 153, 021101 (2020), arXiv:2003.09205,
    which stays correct at constant pressure). This requires frames saved often enough that no particle
    moves more than half a box edge between consecutive frames; a step longer than 0.45 box edges is
    treated as ambiguous and raises an EnpcgError. Without a unit cell the positions are returned as they are.

    Parameters
    ----------
    traj : mdtraj.Trajectory, orthorhombic box (or none)

    Returns
    -------
    np.ndarray, shape=(n_frames, n_atoms, 3), float64, nm; frame 0 equals traj.xyz[0]
    """
    x = np.asarray(traj.xyz, dtype=np.float64)
    lengths = _orthorhombic_lengths(traj)
    if lengths is None or traj.n_frames < 2:
        return x.copy()
    step = np.diff(x, axis=0)
    box = lengths[1:, None, :]
    step -= box * np.round(step / box)
    frac = np.abs(step) / box
    if frac.size and frac.max() > MAX_STEP_FRACTION:
        f, i, k = np.unravel_index(np.argmax(frac), frac.shape)
        raise EnpcgError(
            f"traj: particle {i} moves {abs(step[f, i, k]):.4g} nm along {'xyz'[k]} between frames {f} and "
            f"{f + 1}, more than {MAX_STEP_FRACTION} of the box edge ({box[f, 0, k]:.4g} nm), so its periodic "
            "image is ambiguous. Fix: save frames more often (smaller reporter interval), or write unwrapped "
            "positions (DCDReporter(..., enforcePeriodicBox=False)) and drop the unit cell before analysis")
    out = np.empty_like(x)
    out[0] = x[0]
    np.cumsum(step, axis=0, out=out[1:])
    out[1:] += x[0]
    return out


def _masses(traj, masses):
    if masses is not None:
        m = np.asarray(masses, dtype=np.float64)
        if m.shape != (traj.n_atoms,) or not np.all(np.isfinite(m)) or np.any(m <= 0):
            raise EnpcgError(f"masses must be {traj.n_atoms} positive numbers in amu (one per particle of the "
                             f"trajectory); you supplied shape {m.shape}. Fix: pass a mass for every particle")
        return m
    try:
        m = np.array([a.element.mass for a in traj.topology.atoms], dtype=np.float64)
    except AttributeError:  # an atom without element
        return np.ones(traj.n_atoms)
    # CG topologies may carry placeholder elements with zero mass: fall back to equal weights.
    if len(m) != traj.n_atoms or not np.all(np.isfinite(m)) or np.any(m <= 0):
        return np.ones(traj.n_atoms)
    return m


def _prepared_positions(traj, atom_indices, remove_drift, masses):
    """Unwrapped positions (nm) of the selected particles, relative to the centre of mass when asked."""
    idx = _check_indices(atom_indices, traj.n_atoms)
    x = unwrap(traj)
    if remove_drift:
        m = _masses(traj, masses)
        com = np.einsum("fni,n->fi", x, m / m.sum())
        return x[:, idx] - com[:, None, :]
    return x[:, idx]


def _self_moments(x, lags, q=None, need_r4=False, progress=True, desc="displacements"):
    """Origin-averaged <r^2>, <r^4> (optional) and <sin(qr)/(qr)> (optional) at each frame lag.

    x : (F, n, 3) float64 positions in nm; lags : int frame lags
    Returns dict of arrays of shape (n_lags,) with keys r2, r4, fs as requested.
    """
    n_frames, n = x.shape[:2]
    r2 = np.zeros(len(lags))
    r4 = np.zeros(len(lags)) if need_r4 else None
    fs = np.zeros(len(lags)) if q is not None else None
    rows = max(1, _CHUNK_ELEMENTS // max(3 * n, 1))
    for k, lag in enumerate(_progress(lags, progress, desc)):
        if lag == 0:
            if fs is not None:
                fs[k] = 1.0
            continue
        n_orig = n_frames - lag
        s2 = s4 = sf = 0.0
        for s in range(0, n_orig, rows):
            e = min(s + rows, n_orig)
            d = x[s + lag:e + lag] - x[s:e]
            rr = np.einsum("fni,fni->fn", d, d)
            s2 += rr.sum()
            if need_r4:
                s4 += np.sum(rr * rr)
            if fs is not None:
                # np.sinc(y) = sin(pi y)/(pi y), finite at y = 0
                sf += np.sinc(q * np.sqrt(rr) / np.pi).sum()
        count = n_orig * n
        r2[k] = s2 / count
        if need_r4:
            r4[k] = s4 / count
        if fs is not None:
            fs[k] = sf / count
    return {"r2": r2, "r4": r4, "fs": fs}


def _check_q(q):
    try:
        qv = float(q)
    except (TypeError, ValueError):
        raise EnpcgError(f"q must be one positive wavenumber in 1/nm; you supplied {q!r}. Fix: pass e.g. the "
                         "first peak of S(q) from enpcg.pair_structure.first_peak") from None
    if not (np.isfinite(qv) and qv > 0):
        raise EnpcgError(f"q must be a positive wavenumber in 1/nm; you supplied {q!r}. Fix: pass e.g. the "
                         "first peak of S(q) from enpcg.pair_structure.first_peak")
    return qv


# --------------------------------------------------------------------------------------- translations
def mean_squared_displacement(traj, atom_indices=None, *, lags=None, remove_drift=True, masses=None,
                              progress=True):
    """Mean squared displacement averaged over particles and all time origins.

    Parameters
    ----------
    traj : mdtraj.Trajectory, equally spaced frames, orthorhombic box or none
    atom_indices : array of int, optional, particles to average over (default all)
    lags : array of int, optional, frame lags (default :func:`lag_indices`)
    remove_drift : bool, subtract the centre-of-mass displacement of all particles of the trajectory first
        (see the module docstring: thermostat/barostat drift; costs a factor 1 - 1/N for N free particles)
    masses : array, shape=(n_atoms,), amu, optional, weights of the centre of mass (default: element masses,
        or equal weights when the topology has no usable masses)
    progress : bool, tqdm bar on a terminal

    Returns
    -------
    lag_times : np.ndarray, shape=(n_lags,), ps
    msd : np.ndarray, shape=(n_lags,), nm^2
    """
    dt = _frame_interval(traj.time)
    lags = _check_lags(lags, traj.n_frames)
    x = _prepared_positions(traj, atom_indices, remove_drift, masses)
    mom = _self_moments(x, lags, progress=progress, desc="MSD")
    return lags * dt, mom["r2"]


def _log_slope(t, y, half_width=0.1):
    """Local slope d ln y / d ln t: least-squares line over the points within +-half_width decades of each t.

    t must be increasing and positive; windows holding a single point widen to the neighbours.
    """
    lt, ly = np.log10(t), np.log10(y)
    n = len(lt)
    lo = np.searchsorted(lt, lt - half_width - 1e-12, side="left")
    hi = np.searchsorted(lt, lt + half_width + 1e-12, side="right")
    lonely = hi - lo < 2
    lo[lonely] = np.maximum(np.arange(n)[lonely] - 1, 0)
    hi[lonely] = np.minimum(np.arange(n)[lonely] + 2, n)
    # window sums from cumulative sums; centring on each point's own log t keeps them well conditioned
    cx = np.concatenate([[0.0], np.cumsum(lt)])
    cy = np.concatenate([[0.0], np.cumsum(ly)])
    cxx = np.concatenate([[0.0], np.cumsum(lt * lt)])
    cxy = np.concatenate([[0.0], np.cumsum(lt * ly)])
    m = hi - lo
    sx, sy = cx[hi] - cx[lo], cy[hi] - cy[lo]
    sxx, sxy = cxx[hi] - cxx[lo], cxy[hi] - cxy[lo]
    den = sxx - sx * sx / m
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = (sxy - sx * sy / m) / den
    slope[~(den > 1e-12)] = np.nan
    return slope


def diffusion_coefficient(lag_times, msd, *, t_min=None, t_max=None, dim=3):
    """Self-diffusion coefficient from a least-squares line msd = 2 dim D t + c (Einstein relation).

    Default window: the local slope s(t) = d ln msd / d ln t (least squares over +-0.1 decade) is 2 in the
    ballistic regime, drops below 0.9 on a cage plateau, and is 1 when diffusive. The diffusive regime starts
    at the first lag after the last point with s > 1.1 (ballistic) or s < 0.9 (sub-diffusive), i.e. where s
    has risen through 0.9 for good; those points are searched only among lags up to half the longest one,
    because the few origins at the longest lags make s noisy there. The fit then uses the last two thirds of
    the lags from that start on (dropping the crossover), up to half the longest lag: beyond it fewer than
    half the time origins remain and the MSD of one run wanders (measured on a 40 ps LJ liquid run: D from
    windows ending at the longest lag scattered by 20-40 % between seeds, about 5 % when they end at half of
    it). ``t_min``/``t_max`` override
    either end.

    Parameters
    ----------
    lag_times : np.ndarray, shape=(n_lags,), ps, increasing
    msd : np.ndarray, shape=(n_lags,), nm^2
    t_min, t_max : float, ps, optional fit window
    dim : int, number of dimensions the MSD sums over (3 for |dr|^2)

    Returns
    -------
    dict with D (nm^2/ps), stderr (nm^2/ps: the least-squares standard error of the slope / (2 dim); MSD points
    are correlated, so read it as a lower bound), t_min, t_max (ps, the window used), intercept (nm^2),
    n_points
    """
    t = np.asarray(lag_times, dtype=np.float64)
    y = np.asarray(msd, dtype=np.float64)
    if t.ndim != 1 or t.shape != y.shape or len(t) < 3:
        raise EnpcgError(f"lag_times and msd must be 1-D arrays of the same length >= 3; you supplied shapes "
                         f"{t.shape} and {y.shape}. Fix: pass the two arrays from mean_squared_displacement")
    if int(dim) not in (1, 2, 3):
        raise EnpcgError(f"dim must be 1, 2 or 3; you supplied {dim!r}")
    dim = int(dim)
    pos = (t > 0) & (y > 0)
    tp, yp = t[pos], y[pos]
    if t_min is None:
        if len(tp) < 3:
            raise EnpcgError("msd: fewer than 3 lags with t > 0 and msd > 0; the run is too short to reach the "
                             "diffusive regime. Fix: run longer / save more frames")
        s = _log_slope(tp, yp)
        searchable = tp <= 0.5 * tp[-1]
        # Ballistic until the slope first drops to DIFFUSIVE_SLOPE_HIGH; after that only a sub-diffusive slope
        # (a cage plateau) delays the start: a later excursion above 1.1 is noise of the few long-lag origins
        # (seen at 1.2-1.3 in 40 ps LJ runs), not a regime. A nan slope (degenerate window) counts as bad.
        below = np.flatnonzero(s <= DIFFUSIVE_SLOPE_HIGH)
        ballistic_end = below[0] if len(below) else len(tp)
        low = ~(s >= DIFFUSIVE_SLOPE_LOW)
        bad = np.flatnonzero(searchable & low & (np.arange(len(tp)) >= ballistic_end))
        start = bad[-1] + 1 if len(bad) else ballistic_end
        if start >= len(tp) or not np.any(searchable[start:]):
            last = f"{s[searchable][-1]:.3g}" if searchable.any() else "undefined"
            raise EnpcgError(
                "msd: the run is too short to reach the diffusive regime (the local slope d ln msd / d ln t "
                f"is outside [{DIFFUSIVE_SLOPE_LOW}, {DIFFUSIVE_SLOPE_HIGH}] up to half the longest lag, "
                f"{0.5 * tp[-1]:.4g} ps; its last value there is {last}). Fix: run longer / save more frames, "
                "or pass t_min and t_max explicitly")
        end = len(tp) if t_max is None else int(np.searchsorted(tp, float(t_max), side="right"))
        if t_max is None:
            end = int(np.searchsorted(tp, 0.5 * tp[-1], side="right"))
        after = np.arange(start, max(end, start + 1))
        first = after[len(after) // 3] if len(after) >= 3 else after[0]
        t_lo = tp[first]
    else:
        t_lo = float(t_min)
    t_hi = float(t_max) if t_max is not None else 0.5 * float(t[-1])
    if t_min is None and t_hi <= t_lo:
        raise EnpcgError(f"msd: the diffusive regime starts at {t_lo:.4g} ps, beyond half the longest lag "
                         f"({t_hi:.4g} ps), where too few time origins remain. Fix: run longer / save more "
                         "frames, or pass t_min and t_max explicitly")
    sel = (t >= t_lo - 1e-12 * abs(t_lo)) & (t <= t_hi + 1e-12 * abs(t_hi)) & np.isfinite(y)
    if sel.sum() < 3:
        raise EnpcgError(f"diffusion fit window [{t_lo:.4g}, {t_hi:.4g}] ps holds {int(sel.sum())} lags, fewer "
                         "than 3; the run is too short to reach the diffusive regime. Fix: run longer / save "
                         "more frames, or widen t_min/t_max")
    ts, ys = t[sel], y[sel]
    tc = ts - ts.mean()
    sxx = np.sum(tc * tc)
    slope = np.sum(tc * (ys - ys.mean())) / sxx
    intercept = ys.mean() - slope * ts.mean()
    resid = ys - (slope * ts + intercept)
    n = len(ts)
    se = math.sqrt(np.sum(resid ** 2) / (n - 2) / sxx) if n > 2 else math.nan
    return {"D": float(slope / (2 * dim)), "stderr": float(se / (2 * dim)), "t_min": float(ts[0]),
            "t_max": float(ts[-1]), "intercept": float(intercept), "n_points": int(n)}


def diffusion_coefficient_or_bound(lag_times, msd, *, label="msd", dim=3):
    """:func:`diffusion_coefficient` with its automatic window, or, when the run is too short for it, a fit
    over a quarter to half the longest lag with a warning (in a sub-diffusive regime that D is a lower bound of
    the long-time D). Same units and dict; ``"fallback"`` says which window was used."""
    import warnings

    try:
        fit = diffusion_coefficient(lag_times, msd, dim=dim)
        fit["fallback"] = False
    except EnpcgError as e:
        t_end = float(np.asarray(lag_times)[-1])
        warnings.warn(f"{label}: {e}; fitting lags from {t_end / 4:.3g} to {t_end / 2:.3g} ps instead, a lower bound "
                      "of the long-time D in a sub-diffusive regime", stacklevel=2)
        fit = diffusion_coefficient(lag_times, msd, t_min=t_end / 4, t_max=t_end / 2, dim=dim)
        fit["fallback"] = True
    return fit


def self_intermediate_scattering(traj, q, atom_indices=None, *, lags=None, remove_drift=True, masses=None,
                                 progress=True):
    """Isotropic self-intermediate scattering function F_s(q, t) = < sin(q r(t)) / (q r(t)) >.

    r(t) is each particle's displacement over a lag t; the average runs over particles and time origins.
    For Gaussian displacements F_s = exp(-q^2 <r^2> / 6).

    Parameters
    ----------
    traj : mdtraj.Trajectory, equally spaced frames
    q : float, wavenumber, 1/nm (usually the first peak of S(q), :func:`enpcg.pair_structure.first_peak`)
    atom_indices, lags, remove_drift, masses, progress : as in :func:`mean_squared_displacement`

    Returns
    -------
    lag_times : np.ndarray, shape=(n_lags,), ps
    fs : np.ndarray, shape=(n_lags,), dimensionless (1 at lag 0)
    """
    q = _check_q(q)
    dt = _frame_interval(traj.time)
    lags = _check_lags(lags, traj.n_frames)
    x = _prepared_positions(traj, atom_indices, remove_drift, masses)
    mom = _self_moments(x, lags, q=q, progress=progress, desc="F_s(q,t)")
    return lags * dt, mom["fs"]


def non_gaussian_parameter(traj, atom_indices=None, *, lags=None, remove_drift=True, masses=None,
                           progress=True):
    """Non-Gaussian parameter alpha_2(t) = 3 <r^4> / (5 <r^2>^2) - 1 of the displacements over a lag t.

    0 for Gaussian displacements, -0.4 for displacements of fixed length, positive for dynamic heterogeneity
    (a mix of caged and mobile particles). Defined as 0 at lag 0.

    Parameters
    ----------
    traj, atom_indices, lags, remove_drift, masses, progress : as in :func:`mean_squared_displacement`

    Returns
    -------
    lag_times : np.ndarray, shape=(n_lags,), ps
    alpha2 : np.ndarray, shape=(n_lags,), dimensionless
    """
    dt = _frame_interval(traj.time)
    lags = _check_lags(lags, traj.n_frames)
    x = _prepared_positions(traj, atom_indices, remove_drift, masses)
    mom = _self_moments(x, lags, need_r4=True, progress=progress, desc="alpha_2")
    return lags * dt, _alpha2(mom["r2"], mom["r4"])


def _alpha2(r2, r4):
    out = np.zeros_like(r2)
    ok = r2 > 0
    out[ok] = 3.0 * r4[ok] / (5.0 * r2[ok] ** 2) - 1.0
    return out


# --------------------------------------------------------------------------------------- rotations
def rotational_correlation(vectors, times, l=2, *, lags=None, progress=True):
    """Orientational correlation C_l(t) = < P_l(u(0) . u(t)) > of unit vectors (Legendre polynomial P_l).

    For free rotational diffusion with coefficient D_r, C_l(t) = exp(-l (l + 1) D_r t) (Debye).

    Parameters
    ----------
    vectors : np.ndarray, shape=(n_frames, n, 3), any length units (normalised here), e.g. body axes of
        oriented beads or bond vectors
    times : np.ndarray, shape=(n_frames,), ps, equally spaced
    l : int, Legendre order, 1 .. 6
    lags, progress : as in :func:`mean_squared_displacement`

    Returns
    -------
    lag_times : np.ndarray, shape=(n_lags,), ps
    c : np.ndarray, shape=(n_lags,), dimensionless (1 at lag 0)
    """
    from numpy.polynomial import legendre

    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 3 or v.shape[2] != 3:
        raise EnpcgError(f"vectors must have shape (n_frames, n, 3); you supplied {v.shape}. Fix: stack one "
                         "(n, 3) array of axes per frame")
    if int(l) != l or not 1 <= int(l) <= 6:
        raise EnpcgError(f"l must be an integer Legendre order in 1..6; you supplied {l!r}")
    l = int(l)
    times = np.asarray(times, dtype=np.float64)
    if times.shape != (v.shape[0],):
        raise EnpcgError(f"times must have shape (n_frames,) = ({v.shape[0]},) in ps; you supplied "
                         f"{times.shape}. Fix: pass traj.time of the frames the vectors come from")
    dt = _frame_interval(times, name="times")
    norm = np.linalg.norm(v, axis=2, keepdims=True)
    if np.any(norm <= 0) or not np.all(np.isfinite(norm)):
        raise EnpcgError("vectors: some vectors have zero or non-finite length and cannot be normalised. "
                         "Fix: drop those particles or frames")
    u = v / norm
    lags = _check_lags(lags, v.shape[0])
    coef = np.zeros(l + 1)
    coef[l] = 1.0
    n_frames, n = u.shape[:2]
    rows = max(1, _CHUNK_ELEMENTS // max(3 * n, 1))
    c = np.zeros(len(lags))
    for k, lag in enumerate(_progress(lags, progress, f"C_{l}(t)")):
        n_orig = n_frames - lag
        total = 0.0
        for s in range(0, n_orig, rows):
            e = min(s + rows, n_orig)
            cos = np.clip(np.einsum("fni,fni->fn", u[s:e], u[s + lag:e + lag]), -1.0, 1.0)
            if l == 1:
                total += cos.sum()
            elif l == 2:
                total += 1.5 * np.sum(cos * cos) - 0.5 * cos.size
            else:
                total += legendre.legval(cos, coef).sum()
        c[k] = total / (n_orig * n)
    return lags * dt, c


# --------------------------------------------------------------------------------------- relaxation times
def _check_curve(lag_times, c, name):
    t = np.asarray(lag_times, dtype=np.float64)
    y = np.asarray(c, dtype=np.float64)
    if t.ndim != 1 or t.shape != y.shape or len(t) < 2:
        raise EnpcgError(f"lag_times and {name} must be 1-D arrays of the same length >= 2; you supplied shapes "
                         f"{t.shape} and {y.shape}")
    if np.any(np.diff(t) <= 0) or t[0] < 0:
        raise EnpcgError(f"lag_times must be non-negative and increasing (ps); you supplied {t[:5]}...")
    return t, y


def alpha_relaxation_time(lag_times, fs, level=1.0 / math.e):
    """Time at which a decaying correlation function first falls below ``level``.

    Interpolated linearly in ln t between the two lags around the crossing (linearly in t when the earlier
    lag is t = 0).

    Parameters
    ----------
    lag_times : np.ndarray, shape=(n_lags,), ps, increasing
    fs : np.ndarray, shape=(n_lags,), e.g. F_s(q, t) or C_l(t)
    level : float, crossing level (default 1/e)

    Returns
    -------
    float, ps
    """
    t, y = _check_curve(lag_times, fs, "fs")
    below = np.flatnonzero(y < level)
    if len(below) == 0:
        raise EnpcgError(f"fs never falls below level {level:.4g} (its minimum is {np.nanmin(y):.4g} at "
                         f"{t[np.nanargmin(y)]:.4g} ps): the run is shorter than the relaxation time. Fix: run "
                         "longer, use a larger q (faster decay) or a higher level")
    i = int(below[0])
    if i == 0:
        return float(t[0])
    t0, t1, y0, y1 = t[i - 1], t[i], y[i - 1], y[i]
    f = (y0 - level) / (y0 - y1)
    if t0 > 0:
        return float(math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0))))
    return float(t0 + f * (t1 - t0))


def relaxation_time(lag_times, c, method="1/e"):
    """Relaxation time of a normalised decaying correlation function c(t) (c(0) = 1).

    method="1/e": the first crossing of 1/e (:func:`alpha_relaxation_time`).
    method="integral": the trapezoid integral of c(t) from t = 0 up to the (linearly interpolated) time where
    c first drops below 0.05, divided by 1 - 0.05 to close the tail as a single exponential (exact for
    c = exp(-t/tau); for a stretched exponential it slightly underestimates the full integral).

    Parameters
    ----------
    lag_times : np.ndarray, shape=(n_lags,), ps, increasing, starting at 0 for method="integral"
    c : np.ndarray, shape=(n_lags,), dimensionless
    method : "1/e" or "integral"

    Returns
    -------
    float, ps
    """
    if method == "1/e":
        return alpha_relaxation_time(lag_times, c)
    if method != "integral":
        raise EnpcgError(f"method must be '1/e' or 'integral'; you supplied {method!r}")
    t, y = _check_curve(lag_times, c, "c")
    if t[0] != 0:
        raise EnpcgError(f"lag_times must start at 0 for method='integral'; you supplied t[0] = {t[0]:.4g} ps. "
                         "Fix: include lag 0 (lag_indices always does)")
    below = np.flatnonzero(y < INTEGRAL_CUTOFF)
    if len(below) == 0:
        raise EnpcgError(f"c never drops below {INTEGRAL_CUTOFF} (its minimum is {np.nanmin(y):.4g}): the run is "
                         "shorter than the relaxation. Fix: run longer, or use method='1/e'")
    i = int(below[0])
    if i == 0:
        return 0.0
    f = (y[i - 1] - INTEGRAL_CUTOFF) / (y[i - 1] - y[i])
    t_cut = t[i - 1] + f * (t[i] - t[i - 1])
    tt = np.append(t[:i], t_cut)
    yy = np.append(y[:i], INTEGRAL_CUTOFF)
    integral = float(np.sum(0.5 * (yy[1:] + yy[:-1]) * np.diff(tt)))
    return integral / (1.0 - INTEGRAL_CUTOFF)


# --------------------------------------------------------------------------------------- summary and plot
def dynamics_summary(traj, q=None, atom_indices=None, vectors=None, *, lags=None, remove_drift=True,
                     masses=None, progress=True):
    """All the dynamics of one trajectory in one pass over the displacements.

    Parameters
    ----------
    traj : mdtraj.Trajectory, equally spaced frames, orthorhombic box or none
    q : float, 1/nm, wavenumber of F_s; default the first peak of S(q) of the selected particles
        (:func:`enpcg.pair_structure.structure_factor` up to q = 2 x 2 pi / d, d = (V/N)^(1/3) the mean
        spacing, over 50 frames, then ``first_peak``; needs an orthorhombic box)
    atom_indices : array of int, optional, particles to analyse
    vectors : np.ndarray, shape=(n_frames, n, 3), optional, body axes for C_2(t) (any length; normalised)
    lags, remove_drift, masses, progress : as in :func:`mean_squared_displacement`

    Returns
    -------
    dict with "msd": (t ps, nm^2), "fs": (t ps, F_s), "alpha2": (t ps, alpha_2), "c2": (t ps, C_2) only when
    vectors are given, "q" (1/nm), "D" (nm^2/ps or None), "D_fit" (the diffusion_coefficient dict or None),
    "tau_alpha" (ps or None: 1/e time of F_s), "tau_2" (ps or None: 1/e time of C_2), "alpha2_max" and
    "t_alpha2_max" (peak of alpha_2 and its time in ps). Quantities the run is too short to determine are
    None rather than an error.
    """
    dt = _frame_interval(traj.time)
    lags = _check_lags(lags, traj.n_frames)
    if q is None:
        from .pair_structure import first_peak, structure_factor

        if traj.unitcell_vectors is None:
            raise EnpcgError("q: no default without a periodic box (the default is the first peak of S(q), "
                             "which needs one). Fix: pass q in 1/nm, e.g. 2 pi / (nearest-neighbour distance)")
        # Only the main peak is needed: it lies near 2 pi / d (d = (V/N)^(1/3)), so q up to 2 x 2 pi / d and
        # 50 frames locate it at a quarter of structure_factor's default cost.
        volume = float(np.mean(traj.unitcell_volumes))
        q_max = 2.0 * 2 * np.pi / (volume / traj.n_atoms) ** (1.0 / 3.0)
        qs, s = structure_factor(traj, atom_indices, atom_indices, q_max=q_max, max_frames=50,
                                 progress=progress)
        q = first_peak(qs, s)
    q = _check_q(q)
    x = _prepared_positions(traj, atom_indices, remove_drift, masses)
    mom = _self_moments(x, lags, q=q, need_r4=True, progress=progress, desc="dynamics")
    t = lags * dt
    out = {"msd": (t, mom["r2"]), "fs": (t, mom["fs"]), "alpha2": (t, _alpha2(mom["r2"], mom["r4"])), "q": q}
    try:
        fit = diffusion_coefficient(t, mom["r2"])
    except EnpcgError:
        fit = None
    out["D_fit"] = fit
    out["D"] = None if fit is None else fit["D"]
    try:
        out["tau_alpha"] = alpha_relaxation_time(t, mom["fs"])
    except EnpcgError:
        out["tau_alpha"] = None
    a2 = out["alpha2"][1]
    k = int(np.argmax(a2))
    out["alpha2_max"], out["t_alpha2_max"] = float(a2[k]), float(t[k])
    out["tau_2"] = None
    if vectors is not None:
        tc, c2 = rotational_correlation(vectors, traj.time, 2, lags=lags, progress=progress)
        out["c2"] = (tc, c2)
        try:
            out["tau_2"] = alpha_relaxation_time(tc, c2)
        except EnpcgError:
            pass
    return out


def plot_dynamics(curves, path, labels):
    """Side-by-side panels comparing the dynamics of several trajectories, written atomically as PNG.

    Panels: MSD (nm^2) vs t (ps) log-log; F_s(q, t) vs log t; alpha_2(t) vs log t; C_2(t) vs log t when any
    result has "c2".

    Parameters
    ----------
    curves : dict or list of dict, :func:`dynamics_summary` results (e.g. mapped atomistic, CG)
    path : path of the PNG to write (folders are created)
    labels : str or list of str, one legend label per result

    Returns
    -------
    Path of the PNG
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(curves, dict):
        curves = [curves]
    labels = [labels] if isinstance(labels, str) else list(labels)
    if len(labels) != len(curves):
        raise EnpcgError(f"plot_dynamics: {len(curves)} results but {len(labels)} labels; give one label per "
                         "result")
    for i, c in enumerate(curves):
        missing = [k for k in ("msd", "fs", "alpha2") if k not in c]
        if missing:
            raise EnpcgError(f"plot_dynamics: curves[{i}] lacks {missing}; pass dynamics_summary results")
    panels = ["msd", "fs", "alpha2"] + (["c2"] if any("c2" in c for c in curves) else [])
    fig = Figure(figsize=(4.0 * len(panels), 3.4), layout="constrained")
    FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
    axes = [fig.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
    for c, label in zip(curves, labels):
        for ax, key in zip(axes, panels):
            if key not in c:
                continue
            t, y = (np.asarray(a) for a in c[key])
            ok = t > 0
            if key == "msd":
                ok &= y > 0
                lab = label if c.get("D") is None else f"{label} (D = {c['D']:.3g} nm$^2$/ps)"
                ax.loglog(t[ok], y[ok], label=lab)
            else:
                extra = {"fs": "tau_alpha", "c2": "tau_2"}.get(key)
                lab = label
                if extra and c.get(extra) is not None:
                    lab = f"{label} ($\\tau$ = {c[extra]:.3g} ps)"
                ax.semilogx(t[ok], y[ok], label=lab)
    q = curves[0].get("q")
    titles = {"msd": ("mean squared displacement", "MSD (nm$^2$)"),
              "fs": ("self-intermediate scattering" + (f", q = {q:.3g} nm$^{{-1}}$" if q else ""),
                     "$F_s(q, t)$"),
              "alpha2": ("non-Gaussian parameter", "$\\alpha_2(t)$"),
              "c2": ("orientational correlation", "$C_2(t)$")}
    for ax, key in zip(axes, panels):
        ax.set(title=titles[key][0], xlabel="t (ps)", ylabel=titles[key][1])
        if key in ("fs", "c2"):
            ax.axhline(1.0 / math.e, color="grey", linewidth=0.5)
        ax.legend(fontsize="small")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
