"""Inverse design: move particles so that a property of the configuration reaches a target value, without
moving or turning the configuration as a whole.

Units: positions nm, masses amu; a property is in its own unit [P] (kJ/mol for an energy, nm for a radius of
gyration, rad/ps for a frequency); gradients [P]/nm. Frequencies follow :mod:`enpcg.properties.normal_modes`
(1 kJ/mol/nm^2/amu = 1/ps^2, omega in rad/ps).

Rigid-body projection (the mass metric). Displacements dx are measured in mass-weighted coordinates
q = sqrt(m / m_mean) x, the metric of the kinetic energy. The rigid-body motions span, there, the analytic
basis of :func:`enpcg.properties.normal_modes.rigid_body_basis` (3 translations, and for an isolated
configuration 3 rotations about the centre of mass; 2 for a linear molecule). A step orthogonal to them in
this metric carries, read as velocities v = dx over unit time,

* zero linear momentum  sum_i m_i dx_i = 0          (the centre of mass does not move, exactly: it is linear),
* zero angular momentum sum_i m_i (x_i - X_com) x dx_i = 0 (to first order in dx: a finite step also turns
  the configuration by O(|dx|^2), the way any finite internal motion does).

:func:`remove_rigid_motion` projects a displacement so; :func:`projected_gradient` gives the steepest-ascent
direction of a property in the mass metric with the rigid motions removed,
d = m_mean M^-1/2 P M^-1/2 dP/dx (P: the orthogonal projector off the rigid basis). For equal masses d is the
Cartesian gradient with the rigid motions projected out; for a property invariant under translations and
rotations (an energy, a radius of gyration, a frequency) P removes only round-off, and dP/dx . d >= 0
always, so -d is a descent direction (the raw gradient step -dP/dx itself would move the centre of mass
when masses differ: sum_i m_i g_i != 0 although sum_i g_i = 0).

:func:`design` minimises (P(x) - target)^2 by projected gradient descent or a projected L-BFGS (two-loop
recursion in the mass-weighted coordinates, backtracking line search, every step projected at the current
positions and capped at ``max_step`` nm per particle), recording a history, until |P - target| <= tolerance.

Properties (torch functions of positions (n, 3) float64 tensors -> scalar tensor): :func:`radius_of_gyration`
(nm), :func:`potential_energy` (kJ/mol of a model), :func:`lowest_frequency` (rad/ps: the lowest vibrational
frequency of the model, through a Hessian built with ``create_graph`` and ``torch.linalg.eigvalsh``, so its
gradient is a third derivative of the energy), :func:`internal_hessian_eigenvalues`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import EnpcgError, check_int, check_positive
from .normal_modes import _masses, rigid_body_basis
from .potential import Potential, _box, _positions

METHODS = ("lbfgs", "gd")


# ---------------------------------------------------------------------------------------------- projection
def _basis(x, m, periodic):
    """Orthonormal rigid-body basis (3n, k) in the coordinates q = sqrt(m / m_mean) x (the same directions as
    in sqrt(m) x: a uniform scale does not change an orthonormal basis)."""
    return rigid_body_basis(x, m, periodic=periodic)


def remove_rigid_motion(displacement, positions, masses, periodic: bool = False) -> np.ndarray:
    """The displacement (n, 3) nm with its rigid-body part removed in the mass metric.

    Returns dx' with sum_i m_i dx'_i = 0 and (isolated systems, ``periodic`` False) sum_i m_i (x_i - X_com) x
    dx'_i = 0, to round-off; a displacement that already has both is returned unchanged, a rigid translation
    or rotation (to first order) becomes zero. positions (n, 3) nm; masses (n,) amu; periodic: translations
    only (rotations are not symmetries of a cell).
    """
    x = _positions(positions)
    m = _masses(masses, len(x))
    d = np.asarray(displacement, dtype=np.float64)
    if d.shape != x.shape:
        raise EnpcgError(f"displacement must have the shape of positions {x.shape}; received {d.shape}")
    u = _basis(x, m, periodic)
    s = np.sqrt(np.repeat(m, 3))
    q = d.reshape(-1) * s
    q = q - u @ (u.T @ q)
    return (q / s).reshape(x.shape)


def step_momenta(positions, masses, displacement) -> dict:
    """Linear and angular momentum (amu nm and amu nm^2, per unit time) of a step dx read as velocities v = dx,
    about the centre of mass of ``positions``, and their scales for relative checks:

    ``momentum`` sum_i m_i dx_i (3,), ``angular_momentum`` sum_i m_i (x_i - X_com) x dx_i (3,),
    ``momentum_scale`` sum_i m_i |dx_i|, ``angular_momentum_scale`` sum_i m_i |x_i - X_com| |dx_i|
    (what the sums would be if every term pointed the same way), ``relative_momentum`` and
    ``relative_angular_momentum``: the norms over the scales (0 for a step without rigid motion).
    """
    x = _positions(positions)
    m = _masses(masses, len(x))
    d = np.asarray(displacement, dtype=np.float64).reshape(x.shape)
    r = x - (m[:, None] * x).sum(0) / m.sum()
    p = (m[:, None] * d).sum(0)
    ang = (m[:, None] * np.cross(r, d)).sum(0)
    dn = np.linalg.norm(d, axis=1)
    sp = float((m * dn).sum())
    sl = float((m * np.linalg.norm(r, axis=1) * dn).sum())
    return {"momentum": p, "angular_momentum": ang, "momentum_scale": sp, "angular_momentum_scale": sl,
            "relative_momentum": float(np.linalg.norm(p)) / sp if sp > 0 else 0.0,
            "relative_angular_momentum": float(np.linalg.norm(ang)) / sl if sl > 0 else 0.0}


def centre_of_mass(positions, masses) -> np.ndarray:
    """(3,) nm, sum_i m_i x_i / sum_i m_i."""
    x = _positions(positions)
    m = _masses(masses, len(x))
    return (m[:, None] * x).sum(0) / m.sum()


def _evaluate(property_fn: Callable, x: np.ndarray):
    """Property value and its gradient (n, 3) by autograd, float64; refuses non-scalar or non-finite values."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    v = property_fn(xt)
    if not isinstance(v, torch.Tensor) or v.numel() != 1:
        raise EnpcgError("property_fn must return a scalar torch tensor computed from the positions tensor; "
                         f"received {type(v).__name__}{'' if not isinstance(v, torch.Tensor) else tuple(v.shape)}")
    v = v.reshape(())
    if not v.requires_grad:
        raise EnpcgError("property_fn's value does not depend on the positions (no autograd graph). Fix: compute it "
                         "from the tensor it receives with torch operations (no .numpy(), no float())")
    (g,) = torch.autograd.grad(v, xt, allow_unused=True)
    g = torch.zeros_like(xt) if g is None else g
    val, grad = float(v.detach()), g.detach().numpy().copy()
    if not np.isfinite(val) or not np.all(np.isfinite(grad)):
        raise EnpcgError(f"property_fn gave a non-finite value or gradient ({val}) at these positions (overlapping "
                         "particles, or a frequency of a degenerate or linear configuration?)")
    return val, grad


@dataclass
class ProjectedGradient:
    """Result of :func:`projected_gradient`.

    value: the property [P]; gradient (n, 3) [P]/nm: dP/dx as autograd gives it; direction (n, 3) [P]/nm: the
    steepest-ascent direction in the mass metric with the rigid motions removed, m_mean M^-1/2 P M^-1/2 dP/dx
    (a displacement along it has zero linear and angular momentum; gradient . direction >= 0);
    rigid_fraction: the norm of the removed (rigid-body) part of M^-1/2 dP/dx over its norm: round-off for a
    property invariant under rigid motions, 1 for a pure rigid coordinate (e.g. the centre of mass);
    n_rigid: rigid-body motions removed (6, 5 for a linear molecule, 3 for a cell).
    """

    value: float
    gradient: np.ndarray
    direction: np.ndarray
    rigid_fraction: float
    n_rigid: int


def projected_gradient(property_fn: Callable, positions, masses, periodic: bool = False) -> ProjectedGradient:
    """Gradient of ``property_fn`` at ``positions`` (n, 3) nm with the rigid-body motions projected out.

    property_fn: torch function of a positions tensor (n, 3) float64 nm -> scalar tensor [P]; masses (n,) amu;
    periodic: a periodic cell (translations only are removed). See the module docstring for the metric.
    """
    x = _positions(positions)
    m = _masses(masses, len(x))
    value, g = _evaluate(property_fn, x)
    u = _basis(x, m, periodic)
    s = np.sqrt(np.repeat(m, 3))
    gw = g.reshape(-1) / s  # M^-1/2 g: the gradient in sqrt(m) x coordinates
    rigid = u.T @ gw
    pw = gw - u @ rigid
    norm = float(np.linalg.norm(gw))
    direction = (m.mean() * pw / s).reshape(x.shape)  # m_mean M^-1/2 P M^-1/2 g
    return ProjectedGradient(value=value, gradient=g, direction=direction,
                             rigid_fraction=float(np.linalg.norm(rigid)) / norm if norm > 0 else 0.0,
                             n_rigid=int(u.shape[1]))


# ---------------------------------------------------------------------------------------------- properties
def _torch_masses(masses, n):
    return torch.as_tensor(_masses(masses, n), dtype=torch.float64)


def radius_of_gyration(masses) -> Callable:
    """Property: mass-weighted radius of gyration (nm), sqrt(sum_i m_i |x_i - X_com|^2 / sum_i m_i)."""
    m0 = np.asarray(masses, dtype=np.float64).reshape(-1)

    def rg(x):
        m = _torch_masses(m0, len(x)).to(x.dtype)
        r = x - (m[:, None] * x).sum(0) / m.sum()
        return torch.sqrt((m * (r * r).sum(-1)).sum() / m.sum())

    return rg


def _energy_fn(potential) -> Callable:
    if isinstance(potential, Potential):
        fn = getattr(potential, "energy_fn", None)
        if fn is None:
            raise EnpcgError(f"{type(potential).__name__} has no torch energy (an OpenMM System has no autograd). "
                             "Fix: pass a TorchPotential (TorchPotential.from_model(model)) or an energy function")
        return fn
    if callable(potential):
        return potential
    raise EnpcgError(f"potential must be a TorchPotential or a torch energy function energy(x, box); received "
                     f"{type(potential).__name__}")


def potential_energy(potential, box=None) -> Callable:
    """Property: the energy (kJ/mol) of a model at the positions. potential: a TorchPotential (e.g.
    ``TorchPotential.from_model(cg_model)``) or a torch energy function energy(x (n, 3) nm, box or None);
    box (3, 3) nm rows or None."""
    fn = _energy_fn(potential)
    b = _box(box)

    def energy(x):
        return fn(x, None if b is None else torch.tensor(b, dtype=x.dtype))

    return energy


def _rigid_projector(x, m, periodic: bool):
    """Orthonormal basis (3n, k) of the rigid-body motions in sqrt(m) x coordinates, differentiable in x:
    translations and the three rotation generators, orthonormalised by QR (the span, hence the projector, does
    not depend on the QR's choice of basis). Refuses linear configurations (a rotation generator vanishes)."""
    n = x.shape[0]
    sq = torch.sqrt(m)
    cols = []
    for a in range(3):
        t = torch.zeros(n, 3, dtype=x.dtype)
        t[:, a] = sq
        cols.append(t.reshape(-1))
    if not periodic:
        r = x - (m[:, None] * x).sum(0) / m.sum()
        for a in range(3):
            e = torch.zeros(3, dtype=x.dtype)
            e[a] = 1.0
            cols.append((sq[:, None] * torch.linalg.cross(e.expand(n, 3), r)).reshape(-1))
    a_mat = torch.stack(cols, dim=1)
    q, rr = torch.linalg.qr(a_mat)
    diag = torch.abs(torch.diagonal(rr)).detach()
    if float(diag.min()) <= 1e-8 * float(diag.max()):
        raise EnpcgError("the configuration is linear (or a single particle): a rotation generator vanishes, so the "
                         "internal frequencies are not defined this way. Fix: start from a non-linear configuration")
    return q


def internal_hessian_eigenvalues(potential, masses, box=None) -> Callable:
    """Property builder: x -> eigenvalues (1/ps^2, ascending) of the mass-weighted Hessian projected onto the
    internal motions (the 3n - 6 vibrations of a cluster; 3n - 3 in a periodic ``box``), differentiable.

    The Hessian (kJ/mol/nm^2) is built row by row with ``create_graph`` (so gradients of the eigenvalues are
    third derivatives of the energy), mass-weighted (1/ps^2), projected with P = I - U U^T (U: the rigid-body
    basis at x, differentiable) and shifted by c U U^T with c above every internal eigenvalue, so that
    ``torch.linalg.eigvalsh`` lists the internal ones first. At a non-stationary configuration this is the
    projected (instantaneous) normal-mode analysis of Miller, Handy and Adams (J. Chem. Phys. 72, 99 (1980)).
    """
    fn = _energy_fn(potential)
    m0 = np.asarray(masses, dtype=np.float64).reshape(-1)
    b = _box(box)

    def eigenvalues(x):
        n = x.shape[0]
        m = _torch_masses(m0, n).to(x.dtype)
        bt = None if b is None else torch.tensor(b, dtype=x.dtype)
        if not x.requires_grad:  # the Hessian needs a graph even when only the value is asked for
            x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(x, bt), x, create_graph=True)
        g = g.reshape(-1)
        rows = []
        for k in range(3 * n):
            (h,) = torch.autograd.grad(g[k], x, create_graph=True, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros(3 * n, dtype=x.dtype) if h is None else h.reshape(-1))
        hess = torch.stack(rows)
        w = 1.0 / torch.sqrt(m.repeat_interleave(3))
        hm = 0.5 * (hess + hess.T) * w[:, None] * w[None, :]
        u = _rigid_projector(x, m, periodic=b is not None)
        proj = torch.eye(3 * n, dtype=x.dtype) - u @ u.T
        hp = proj @ hm @ proj
        shift = 1.0 + 2.0 * float(torch.linalg.norm(hp.detach()))  # Frobenius norm >= every |eigenvalue|
        lam = torch.linalg.eigvalsh(hp + shift * (u @ u.T))
        return lam[: 3 * n - u.shape[1]]

    return eigenvalues


def lowest_frequency(potential, masses, box=None) -> Callable:
    """Property: the lowest internal vibrational angular frequency omega (rad/ps) of the model at x,
    sign(lambda) sqrt(|lambda|) of the lowest eigenvalue of :func:`internal_hessian_eigenvalues` (negative:
    an imaginary mode). potential: TorchPotential or torch energy function; masses (n,) amu; box or None.
    Multiply by :data:`~enpcg.properties.normal_modes.CM_PER_RAD_PS` for cm^-1. The lowest mode should be
    non-degenerate along the design path (the minimum of two crossing eigenvalues has a kink there)."""
    eig = internal_hessian_eigenvalues(potential, masses, box)

    def omega(x):
        lam = eig(x)[0]
        return torch.sign(lam) * torch.sqrt(torch.abs(lam))

    return omega


# ---------------------------------------------------------------------------------------------- design
@dataclass
class DesignResult:
    """Result of :func:`design`.

    positions (n, 3) nm: the designed configuration; value [P] there; target; initial_value; converged:
    |value - target| <= tolerance; n_steps: accepted steps; method; message: why it stopped;
    history: arrays per record (record 0 = the start): ``step``, ``value``, ``loss`` ([P]^2),
    ``grad_norm`` (norm of the projected loss gradient in the mass metric), ``max_displacement`` (nm, of the
    step that led there), ``com_shift`` (nm, |X_com - X_com(start)|), ``relative_momentum`` and
    ``relative_angular_momentum`` of that step (:func:`step_momenta`).
    """

    positions: np.ndarray
    value: float
    target: float
    initial_value: float
    tolerance: float
    converged: bool
    n_steps: int
    method: str
    message: str
    history: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-able numbers."""
        h = self.history
        return {"initial_value": self.initial_value, "value": self.value, "target": self.target,
                "tolerance": self.tolerance, "converged": self.converged, "n_steps": self.n_steps,
                "method": self.method, "message": self.message,
                "max_com_shift_nm": float(np.max(h["com_shift"])) if len(h.get("com_shift", [])) else 0.0,
                "max_relative_momentum": float(np.max(h["relative_momentum"])) if len(h.get("step", [])) else 0.0,
                "max_relative_angular_momentum": float(np.max(h["relative_angular_momentum"]))
                if len(h.get("step", [])) else 0.0}


def design(property_fn: Callable, target: float, positions, masses, steps: int = 200, lr: float = 1e-3, *,
           tolerance: Optional[float] = None, method: str = "lbfgs", max_step: float = 0.01,
           periodic: bool = False, memory: int = 10, callback: Optional[Callable] = None) -> DesignResult:
    """Move the particles until ``property_fn`` reaches ``target``: minimise L = (P(x) - target)^2 with every
    step free of rigid-body motion (zero linear and angular momentum in the mass metric).

    property_fn: torch function of positions (n, 3) float64 nm -> scalar [P] (e.g. :func:`lowest_frequency`);
    target [P]; positions (n, 3) nm; masses (n,) amu; steps: the most accepted steps.
    method: "lbfgs" (projected L-BFGS, ``memory`` pairs; the first step is the Gauss-Newton step
    -(P - target) d / (g . d) that solves the linearised equation; backtracking line search) or "gd"
    (projected gradient descent dx = -lr * 2 (P - target) * d, d the projected direction of
    :func:`projected_gradient`; lr in nm^2/[P]^2; the step is halved until L decreases).
    tolerance: stop when |P - target| <= tolerance, [P] (default 1e-6 |target|, or 1e-12 for target 0).
    max_step: the largest displacement of any particle in one step, nm (steps are scaled down to it).
    periodic: a periodic cell: only translations are removed. callback(k, x, value) after each accepted step.
    Returns :class:`DesignResult` (it does not raise when the target is not reached: check ``converged``).
    """
    x = _positions(positions).copy()
    m = _masses(masses, len(x))
    if method not in METHODS:
        raise EnpcgError(f"method must be one of {list(METHODS)}; received {method!r}")
    steps = check_int("steps", steps, 0, 200)
    memory = check_int("memory", memory, 1, 10)
    max_step = check_positive("max_step", max_step, "nm", 0.01)
    lr = check_positive("lr", lr, "nm^2/[P]^2", 1e-3)
    try:
        target = float(target)
    except (TypeError, ValueError):
        raise EnpcgError(f"target must be a number in the property's unit; received {target!r}") from None
    if not np.isfinite(target):
        raise EnpcgError(f"target must be finite; received {target}")
    tol = (1e-6 * abs(target) if target != 0 else 1e-12) if tolerance is None else \
        check_positive("tolerance", tolerance, "property units", 1e-4)
    s = np.sqrt(m / m.mean()).repeat(3)  # q = s x: mass-weighted coordinates with the mean mass factored out
    com0 = centre_of_mass(x, m)

    def state(xx):
        """Value, loss, projected loss gradient in q (unit-free of masses), rigid basis."""
        v, g = _evaluate(property_fn, xx)
        u = _basis(xx, m, periodic)
        gq = (2.0 * (v - target) * g).reshape(-1) / s  # dL/dq
        return v, (v - target) ** 2, gq - u @ (u.T @ gq), u, g.reshape(-1) / s

    v, loss, pg, u, gv = state(x)
    v0 = v
    hist = {k: [] for k in ("step", "value", "loss", "grad_norm", "max_displacement", "com_shift",
                            "relative_momentum", "relative_angular_momentum")}

    def record(k, v, loss, pg, dx, xx):
        mom = step_momenta(xx - dx, m, dx) if dx is not None else None
        hist["step"].append(k)
        hist["value"].append(v)
        hist["loss"].append(loss)
        hist["grad_norm"].append(float(np.linalg.norm(pg)))
        hist["max_displacement"].append(0.0 if dx is None else float(np.max(np.linalg.norm(dx, axis=1))))
        hist["com_shift"].append(float(np.linalg.norm(centre_of_mass(xx, m) - com0)))
        hist["relative_momentum"].append(0.0 if mom is None else mom["relative_momentum"])
        hist["relative_angular_momentum"].append(0.0 if mom is None else mom["relative_angular_momentum"])

    record(0, v, loss, pg, None, x)
    pairs = []  # L-BFGS (s_k, y_k) in q coordinates
    message, k = f"reached {steps} steps", 0
    while abs(v - target) > tol:
        if k >= steps:
            break
        if not np.any(pg):
            message = "the projected gradient vanishes: the property cannot change by internal motions here"
            break
        if method == "gd":
            dq = -lr * pg  # in x: dx = -lr 2 (P - t) m_mean M^-1/2 P M^-1/2 g (q carries the mass metric)
        else:
            if not pairs:
                # Gauss-Newton: the smallest step (mass metric) on which the linearised property hits the target
                pgv = gv - u @ (u.T @ gv)
                dq = -(v - target) * pgv / float(pgv @ pgv)
            else:
                dq = _two_loop(pg, pairs)
                if float(dq @ pg) >= 0:  # not a descent direction: forget the curvature pairs
                    pairs.clear()
                    pgv = gv - u @ (u.T @ gv)
                    dq = -(v - target) * pgv / float(pgv @ pgv)
        dq = dq - u @ (u.T @ dq)  # the step itself free of rigid motion at the current positions
        dx = (dq / s).reshape(x.shape)
        big = float(np.max(np.linalg.norm(dx, axis=1)))
        if big > max_step:
            dx *= max_step / big
        accepted = False
        for _ in range(40):  # backtracking: Armijo condition on L along dx
            x_new = x + dx
            try:
                v_new, loss_new, pg_new, u_new, gv_new = state(x_new)
            except EnpcgError:
                v_new = None  # a non-finite property (overlap): shorten the step
            if v_new is not None and loss_new <= loss + 1e-4 * float(pg @ (dx.reshape(-1) * s)):
                accepted = True
                break
            dx = 0.5 * dx
        if not accepted:
            message = "the line search found no decrease of (P - target)^2 (a local minimum of the loss?)"
            break
        k += 1
        sq = dx.reshape(-1) * s
        yq = pg_new - pg
        # keep only pairs of positive curvature: the two-loop recursion then gives a descent direction
        if method == "lbfgs" and float(sq @ yq) > 1e-12 * float(np.linalg.norm(sq) * np.linalg.norm(yq)):
            pairs.append((sq, yq))
            if len(pairs) > memory:
                pairs.pop(0)
        x, v, loss, pg, u, gv = x_new, v_new, loss_new, pg_new, u_new, gv_new
        record(k, v, loss, pg, dx, x)
        if callback is not None:
            callback(k, x.copy(), v)
    converged = abs(v - target) <= tol
    if converged:
        message = f"|P - target| = {abs(v - target):.3g} <= tolerance {tol:.3g} after {k} steps"
    return DesignResult(positions=x, value=float(v), target=target, initial_value=float(v0), tolerance=float(tol),
                        converged=bool(converged), n_steps=k, method=method, message=message,
                        history={key: np.asarray(val) for key, val in hist.items()})


def _two_loop(g, pairs):
    """L-BFGS direction -H g from the curvature pairs (s_k, y_k) (two-loop recursion, H0 = s.y / y.y)."""
    q = g.copy()
    alphas = []
    for s_k, y_k in reversed(pairs):
        rho = 1.0 / float(y_k @ s_k)
        a = rho * float(s_k @ q)
        q -= a * y_k
        alphas.append((rho, a))
    s_k, y_k = pairs[-1]
    q *= float(s_k @ y_k) / float(y_k @ y_k)
    for (s_k, y_k), (rho, a) in zip(pairs, reversed(alphas)):
        b = rho * float(y_k @ q)
        q += (a - b) * s_k
    return -q


# ---------------------------------------------------------------------------------------------- plot
def plot_design_history(results, path, unit: str = "", title: Optional[str] = None) -> Path:
    """History of one or several designs: the property against the step (target dashed) and |P - target|
    (log scale). results: a :class:`DesignResult` or {label: DesignResult}; unit: the property's unit for
    the axis label (one shared axis: use one unit). PNG written atomically; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..fileio import atomic_path

    if isinstance(results, DesignResult):
        results = {"design": results}
    if not results:
        raise EnpcgError("plot_design_history: no results to plot")
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, (label, r) in enumerate(results.items()):
        c = f"C{i}"
        h = r.history
        ax1.plot(h["step"], h["value"], "o-", color=c, markersize=3, label=label)
        ax1.axhline(r.target, color=c, linestyle="--", linewidth=0.8)
        err = np.abs(np.asarray(h["value"]) - r.target)
        # an exact hit (error 0) is drawn at the float64 round-off of the target, not at 1e-300
        floor = 1e-16 * max(abs(r.target), 1e-300)
        ax2.semilogy(h["step"], np.maximum(err, floor), "o-", color=c, markersize=3, label=label)
        ax2.axhline(r.tolerance, color=c, linestyle=":", linewidth=0.8)
    ax1.set(xlabel="accepted step", ylabel=f"property ({unit})" if unit else "property",
            title=title or "inverse design (target dashed)")
    ax2.set(xlabel="accepted step", ylabel="|property - target|", title="distance to target (tolerance dotted)")
    ax1.legend(fontsize="small")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
