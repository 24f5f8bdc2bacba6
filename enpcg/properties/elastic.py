"""Elastic constants of any potential at a mechanical equilibrium: strain derivatives with the non-affine
(relaxation) term, and an independent finite-difference stress-strain route.

Units: positions and boxes nm (box vectors are the **rows** of a (3, 3) array), energy kJ/mol, forces
kJ/mol/nm, stress and elastic constants kJ/mol/nm^3 (1 kJ/mol/nm^3 = 16.6054 bar = 1.66054e-3 GPa; see
:data:`~enpcg.properties.potential.KJ_MOL_NM3_IN_GPA`), strain dimensionless, volume nm^3.

Conventions
-----------
Strain: the homogeneous deformation x -> x F, box rows alike, with F = I + eps and eps symmetric (no rotation;
this is what :class:`~enpcg.properties.potential.Potential` uses). Stress sigma = (1/V) dE/d eps (potential
part, the Cauchy stress of the current state; sigma = -P I for a fluid at pressure P, tension positive).
Voigt order 1 = xx, 2 = yy, 3 = zz, 4 = yz, 5 = xz, 6 = xy; C_IJ = C_ijkl with no factors, so a Voigt strain
vector holds engineering shears (gamma_yz = 2 eps_yz).

Three fourth-rank tensors are related by stress terms (all equal at zero stress):

* ``energy_tensor`` C^E_abcd = (1/V) d2E/d eps_ab d eps_cd at the relaxed configuration (positions allowed to
  relax at each strain):  C^E = (1/V) [ d2E/d eps d eps  -  M^T H^+ M ]  (Born term minus non-affine term),
  M = d2E/d eps d x (3, 3, 3n) and H^+ the pseudo-inverse of the Hessian with the 3 rigid translations
  projected out.
* ``lagrangian`` C^L (second derivative of E/V in the Lagrangian strain eta = (F^T F - I)/2):
  C^E = C^L + (1/4)(s_ac d_bd + s_ad d_bc + s_bc d_ad + s_bd d_ac). C^L has the major symmetry always.
* ``birch`` B, the stress-strain (Birch / Wallace) coefficients, d sigma_ab = B_abcd d eps_cd for a strain
  applied to the stressed reference state:  B = C^L + (1/2)(s_ac d_bd + s_ad d_bc + s_bc d_ad + s_bd d_ac)
  - s_ab d_cd.  **This is the tensor reported** (``ElasticResult.birch``, ``.voigt``): it is what a
  stress-strain experiment or the finite-difference route measures, and it governs stability and sound
  speeds. Under a hydrostatic stress -P: B11 = C^L11 - P, B12 = C^L12 + P, B44 = C^L44 - P; B has the minor
  symmetries always and the major symmetry only when the stress is hydrostatic.

Routes
------
* :func:`elastic_tensor`: analytic, from :meth:`TorchPotential.strain_derivatives` (autograd) and the Hessian.
* :func:`elastic_tensor_fd`: apply +-h strains, relax the positions at each strained cell (OpenMM's
  LocalEnergyMinimizer for an :class:`OpenMMPotential`, scipy L-BFGS otherwise), evaluate the stress and take
  central differences: B_ab,cd = (sigma_ab(+h) - sigma_ab(-h)) / 2h. No second derivatives at all.

Also: moduli (Voigt / Reuss / Hill bulk and shear, Young, Poisson; directional Young), symmetry and
isotropy reports, a comparison table and heat-map plot of two tensors (CG model against mapped reference),
and the Kob-Andersen glass (:func:`ka_energy_fn`, :func:`ka_glass_samples`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import EnpcgError, check_int, check_positive
from .potential import KJ_MOL_NM3_IN_GPA, OpenMMPotential, Potential, TorchPotential, _box, _positions

#: Voigt index pairs: 1 = xx, 2 = yy, 3 = zz, 4 = yz, 5 = xz, 6 = xy (0-based tensor indices).
VOIGT_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))
_UNITS = {"kJ/mol/nm^3": 1.0, "GPa": KJ_MOL_NM3_IN_GPA, "bar": 16.6054}


# ---------------------------------------------------------------------------------------------- tensors
def _tensor4(c, name="elastic tensor") -> np.ndarray:
    """(3, 3, 3, 3) array from a (3, 3, 3, 3) or Voigt (6, 6) input (or an ElasticResult)."""
    if isinstance(c, ElasticResult):
        return c.birch
    arr = np.asarray(c, dtype=np.float64)
    if arr.shape == (6, 6):
        return from_voigt(arr)
    if arr.shape != (3, 3, 3, 3):
        raise EnpcgError(f"{name} must be a (3, 3, 3, 3) tensor or a (6, 6) Voigt matrix in kJ/mol/nm^3; "
                         f"received shape {arr.shape}")
    return arr


def to_voigt(c) -> np.ndarray:
    """Voigt (6, 6) matrix C_IJ = C_ijkl (no factors) of a (3, 3, 3, 3) tensor; order xx, yy, zz, yz, xz, xy."""
    c = _tensor4(c)
    return np.array([[c[a, b, p, q] for (p, q) in VOIGT_PAIRS] for (a, b) in VOIGT_PAIRS])


def from_voigt(c6) -> np.ndarray:
    """(3, 3, 3, 3) tensor with the minor symmetries from a Voigt (6, 6) matrix (order xx, yy, zz, yz, xz, xy)."""
    c6 = np.asarray(c6, dtype=np.float64)
    if c6.shape != (6, 6):
        raise EnpcgError(f"Voigt matrix must be (6, 6); received shape {c6.shape}")
    c = np.zeros((3, 3, 3, 3))
    for i, (a, b) in enumerate(VOIGT_PAIRS):
        for j, (p, q) in enumerate(VOIGT_PAIRS):
            for (x, y) in {(a, b), (b, a)}:
                for (z, w) in {(p, q), (q, p)}:
                    c[x, y, z, w] = c6[i, j]
    return c


def _stress_sym(stress) -> np.ndarray:
    """(1/4)(s_ac d_bd + s_ad d_bc + s_bc d_ad + s_bd d_ac): the stress term between C^E and C^L."""
    s, d = np.asarray(stress, dtype=np.float64), np.eye(3)
    return 0.25 * (np.einsum("ac,bd->abcd", s, d) + np.einsum("ad,bc->abcd", s, d)
                   + np.einsum("bc,ad->abcd", s, d) + np.einsum("bd,ac->abcd", s, d))


def birch_from_energy(c_energy, stress) -> np.ndarray:
    """Stress-strain (Birch) coefficients B from C^E = (1/V) d2E/d eps d eps at stress ``stress`` (3, 3);
    all in kJ/mol/nm^3: B = C^E + (1/4)(s_ac d_bd + s_ad d_bc + s_bc d_ad + s_bd d_ac) - s_ab d_cd."""
    s = np.asarray(stress, dtype=np.float64)
    return _tensor4(c_energy) + _stress_sym(s) - np.einsum("ab,cd->abcd", s, np.eye(3))


def energy_from_birch(birch, stress) -> np.ndarray:
    """Inverse of :func:`birch_from_energy`: C^E = B - (1/4)(...) + s_ab d_cd (kJ/mol/nm^3)."""
    s = np.asarray(stress, dtype=np.float64)
    return _tensor4(birch) - _stress_sym(s) + np.einsum("ab,cd->abcd", s, np.eye(3))


def symmetry_report(c) -> dict:
    """Largest violations of the symmetries of a (3, 3, 3, 3) tensor, relative to max |C| (dimensionless):
    ``major`` (C_abcd = C_cdab), ``minor_ab`` (C_abcd = C_bacd), ``minor_cd`` (C_abcd = C_abdc); plus
    ``max_abs`` (kJ/mol/nm^3)."""
    c = _tensor4(c)
    scale = float(np.max(np.abs(c)))
    if scale == 0.0:
        raise EnpcgError("symmetry_report: the tensor is zero")
    return {"major": float(np.max(np.abs(c - c.transpose(2, 3, 0, 1)))) / scale,
            "minor_ab": float(np.max(np.abs(c - c.transpose(1, 0, 2, 3)))) / scale,
            "minor_cd": float(np.max(np.abs(c - c.transpose(0, 1, 3, 2)))) / scale,
            "max_abs": scale}


def elastic_moduli(c) -> dict:
    """Polycrystal averages of an elastic tensor ((6, 6) Voigt or (3, 3, 3, 3)), kJ/mol/nm^3 except nu:

    ``K_V``, ``G_V`` (Voigt, uniform strain), ``K_R``, ``G_R`` (Reuss, uniform stress; NaN if C is singular),
    ``K_H``, ``G_H`` (Hill: their means), ``E_H`` = 9 K G / (3 K + G) (Young, Hill) and ``nu_H`` =
    (3K - 2G) / (2(3K + G)) (Poisson, dimensionless). For an isotropic tensor all three averages coincide.
    """
    c6 = to_voigt(c)
    kv = (c6[0, 0] + c6[1, 1] + c6[2, 2] + 2 * (c6[0, 1] + c6[0, 2] + c6[1, 2])) / 9
    gv = (c6[0, 0] + c6[1, 1] + c6[2, 2] - (c6[0, 1] + c6[0, 2] + c6[1, 2])
          + 3 * (c6[3, 3] + c6[4, 4] + c6[5, 5])) / 15
    try:
        s6 = np.linalg.inv(c6)  # compliance in the engineering-shear Voigt convention
        kr = 1 / (s6[0, 0] + s6[1, 1] + s6[2, 2] + 2 * (s6[0, 1] + s6[0, 2] + s6[1, 2]))
        gr = 15 / (4 * (s6[0, 0] + s6[1, 1] + s6[2, 2]) - 4 * (s6[0, 1] + s6[0, 2] + s6[1, 2])
                   + 3 * (s6[3, 3] + s6[4, 4] + s6[5, 5]))
    except np.linalg.LinAlgError:
        kr = gr = float("nan")
    kh, gh = (kv + kr) / 2, (gv + gr) / 2
    return {"K_V": float(kv), "K_R": float(kr), "K_H": float(kh), "G_V": float(gv), "G_R": float(gr),
            "G_H": float(gh), "E_H": float(9 * kh * gh / (3 * kh + gh)),
            "nu_H": float((3 * kh - 2 * gh) / (2 * (3 * kh + gh)))}


def young_modulus(c, direction) -> float:
    """Young modulus (kJ/mol/nm^3) along ``direction`` (3,): 1 / (n n : S : n n) with S = C^-1.

    For a cubic crystal E[100] = 1 / S11."""
    n = np.asarray(direction, dtype=np.float64).reshape(-1)
    if n.shape != (3,) or not np.linalg.norm(n) > 0:
        raise EnpcgError(f"direction must be a non-zero 3-vector; received {direction!r}")
    n = n / np.linalg.norm(n)
    s6 = np.linalg.inv(to_voigt(c))
    sv = np.array([n[0] ** 2, n[1] ** 2, n[2] ** 2, n[1] * n[2], n[0] * n[2], n[0] * n[1]])
    return float(1.0 / (sv @ s6 @ sv))


def isotropy(c) -> dict:
    """Cubic-axes isotropy test of one tensor (kJ/mol/nm^3): C11, C12, C44 averaged over the three axes
    (mean of C11, C22, C33; of C12, C13, C23; of C44, C55, C66), ``delta`` = C11 - C12 - 2 C44 (zero for an
    isotropic tensor), ``zener`` = 2 C44 / (C11 - C12) (one when isotropic) and ``delta_rel`` = delta / (2 C44)."""
    c6 = to_voigt(c)
    c11 = float(np.mean([c6[0, 0], c6[1, 1], c6[2, 2]]))
    c12 = float(np.mean([c6[0, 1], c6[0, 2], c6[1, 2]]))
    c44 = float(np.mean([c6[3, 3], c6[4, 4], c6[5, 5]]))
    delta = c11 - c12 - 2 * c44
    return {"C11": c11, "C12": c12, "C44": c44, "delta": delta, "zener": 2 * c44 / (c11 - c12),
            "delta_rel": delta / (2 * c44)}


def _mean_se(values) -> tuple:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))


def isotropy_statistics(results: Sequence) -> dict:
    """Isotropy of an ensemble of independent samples (ElasticResults or tensors), with standard errors.

    For each sample :func:`isotropy` gives delta = C11 - C12 - 2 C44 (cubic-axes averages); over the samples:
    ``delta_mean`` and its standard error ``delta_se`` = std / sqrt(n) (kJ/mol/nm^3), ``delta_z`` =
    delta_mean / delta_se (|z| <~ 2-3 means isotropic within the statistical error), the sample means and
    errors of C11, C12, C44, of the Voigt shear and bulk moduli ``G``, ``K`` and, where the samples are
    ElasticResults from :func:`elastic_tensor`, of the affine-only (unrelaxed, Born) Voigt shear modulus
    ``G_affine`` (all kJ/mol/nm^3, errors ``*_se``). Only the fixed lab axes are meaningful here: the periodic
    cell's axes are the only directions an ensemble of glass samples could single out (a rotational average
    of each tensor would be isotropic by construction and test nothing).
    """
    if len(results) < 2:
        raise EnpcgError(f"isotropy_statistics needs at least 2 independent samples for an error; got {len(results)}")
    iso = [isotropy(r) for r in results]
    out = {"n_samples": len(results), "deltas": [d["delta"] for d in iso]}
    out["delta_mean"], out["delta_se"] = _mean_se(out["deltas"])
    out["delta_z"] = out["delta_mean"] / out["delta_se"] if out["delta_se"] > 0 else float("inf")
    for key in ("C11", "C12", "C44"):
        out[key], out[key + "_se"] = _mean_se([d[key] for d in iso])
    # Voigt averages: linear in C, so the sample mean is the modulus of the mean tensor (a Reuss or Hill
    # average of one small, anisotropic sample is dominated by its softest direction)
    out["G"], out["G_se"] = _mean_se([elastic_moduli(r)["G_V"] for r in results])
    out["K"], out["K_se"] = _mean_se([elastic_moduli(r)["K_V"] for r in results])
    if all(isinstance(r, ElasticResult) and r.affine_birch is not None for r in results):
        out["G_affine"], out["G_affine_se"] = _mean_se([elastic_moduli(r.affine_birch)["G_V"] for r in results])
    return out


# ---------------------------------------------------------------------------------------------- results
@dataclass
class ElasticResult:
    """Elastic constants of one configuration; every tensor is (3, 3, 3, 3) in kJ/mol/nm^3.

    ``birch``: the reported tensor, stress-strain coefficients B (see the module docstring); ``stress`` (3, 3)
    kJ/mol/nm^3 of the reference state; ``volume`` nm^3; ``method`` "analytic" or "finite-difference".
    Analytic route only: ``affine_birch`` (Born term only: the unrelaxed, affine response), ``nonaffine``
    ((1/V) M^T H^+ M, subtracted from the Born term; positive semi-definite), ``min_eigenvalue`` (smallest
    Hessian eigenvalue without translations, kJ/mol/nm^2), ``n_zero_modes`` (further modes treated as zero
    in the pseudo-inverse), ``rms_force`` (kJ/mol/nm). Finite differences: ``strain`` (the step h).
    """

    birch: np.ndarray
    stress: np.ndarray
    volume: float
    method: str
    affine_birch: Optional[np.ndarray] = None
    nonaffine: Optional[np.ndarray] = None
    min_eigenvalue: Optional[float] = None
    n_zero_modes: Optional[int] = None
    rms_force: Optional[float] = None
    strain: Optional[float] = None
    info: dict = field(default_factory=dict)

    @property
    def voigt(self) -> np.ndarray:
        """Voigt (6, 6) of :attr:`birch`, kJ/mol/nm^3."""
        return to_voigt(self.birch)

    @property
    def affine_voigt(self) -> Optional[np.ndarray]:
        """Voigt (6, 6) of the affine-only (Born) tensor, kJ/mol/nm^3 (analytic route only)."""
        return None if self.affine_birch is None else to_voigt(self.affine_birch)

    @property
    def energy_tensor(self) -> np.ndarray:
        """C^E = (1/V) d2E/d eps d eps (relaxed), kJ/mol/nm^3."""
        return energy_from_birch(self.birch, self.stress)

    @property
    def lagrangian(self) -> np.ndarray:
        """C^L, the Lagrangian-strain elastic constants (major-symmetric), kJ/mol/nm^3."""
        return self.energy_tensor - _stress_sym(self.stress)

    def moduli(self) -> dict:
        """:func:`elastic_moduli` of :attr:`birch`."""
        return elastic_moduli(self.birch)

    def symmetry(self) -> dict:
        """:func:`symmetry_report` of :attr:`birch` (major symmetry exact only at hydrostatic stress) and of
        the Lagrangian tensor (``lagrangian_major``, always exact)."""
        rep = symmetry_report(self.birch)
        rep["lagrangian_major"] = symmetry_report(self.lagrangian)["major"]
        return rep

    def cubic(self) -> dict:
        """C11, C12, C44 averaged over the cubic axes, kJ/mol/nm^3 (see :func:`isotropy`)."""
        iso = isotropy(self.birch)
        return {k: iso[k] for k in ("C11", "C12", "C44")}


# ---------------------------------------------------------------------------------------------- analytic
def _rms(f) -> float:
    return float(np.sqrt(np.mean(np.asarray(f) ** 2)))


def _translation_complement(n: int) -> np.ndarray:
    """Orthonormal basis (3n, 3n - 3) of the displacements with zero centroid motion (no rigid translation)."""
    from scipy.linalg import null_space

    t = np.tile(np.eye(3), (n, 1)) / np.sqrt(n)  # (3n, 3) orthonormal translations
    return null_space(t.T)


def nonaffine_term(hessian, mixed, volume: float, rcond: float = 1e-8):
    """(1/V) M^T H^+ M as (3, 3, 3, 3) kJ/mol/nm^3, with H (3n, 3n) kJ/mol/nm^2 restricted to the complement of
    the 3 rigid translations and M = d2E/d eps d x (3, 3, 3n) kJ/mol/nm. Modes with |lambda| <= rcond *
    lambda_max are left out of the pseudo-inverse. Returns (term, min_eigenvalue, n_zero_modes).

    Raises EnpcgError when the configuration is not a minimum (a clearly negative eigenvalue)."""
    h = np.asarray(hessian, dtype=np.float64)
    m = np.asarray(mixed, dtype=np.float64).reshape(9, -1)
    n3 = h.shape[0]
    if h.shape != (n3, n3) or m.shape[1] != n3 or n3 % 3:
        raise EnpcgError(f"Hessian {h.shape} and mixed derivatives {np.shape(mixed)} do not match (3n, 3n), (3, 3, 3n)")
    q = _translation_complement(n3 // 3)
    w, v = np.linalg.eigh(q.T @ h @ q)
    lam_max = float(np.max(np.abs(w)))
    if w[0] < -rcond * lam_max * 1e2:
        raise EnpcgError(f"the Hessian has a negative eigenvalue {w[0]:.4g} kJ/mol/nm^2 (largest {lam_max:.4g}): "
                         "the configuration is not a local energy minimum at this cell. Fix: minimise the "
                         "positions first (enpcg.properties.elastic.minimize)")
    keep = np.abs(w) > rcond * lam_max
    y = (m @ q) @ v[:, keep]  # (9, k): M projected on the kept normal modes
    term = (y / w[keep]) @ y.T / volume
    return term.reshape(3, 3, 3, 3), float(w[0]), int(np.count_nonzero(~keep))


def elastic_tensor(potential: Potential, positions, box, *, nonaffine="auto", force_tolerance: float = 1e-4,
                   rcond: float = 1e-8) -> ElasticResult:
    """Elastic tensor at a mechanical equilibrium (positions minimised at fixed cell) from strain derivatives.

    potential : a Potential with ``strain_derivatives`` (:class:`TorchPotential`; for an OpenMM System use
        :func:`elastic_tensor_fd`); positions (n, 3) nm; box (3, 3) nm rows (periodic).
    nonaffine : True computes the Hessian and the relaxation term (1/V) M^T H^+ M; False gives the affine
        (Born) tensor only; "auto" (default) computes it unless M vanishes to round-off (max |M| below 1e-9 of
        the scale max|Born| / (V/n)^(1/3)), as in crystals where every atom is an inversion centre (fcc, bcc),
        where the term is exactly zero and the 3n x 3n Hessian would be wasted.
    force_tolerance : largest allowed RMS force, kJ/mol/nm; the formula holds at a minimum only.
    rcond : relative eigenvalue cut of the pseudo-inverse (see :func:`nonaffine_term`).

    Returns an :class:`ElasticResult` whose ``birch`` is B = birch_from_energy(C^E, stress) with
    C^E = (1/V)[d2E/d eps d eps - M^T H^+ M]; ``affine_birch`` keeps only the Born term.
    """
    if not hasattr(potential, "strain_derivatives"):
        raise EnpcgError(f"{type(potential).__name__} has no strain_derivatives (no second derivatives in OpenMM). "
                         "Fix: use elastic_tensor_fd for it, or a TorchPotential")
    if nonaffine not in (True, False, "auto"):
        raise EnpcgError(f"nonaffine must be True, False or 'auto'; received {nonaffine!r}")
    x = _positions(positions, potential.n_particles)
    b = _box(box)
    if b is None:
        raise EnpcgError("elastic_tensor needs a periodic box (3, 3) nm")
    volume = abs(float(np.linalg.det(b)))
    _, f = potential.energy_and_forces(x, b)
    rms = _rms(f)
    if rms > force_tolerance:
        raise EnpcgError(f"RMS force {rms:.3g} kJ/mol/nm exceeds force_tolerance {force_tolerance:g}: the elastic "
                         "formula needs a mechanical equilibrium. Fix: minimise the positions at this cell first "
                         "(enpcg.properties.elastic.minimize)")
    stress = potential.stress(x, b)
    born, mixed = potential.strain_derivatives(x, b)
    c_affine = born / volume
    scale = float(np.max(np.abs(born))) / (volume / len(x)) ** (1 / 3)
    skip = nonaffine is False or (nonaffine == "auto" and float(np.max(np.abs(mixed))) <= 1e-9 * scale)
    if skip:
        na, lam0, nzero = np.zeros((3, 3, 3, 3)), None, None
    else:
        na, lam0, nzero = nonaffine_term(potential.hessian(x, b), mixed, volume, rcond)
    return ElasticResult(birch=birch_from_energy(c_affine - na, stress), stress=stress, volume=volume,
                         method="analytic", affine_birch=birch_from_energy(c_affine, stress), nonaffine=na,
                         min_eigenvalue=lam0, n_zero_modes=nzero, rms_force=rms,
                         info={"nonaffine_computed": not skip, "max_mixed": float(np.max(np.abs(mixed)))})


# ---------------------------------------------------------------------------------------------- minimisation
def _reduced_frame(x, b):
    """Rotate positions and box so that the box is in OpenMM's reduced form: returns (x q, tril(b q), q)."""
    q, r = np.linalg.qr(b.T)
    q = q * np.sign(np.diag(r))
    return x @ q, np.tril(b @ q), q


@dataclass
class MinimizeResult:
    """``positions`` (n, 3) nm, ``energy`` kJ/mol, ``rms_force`` and ``max_force`` kJ/mol/nm, ``iterations``,
    ``converged`` (RMS force <= tolerance), ``method``."""

    positions: np.ndarray
    energy: float
    rms_force: float
    max_force: float
    iterations: int
    converged: bool
    method: str


def minimize(potential: Potential, positions, box=None, *, tolerance: float = 1e-6, max_iterations: int = 20000,
             method: str = "auto") -> MinimizeResult:
    """Minimise the energy over positions at a fixed cell.

    tolerance : target RMS force, kJ/mol/nm. method : "openmm" (OpenMM's LocalEnergyMinimizer, L-BFGS in the
    potential's Context; OpenMMPotential only; the cell is rotated into OpenMM's reduced form and the result
    rotated back), "lbfgs" (scipy L-BFGS-B on energy and forces, any Potential; a final Newton step on the
    translation-projected Hessian is not taken: L-BFGS reaches ~1e-7 kJ/mol/nm on double-precision energies)
    or "auto" (openmm for an OpenMMPotential, lbfgs otherwise). Returns a :class:`MinimizeResult`; it does not
    raise when the tolerance is missed (check ``converged``).
    """
    from scipy.optimize import minimize as sp_minimize

    tolerance = check_positive("tolerance", tolerance, "kJ/mol/nm (RMS force)", 1e-6)
    max_iterations = check_int("max_iterations", max_iterations, 1)
    x = _positions(positions, potential.n_particles)
    b = _box(box)
    if method == "auto":
        method = "openmm" if isinstance(potential, OpenMMPotential) else "lbfgs"
    if method == "openmm":
        import openmm

        if not isinstance(potential, OpenMMPotential):
            raise EnpcgError("method='openmm' needs an OpenMMPotential. Fix: method='lbfgs'")
        xr, br, q = (x, b, np.eye(3)) if b is None else _reduced_frame(x, b)
        potential._set(xr, br)
        openmm.LocalEnergyMinimizer.minimize(potential.context, tolerance, max_iterations)
        state = potential.context.getState(getPositions=True)
        xr = np.asarray(state.getPositions(asNumpy=True)._value)
        e, f = potential.energy_and_forces(xr, br)  # OpenMM needs the reduced frame; |f| is frame-independent
        x_new, iterations = xr @ q.T, -1  # OpenMM does not report its iteration count
    elif method == "lbfgs":
        n_calls = [0]

        def fun(z):
            n_calls[0] += 1
            e, f = potential.energy_and_forces(z.reshape(-1, 3), b)
            return e, -f.reshape(-1)

        # gtol on the largest component (<= RMS target); ftol tiny so that only the gradient stops it, or a
        # line search that cannot lower a double-precision energy any further
        res = sp_minimize(fun, x.reshape(-1), jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iterations, "maxcor": 30, "gtol": tolerance, "ftol": 1e-300,
                                   "maxfun": 2 * max_iterations, "maxls": 50})
        x_new, iterations = res.x.reshape(-1, 3), int(res.nit)
        e, f = potential.energy_and_forces(x_new, b)
    else:
        raise EnpcgError(f"method must be 'auto', 'openmm' or 'lbfgs'; received {method!r}")
    rms = _rms(f)
    return MinimizeResult(positions=x_new, energy=float(e), rms_force=rms, max_force=float(np.max(np.abs(f))),
                          iterations=iterations, converged=rms <= tolerance, method=method)


# ---------------------------------------------------------------------------------------------- finite differences
def _lab_stress(potential, x, b):
    """Stress (3, 3) kJ/mol/nm^3 of positions x in cell b (any orientation), in the frame of x and b: evaluated
    in OpenMM's reduced frame (required by OpenMM, harmless elsewhere) and rotated back, sigma = q s q^T."""
    xr, br, q = _reduced_frame(x, b)
    return q @ potential.stress(xr, br) @ q.T


def elastic_tensor_fd(potential: Potential, positions, box, *, strain: float = 1e-3, relax: bool = True,
                      tolerance: float = 1e-6, max_iterations: int = 20000, method: str = "auto") -> ElasticResult:
    """Stress-strain elastic tensor by central finite differences, relaxing the positions at each strained cell.

    For each Voigt component J (xx, yy, zz, yz, xz, xy) the cell and positions are deformed by F = I +- eps_J
    (eps_cc = h, or eps_cd = eps_dc = h/2 for a shear, i.e. an engineering shear h), the positions minimised
    at that cell (``relax``; :func:`minimize` with ``tolerance`` RMS force kJ/mol/nm and ``method``), the stress
    evaluated (``potential.stress``, rotated back to the lab frame) and B_IJ = (sigma_I(+h) - sigma_I(-h)) / 2h.
    This measures the stress-strain (Birch) coefficients directly; no second derivative of the potential is
    used. positions (n, 3) nm at mechanical equilibrium; box (3, 3) nm rows; strain h dimensionless (small:
    the error is O(h^2); for glasses keep h small, e.g. 1e-4, so that no plastic event happens).
    Returns an :class:`ElasticResult` (method "finite-difference"; ``info["rms_force"]`` the worst RMS force
    left by the relaxations).
    """
    h = check_positive("strain", strain, "dimensionless strain", 1e-3)
    if h > 0.05:
        raise EnpcgError(f"strain {h} is not small (finite differences need h << 1). Fix: e.g. strain=1e-3")
    x = _positions(positions, potential.n_particles)
    b = _box(box)
    if b is None:
        raise EnpcgError("elastic_tensor_fd needs a periodic box (3, 3) nm")
    stress0 = _lab_stress(potential, x, b)
    c6 = np.zeros((6, 6))
    worst = 0.0
    for j, (c, d) in enumerate(VOIGT_PAIRS):
        sig = []
        for sign in (1.0, -1.0):
            eps = np.zeros((3, 3))
            if c == d:
                eps[c, c] = sign * h
            else:
                eps[c, d] = eps[d, c] = sign * h / 2
            f = np.eye(3) + eps
            xs, bs = x @ f, b @ f
            if relax:
                res = minimize(potential, xs, bs, tolerance=tolerance, max_iterations=max_iterations, method=method)
                xs, worst = res.positions, max(worst, res.rms_force)
            sig.append(_lab_stress(potential, xs, bs))
        ds = (sig[0] - sig[1]) / (2 * h)
        c6[:, j] = [ds[a, bb] for (a, bb) in VOIGT_PAIRS]
    return ElasticResult(birch=from_voigt(c6), stress=stress0, volume=abs(float(np.linalg.det(b))),
                         method="finite-difference", strain=h, info={"rms_force": worst, "relaxed": relax})


# ---------------------------------------------------------------------------------------------- comparison
_CUBIC_ROWS = (("C11", 0, 0), ("C22", 1, 1), ("C33", 2, 2), ("C12", 0, 1), ("C13", 0, 2), ("C23", 1, 2),
               ("C44", 3, 3), ("C55", 4, 4), ("C66", 5, 5))


def _unit_factor(unit: str) -> float:
    if unit not in _UNITS:
        raise EnpcgError(f"unit must be one of {sorted(_UNITS)}; received {unit!r}")
    return _UNITS[unit]  # value of 1 kJ/mol/nm^3 in that unit


@dataclass
class ElasticComparison:
    """Two elastic tensors side by side. ``rows``: (name, model, reference, model - reference, relative
    difference) in ``unit``; ``names`` (model, reference); ``model``, ``reference``: Voigt (6, 6) in
    kJ/mol/nm^3."""

    names: tuple
    model: np.ndarray
    reference: np.ndarray
    rows: list
    unit: str

    def markdown(self) -> str:
        """A Markdown table of the rows."""
        m, r = self.names
        lines = [f"| constant | {m} ({self.unit}) | {r} ({self.unit}) | difference | relative |",
                 "|---|---|---|---|---|"]
        for name, a, b, d, rel in self.rows:
            lines.append(f"| {name} | {a:.4g} | {b:.4g} | {d:+.3g} | {rel:+.2%} |")
        return "\n".join(lines)

    @property
    def max_relative_difference(self) -> float:
        """Largest |relative difference| over the rows (cubic constants and moduli; Poisson excluded)."""
        return float(max(abs(r[4]) for r in self.rows if r[0] != "nu_H"))


def compare_elastic(model, reference, names=("model", "reference"), unit: str = "GPa") -> ElasticComparison:
    """Compare two elastic tensors (ElasticResult, (6, 6) Voigt or (3, 3, 3, 3), kJ/mol/nm^3): C11 ... C66 and
    the Hill moduli K, G, E (in ``unit``: "GPa", "bar" or "kJ/mol/nm^3") and Poisson's ratio."""
    fac = _unit_factor(unit)
    cm, cr = to_voigt(model), to_voigt(reference)
    rows = []

    def add(name, a, b, scale=fac):
        a, b = a * scale, b * scale
        rows.append((name, a, b, a - b, (a - b) / b if b != 0 else float("nan")))

    for name, i, j in _CUBIC_ROWS:
        add(name, cm[i, j], cr[i, j])
    mm, mr = elastic_moduli(cm), elastic_moduli(cr)
    for key in ("K_H", "G_H", "E_H"):
        add(key, mm[key], mr[key])
    add("nu_H", mm["nu_H"], mr["nu_H"], 1.0)
    return ElasticComparison(names=tuple(names), model=cm, reference=cr, rows=rows, unit=unit)


def compare_model_elastic(model_potential: Potential, reference_potential: Potential, reference_positions, box,
                          mapping=None, *, names=("CG model", "mapped reference"), unit: str = "GPa",
                          tolerance: float = 1e-6, strain: float = 1e-3) -> tuple:
    """Elastic tensor of a CG model against its atomistic reference, each at its own mechanical equilibrium.

    The reference positions (n_atoms, 3) nm are minimised under ``reference_potential`` in ``box`` (3, 3) nm,
    mapped to beads (``mapping``: an :class:`enpcg.mapping.Mapping`, a (n_beads, n_atoms) matrix, or None when
    the model acts on the same particles) and minimised again under ``model_potential`` at the same cell.
    Each tensor comes from :func:`elastic_tensor` when the potential has strain derivatives, else from
    :func:`elastic_tensor_fd` (``strain``). Returns (ElasticComparison, model ElasticResult, reference
    ElasticResult).
    """
    b = _box(box)

    def one(pot, x):
        res = minimize(pot, x, b, tolerance=tolerance)
        if hasattr(pot, "strain_derivatives"):
            return elastic_tensor(pot, res.positions, b, force_tolerance=max(1e-4, 10 * res.rms_force)), res.positions
        return elastic_tensor_fd(pot, res.positions, b, strain=strain, tolerance=tolerance), res.positions

    ref, x_ref = one(reference_potential, _positions(reference_positions, reference_potential.n_particles))
    if mapping is None:
        x_cg = x_ref
    elif hasattr(mapping, "map_positions"):
        x_cg = mapping.map_positions(x_ref, b)
    else:
        mat = np.asarray(mapping, dtype=np.float64)
        if mat.ndim != 2 or mat.shape[1] != len(x_ref):
            raise EnpcgError(f"mapping matrix must be (n_beads, {len(x_ref)}); received shape {mat.shape}")
        x_cg = mat @ x_ref
    model, _ = one(model_potential, x_cg)
    return compare_elastic(model, ref, names, unit), model, ref


def plot_elastic_comparison(tensors: dict, path=None, unit: str = "GPa", difference: bool = True):
    """Heat maps of Voigt (6, 6) matrices side by side (shared colour scale), plus the difference of the first
    two when ``difference``. tensors: {label: ElasticResult | (6, 6) | (3, 3, 3, 3)} in kJ/mol/nm^3; the plot
    is in ``unit``. Saves a PNG to ``path`` (atomically) when given; returns the matplotlib Figure."""
    # the Agg canvas is attached to the Figure directly: no pyplot, no change of the global backend
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..fileio import atomic_path

    if not tensors:
        raise EnpcgError("plot_elastic_comparison needs at least one tensor")
    fac = _unit_factor(unit)
    mats = {k: to_voigt(v) * fac for k, v in tensors.items()}
    labels = list(mats)
    panels = labels + (["difference"] if difference and len(labels) >= 2 else [])
    fig = Figure(figsize=(4.2 * len(panels), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)
    vmax = max(float(np.max(np.abs(m))) for m in mats.values())
    ticks = ["xx", "yy", "zz", "yz", "xz", "xy"]
    for ax, name in zip(axes[0], panels):
        if name == "difference":
            m = mats[labels[0]] - mats[labels[1]]
            lim = max(float(np.max(np.abs(m))), 1e-300)
            im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(f"{labels[0]} - {labels[1]}")
        else:
            m = mats[name]
            im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            ax.set_title(name)
        lim = float(np.max(np.abs(m)))
        for i in range(6):
            for j in range(6):
                v = m[i, j] if abs(m[i, j]) > 1e-9 * lim else 0.0  # round-off shows as 0
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if abs(v) > 0.6 * (vmax if name != "difference" else lim) else "black")
        ax.set_xticks(range(6), ticks)
        ax.set_yticks(range(6), ticks)
        fig.colorbar(im, ax=ax, shrink=0.8, label=unit)
    if path is not None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                fig.savefig(fh, format="png", dpi=120)
    return fig


# ---------------------------------------------------------------------------------------------- Kob-Andersen
def ka_energy_fn(types):
    """Kob-Andersen energy ``energy(x (N, 3) nm, box (3, 3) nm or None) -> () kJ/mol`` for
    :class:`TorchPotential`, the same function as :func:`systems.kob_andersen.create_system`'s OpenMM force:
    u_ab(r) = 4 eps_ab [(sig_ab/r)^12 - (sig_ab/r)^6] - u_ab(rc_ab) for r < rc_ab = 2.5 sig_ab (energy shifted,
    force not), constants from ``systems.kob_andersen`` (reduced units: sigma_AA = 1 nm, eps_AA = 1 kJ/mol).
    types : (N,) int, 0 = A, 1 = B. Boxes may be triclinic in any orientation (needed for strained cells);
    pairs come from :func:`enpcg.properties.crystals.lj_pair_images` at the largest cutoff (2.5 nm)."""
    from systems import kob_andersen as ka

    from .crystals import lj_pair_images

    t = torch.as_tensor(np.asarray(types), dtype=torch.long)
    if t.ndim != 1 or not bool(((t == 0) | (t == 1)).all()):
        raise EnpcgError("types must be a 1-D array of 0 (A) and 1 (B)")
    # per pair type s = t_i + t_j: 0 = AA, 1 = AB, 2 = BB
    coef_a = torch.tensor([ka._A[0, 0], ka._A[0, 1], ka._A[1, 1]], dtype=torch.float64)
    coef_b = torch.tensor([ka._B[0, 0], ka._B[0, 1], ka._B[1, 1]], dtype=torch.float64)
    rc2 = torch.tensor([ka.CUTOFF[0, 0], ka.CUTOFF[0, 1], ka.CUTOFF[1, 1]], dtype=torch.float64) ** 2
    shift = torch.tensor([ka.SHIFT[0, 0], ka.SHIFT[0, 1], ka.SHIFT[1, 1]], dtype=torch.float64)
    max_cut = float(ka.MAX_CUTOFF)

    def energy(x, box=None):
        if x.shape[0] != len(t):
            raise EnpcgError(f"positions hold {x.shape[0]} particles; the types array has {len(t)}")
        i, j, s = lj_pair_images(x, box, max_cut)
        d = x[j] - x[i]
        if box is not None:
            d = d + s.to(x.dtype) @ box.to(x.dtype)
        r2 = (d * d).sum(-1)
        k = t[i] + t[j]
        inside = r2 < rc2[k]
        ir6 = 1.0 / torch.where(inside, r2, rc2[k]) ** 3  # masked pairs get a harmless finite value
        u = ir6 * (coef_a[k] * ir6 - coef_b[k]) - shift[k]
        return torch.where(inside, u, torch.zeros_like(u)).sum()

    return energy


@dataclass
class GlassSample:
    """One Kob-Andersen inherent structure: ``positions`` (N, 3) nm (minimised), ``box`` (3, 3) nm, ``types``
    (N,) 0/1, ``energy_per_particle`` kJ/mol (= eps_AA), ``rms_force`` kJ/mol/nm, ``pressure`` (potential part,
    -tr(sigma)/3) kJ/mol/nm^3 (= reduced P*)."""

    positions: np.ndarray
    box: np.ndarray
    types: np.ndarray
    energy_per_particle: float
    rms_force: float
    pressure: float

    def potential(self) -> TorchPotential:
        """The :class:`TorchPotential` of :func:`ka_energy_fn` for this sample (masses 1 amu)."""
        return TorchPotential(ka_energy_fn(self.types), np.ones(len(self.types)))


def ka_glass_samples(n_samples: int, n_particles: int = 200, density: float = 1.2, *, t_liquid: float = 1.0,
                     t_low: float = 0.1, melt_steps: int = 600, equilibration_steps: int = 2000,
                     spacing_steps: int = 1000, quench_steps: int = 500, friction: float = 1.0, seed: int = 0,
                     platform: str = "CPU", threads: Optional[int] = 1, tolerance: float = 1e-6) -> list:
    """Independent Kob-Andersen glass samples (inherent structures) from one OpenMM liquid run.

    Protocol (reduced units: T* = k_B T / eps_AA, times in tau = 1 ps, time step 0.005 tau): a random lattice
    (``systems.kob_andersen.lattice_positions``) melts at T* = 2 for ``melt_steps``, equilibrates at
    ``t_liquid`` for ``equilibration_steps`` (Langevin, ``friction`` 1/ps); then for each sample the liquid
    runs ``spacing_steps`` more (decorrelation: tau_alpha ~ 1 tau at T* = 1), is quenched linearly to
    ``t_low`` over ``quench_steps`` (20 temperature stages) and minimised at the fixed cubic cell (OpenMM's
    LocalEnergyMinimizer on ``platform`` to 1e-3 kJ/mol/nm, then on the double-precision Reference platform
    to ``tolerance`` RMS force, kJ/mol/nm, or as far as double precision allows, ~7e-7); the
    liquid then resumes from its state before the quench. ``platform``/``threads``: OpenMM platform for the
    dynamics. Returns a list of :class:`GlassSample`.
    """
    import openmm as mm
    from openmm import unit

    from systems import kob_andersen as ka

    n_samples = check_int("n_samples", n_samples, 1)
    for name, v in (("melt_steps", melt_steps), ("equilibration_steps", equilibration_steps),
                    ("spacing_steps", spacing_steps), ("quench_steps", quench_steps)):
        check_int(name, v, 0)
    t_liquid = check_positive("t_liquid", t_liquid, "reduced temperature")
    t_low = check_positive("t_low", t_low, "reduced temperature")
    built = ka.create_system(n_particles, density)
    plat, props = ka._platform(platform, threads)
    integrator = mm.LangevinMiddleIntegrator(ka.temperature_kelvin(2.0), friction, ka.TIMESTEP)
    integrator.setRandomNumberSeed(int(seed) + 1)  # OpenMM treats seed 0 as "pick one at random"
    context = mm.Context(built.system, integrator, plat, props)
    context.setPositions(ka.lattice_positions(n_particles, density, seed=seed))
    context.setVelocitiesToTemperature(ka.temperature_kelvin(2.0), int(seed) + 1)
    integrator.step(melt_steps)
    integrator.setTemperature(ka.temperature_kelvin(t_liquid))
    integrator.step(equilibration_steps)
    L = built.box_length
    box = np.diag([L, L, L])
    pot = TorchPotential(ka_energy_fn(built.types), np.ones(n_particles))
    polish = OpenMMPotential(built.system, platform="Reference")
    samples = []
    stages = 20
    for _ in range(n_samples):
        integrator.setTemperature(ka.temperature_kelvin(t_liquid))
        integrator.step(spacing_steps)
        saved = context.getState(getPositions=True, getVelocities=True)
        for k in range(stages):  # linear ramp t_liquid -> t_low
            t = t_liquid + (t_low - t_liquid) * (k + 1) / stages
            integrator.setTemperature(ka.temperature_kelvin(t))
            integrator.step(quench_steps // stages)
        # OpenMM's L-BFGS on the dynamics platform brings the RMS force to ~1e-3 kJ/mol/nm in ~0.3 s; the
        # double-precision Reference platform then reaches ~7e-7 in ~0.5 s (scipy L-BFGS on the torch energy
        # needs ~2 s for the same; from the quenched liquid directly ~400 steps, 7 s; measured, N = 200)
        mm.LocalEnergyMinimizer.minimize(context, 1e-3, 0)
        x = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        res = minimize(polish, np.asarray(x), box, tolerance=tolerance, method="openmm")
        e, f = pot.energy_and_forces(res.positions, box)  # report in the torch energy the elastic code uses
        stress = pot.stress(res.positions, box)
        samples.append(GlassSample(positions=res.positions, box=box.copy(), types=np.asarray(built.types).copy(),
                                   energy_per_particle=e / n_particles, rms_force=_rms(f),
                                   pressure=-float(np.trace(stress)) / 3))
        context.setState(saved)
    return samples
