"""Crystals for property tests: fcc lattices, a Lennard-Jones energy in torch and in OpenMM, and distorted
fcc environments (vacancy, edge and screw dislocations, a tilt grain boundary).

Units: nm, kJ/mol, amu. Boxes and cells are (3, 3) arrays whose **rows** are the lattice vectors.

API
---
* :func:`fcc_lattice` ``(a, n=(nx, ny, nz)) -> (positions (N, 3), box (3, 3))``: conventional cubic cells.
* :func:`fcc_primitive_cell` ``(a) -> (positions (1, 3), cell (3, 3))`` and :data:`FCC_SPECIAL_POINTS`
  (fractional coordinates of the primitive reciprocal lattice).
* :func:`lj_energy_fn` ``(sigma, epsilon, cutoff, shift=True)``: an ``energy(x, box)`` for
  :class:`~enpcg.properties.potential.TorchPotential` (dense pairs, any periodic box or none).
* :func:`openmm_lj_system` ``(n_atoms, box, sigma, epsilon, cutoff, mass, shift=True)``: the same energy as an
  ``openmm.System`` (CustomNonbondedForce).
* :func:`lj_fcc_lattice_constant`: zero-pressure (static) lattice constant of the truncated LJ fcc crystal.
* distorted environments, all non-periodic clusters except the vacancy: :func:`fcc_vacancy`,
  :func:`fcc_edge_dislocation`, :func:`fcc_screw_dislocation`, :func:`fcc_grain_boundary`.
"""
from __future__ import annotations

import itertools
from typing import Optional

import numpy as np
import torch

from ..errors import EnpcgError, check_positive
from ..neighbors import perpendicular_widths

#: Conventional fcc basis in units of the lattice constant.
FCC_BASIS = np.array([[0.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])

#: High-symmetry points of the fcc Brillouin zone in fractional coordinates of the reciprocal lattice of
#: :func:`fcc_primitive_cell` (b1 = 2 pi/a (-1, 1, 1), b2 = 2 pi/a (1, -1, 1), b3 = 2 pi/a (1, 1, -1)).
#: X = 2 pi/a (1, 0, 0), L = pi/a (1, 1, 1), K = 2 pi/a (3/4, 3/4, 0), W = 2 pi/a (1, 1/2, 0).
FCC_SPECIAL_POINTS = {
    "G": (0.0, 0.0, 0.0),
    "X": (0.0, 0.5, 0.5),
    "L": (0.5, 0.5, 0.5),
    "K": (0.375, 0.375, 0.75),
    "W": (0.25, 0.5, 0.75),
}


def _reps(n) -> tuple:
    if np.isscalar(n):
        n = (n, n, n)
    n = tuple(n)
    if len(n) != 3 or any(isinstance(k, bool) or int(k) != k or int(k) < 1 for k in n):
        raise EnpcgError(f"repetitions n must be three integers >= 1 (or one); received {n!r}. Fix: e.g. n=(4, 4, 4)")
    return tuple(int(k) for k in n)


def fcc_lattice(a: float, n=(1, 1, 1)):
    """A perfect fcc crystal of ``nx * ny * nz`` conventional cubic cells.

    a : lattice constant (nm); n : repetitions along x, y, z (or one int for all three).
    Returns positions (4 nx ny nz, 3) nm (cell by cell in C order over (ix, iy, iz), the 4 basis atoms of
    :data:`FCC_BASIS` within a cell) and the orthorhombic box (3, 3) nm = diag(nx a, ny a, nz a).
    """
    a = check_positive("lattice constant a", a, "nm", 0.53)
    reps = _reps(n)
    cells = np.array(list(itertools.product(*[range(k) for k in reps])), dtype=np.float64)
    pos = (cells[:, None, :] + FCC_BASIS[None, :, :]).reshape(-1, 3) * a
    return pos, np.diag(np.array(reps, dtype=np.float64) * a)


def fcc_primitive_cell(a: float):
    """The one-atom primitive fcc cell: positions (1, 3) nm = 0 and cell rows (0, a/2, a/2), (a/2, 0, a/2),
    (a/2, a/2, 0) nm. Its reciprocal-lattice special points are :data:`FCC_SPECIAL_POINTS`."""
    a = check_positive("lattice constant a", a, "nm", 0.53)
    return np.zeros((1, 3)), 0.5 * a * (np.ones((3, 3)) - np.eye(3))


def supercell(unit_cell_positions, cell, n):
    """Replicate a unit cell ``n = (n1, n2, n3)`` times along its lattice vectors.

    unit_cell_positions (m, 3) nm; cell (3, 3) nm rows. Returns positions (m n1 n2 n3, 3) nm, ordered cell by
    cell (C order over (i1, i2, i3)) with the m basis atoms inside each cell, the supercell box
    (3, 3) nm (rows n_k cell_k) and the integer cell index (m n1 n2 n3, 3) of every atom.
    """
    x = np.asarray(unit_cell_positions, dtype=np.float64).reshape(-1, 3)
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape != (3, 3) or abs(np.linalg.det(cell)) < 1e-12:
        raise EnpcgError(f"cell must be a non-singular (3, 3) array of lattice vectors (rows, nm); received {cell!r}")
    reps = _reps(n)
    cells = np.array(list(itertools.product(*[range(k) for k in reps])), dtype=np.int64)
    pos = (cells @ cell)[:, None, :] + x[None, :, :]
    return pos.reshape(-1, 3), cell * np.array(reps, dtype=np.float64)[:, None], np.repeat(cells, len(x), axis=0)


# ---------------------------------------------------------------------------------------------- LJ
_SHIFTS27 = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)), dtype=torch.float64)
_CHUNK = 200_000  # pairs per chunk of the image search: bounds memory at ~27 * 3 * 8 B * _CHUNK = 130 MB


def lj_pair_images(x, box, cutoff: float):
    """Every pair (i < j) and lattice image within ``cutoff``, found without gradients.

    x (n, 3) nm tensor; box (3, 3) nm tensor (rows, any orientation, triclinic allowed) or None. Returns
    ``i, j`` (P,) long and ``shift`` (P, 3) float integer lattice coefficients such that the pair vector is
    ``x[j] - x[i] + shift @ box``. With a box, all images within the cutoff are listed: for
    cutoff <= half the smallest perpendicular width that is the minimum image; up to the full width it is
    the exact lattice sum (OpenMM would refuse such a box).
    """
    n = x.shape[0]
    with torch.no_grad():
        xd = x.detach()
        iu, ju = torch.triu_indices(n, n, 1)
        if box is None:
            d = xd[ju] - xd[iu]
            keep = (d * d).sum(-1) < cutoff * cutoff
            return iu[keep], ju[keep], torch.zeros(int(keep.sum()), 3, dtype=xd.dtype)
        bd = box.detach().to(xd.dtype)
        widths = perpendicular_widths(bd.cpu().numpy())
        if cutoff >= widths.min():
            raise EnpcgError(f"LJ cutoff {cutoff} nm must be below the smallest perpendicular box width "
                             f"{widths.min():.4f} nm (one image per direction). Fix: use a larger supercell")
        inv = torch.linalg.inv(bd)
        # For an axis-aligned orthorhombic box and cutoff <= half its width, rounding the fractional
        # displacement is the exact minimum image; otherwise (triclinic or rotated box, or long cutoff) the 27
        # neighbouring images of the rounded vector hold every image within the cutoff.
        ortho = bool(torch.count_nonzero(bd - torch.diag(torch.diagonal(bd))) == 0) and cutoff <= 0.5 * widths.min()
        shifts = torch.zeros(1, 3, dtype=xd.dtype) if ortho else _SHIFTS27.to(xd.dtype)
        out_i, out_j, out_s = [], [], []
        for start in range(0, len(iu), _CHUNK):
            i, j = iu[start:start + _CHUNK], ju[start:start + _CHUNK]
            d = xd[j] - xd[i]
            base = -torch.round(d @ inv)
            s = base[:, None, :] + shifts[None, :, :]  # (P, S, 3) lattice coefficients
            dd = d[:, None, :] + s @ bd
            p, k = torch.nonzero((dd * dd).sum(-1) < cutoff * cutoff, as_tuple=True)
            out_i.append(i[p])
            out_j.append(j[p])
            out_s.append(s[p, k])
        return torch.cat(out_i), torch.cat(out_j), torch.cat(out_s)


def lj_energy_fn(sigma: float, epsilon: float, cutoff: float, shift: bool = True):
    """A Lennard-Jones energy ``energy(x (n, 3) nm, box (3, 3) nm or None) -> () kJ/mol`` for
    :class:`~enpcg.properties.potential.TorchPotential`.

    E = sum_{pairs, r < cutoff} 4 epsilon ((sigma/r)^12 - (sigma/r)^6) - E_shift, with E_shift the pair energy
    at the cutoff when ``shift`` (continuous energy; forces still jump at the cutoff) and 0 otherwise.
    sigma, cutoff in nm; epsilon in kJ/mol. Pairs come from :func:`lj_pair_images` (dense, O(n^2) search
    without gradients; derivatives flow through the positions and the box, so stresses are exact): fine up
    to a few thousand atoms. Periodic boxes may be triclinic and in any orientation (rotated boxes included).
    """
    sigma = check_positive("sigma", sigma, "nm", 0.34)
    epsilon = check_positive("epsilon", epsilon, "kJ/mol", 0.996)
    cutoff = check_positive("cutoff", cutoff, "nm", 0.85)
    e_cut = 4.0 * epsilon * ((sigma / cutoff) ** 12 - (sigma / cutoff) ** 6) if shift else 0.0

    def energy(x, box=None):
        i, j, s = lj_pair_images(x, box, cutoff)
        d = x[j] - x[i]
        if box is not None:
            d = d + s.to(x.dtype) @ box.to(x.dtype)
        inv6 = (sigma * sigma / (d * d).sum(-1)) ** 3
        return (4.0 * epsilon * (inv6 * inv6 - inv6) - e_cut).sum()

    energy.sigma, energy.epsilon, energy.cutoff, energy.shift = sigma, epsilon, cutoff, shift
    return energy


def openmm_lj_system(n_atoms: int, box, sigma: float, epsilon: float, cutoff: float, mass: float,
                     shift: bool = True):
    """The energy of :func:`lj_energy_fn` as an ``openmm.System`` of ``n_atoms`` particles of ``mass`` amu.

    A CustomNonbondedForce ``4 epsilon ((sigma/r)^12 - (sigma/r)^6) - E_shift`` with a hard cutoff (no switch,
    no long-range correction). box (3, 3) nm in OpenMM's reduced form (periodic, CutoffPeriodic; cutoff must be
    <= half the smallest width) or None (CutoffNonPeriodic).
    """
    import openmm

    sigma = check_positive("sigma", sigma, "nm", 0.34)
    epsilon = check_positive("epsilon", epsilon, "kJ/mol", 0.996)
    cutoff = check_positive("cutoff", cutoff, "nm", 0.85)
    mass = check_positive("mass", mass, "amu", 39.948)
    e_cut = 4.0 * epsilon * ((sigma / cutoff) ** 12 - (sigma / cutoff) ** 6) if shift else 0.0
    system = openmm.System()
    for _ in range(int(n_atoms)):
        system.addParticle(mass)
    f = openmm.CustomNonbondedForce("4*eps*((sig/r)^12-(sig/r)^6)-ecut")
    f.addGlobalParameter("eps", epsilon)
    f.addGlobalParameter("sig", sigma)
    f.addGlobalParameter("ecut", e_cut)
    f.setCutoffDistance(cutoff)
    f.setUseSwitchingFunction(False)
    f.setUseLongRangeCorrection(False)
    for _ in range(int(n_atoms)):
        f.addParticle([])
    if box is None:
        f.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffNonPeriodic)
    else:
        b = np.asarray(box, dtype=np.float64)
        if b.shape == (3,):
            b = np.diag(b)
        reduced = (b.shape == (3, 3) and b[0, 1] == b[0, 2] == b[1, 2] == 0 and np.all(np.diag(b) > 0)
                   and abs(b[1, 0]) <= b[0, 0] / 2 + 1e-12 and abs(b[2, 0]) <= b[0, 0] / 2 + 1e-12
                   and abs(b[2, 1]) <= b[1, 1] / 2 + 1e-12)
        if not reduced:
            raise EnpcgError(f"box must be (3, 3) nm in OpenMM's reduced form (a along x, b in the xy plane, "
                             f"|b_x|, |c_x| <= a_x/2, |c_y| <= b_y/2); received {b.tolist()}")
        if cutoff > 0.5 * np.min(np.diag(b)):
            raise EnpcgError(f"cutoff {cutoff} nm exceeds half the smallest box width {np.min(np.diag(b)):.4f} nm; "
                             "OpenMM needs the minimum image. Fix: a larger box (more cells)")
        f.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in b])
    system.addForce(f)
    return system


def lj_fcc_lattice_constant(sigma: float, epsilon: float, cutoff: float) -> float:
    """Zero-pressure static lattice constant (nm) of the fcc crystal of the truncated LJ pair potential.

    The virial of the lattice sum, sum_shells n_s r_s phi'(r_s) over shells r_s < cutoff, vanishes (a root in
    [1.4, 1.7] sigma); the energy shift does not change it. For cutoff = 2.5 sigma: a = 1.5496... sigma.
    """
    from scipy.optimize import brentq

    sigma = check_positive("sigma", sigma, "nm", 0.34)
    check_positive("epsilon", epsilon, "kJ/mol", 0.996)
    cutoff = check_positive("cutoff", cutoff, "nm", 0.85)
    # neighbour vectors of the unit fcc lattice (a = 1) out to well past any cutoff / a considered
    m = int(np.ceil(cutoff / (1.4 * sigma))) + 1
    g = np.array(list(itertools.product(range(-m, m + 1), repeat=3)), dtype=np.float64)
    r_unit = np.linalg.norm((g[:, None, :] + FCC_BASIS[None]).reshape(-1, 3), axis=1)
    r_unit = r_unit[r_unit > 0]

    def virial(a):
        r = a * r_unit
        r = r[r < cutoff]
        sr6 = (sigma / r) ** 6
        return float(np.sum(-24.0 * epsilon * (2 * sr6 * sr6 - sr6)))  # r phi'(r)

    return float(brentq(virial, 1.4 * sigma, 1.7 * sigma, xtol=1e-15, rtol=1e-15))


# ---------------------------------------------------------------------------------------------- defects
def fcc_vacancy(a: float, n=(3, 3, 3), index: int = 0):
    """A periodic fcc crystal (:func:`fcc_lattice`) with atom ``index`` removed.

    Returns positions (4 nx ny nz - 1, 3) nm and the box (3, 3) nm.
    """
    pos, box = fcc_lattice(a, n)
    if not 0 <= int(index) < len(pos):
        raise EnpcgError(f"vacancy index {index} out of range: the crystal has {len(pos)} atoms")
    return np.delete(pos, int(index), axis=0), box


def _oriented_cluster(a: float, axes, radius: float, origin) -> np.ndarray:
    """fcc sites in the frame whose x, y, z axes are the rows of ``axes`` (lattice directions, normalised here),
    inside a sphere of ``radius`` nm about ``origin`` (given in the rotated frame, nm); positions relative to
    the origin."""
    rot = np.asarray(axes, dtype=np.float64)
    rot = rot / np.linalg.norm(rot, axis=1, keepdims=True)
    m = int(np.ceil((radius + np.linalg.norm(origin)) / a)) + 1
    cells = np.array(list(itertools.product(range(-m, m + 1), repeat=3)), dtype=np.float64)
    pts = ((cells[:, None, :] + FCC_BASIS[None]).reshape(-1, 3) * a) @ rot.T - np.asarray(origin, dtype=np.float64)
    return pts[np.linalg.norm(pts, axis=1) < radius]


def _check_cluster(a, radius, nu=None):
    a = check_positive("lattice constant a", a, "nm", 0.53)
    radius = check_positive("radius", radius, "nm", 1.2)
    if radius < a:
        raise EnpcgError(f"radius {radius} nm is smaller than the lattice constant {a} nm: the cluster would hold "
                         "only a few atoms. Fix: radius >= 2 a")
    if nu is not None and not -1.0 < nu < 0.5:
        raise EnpcgError(f"Poisson ratio nu must lie in (-1, 0.5); received {nu}")
    return a, radius


def fcc_edge_dislocation(a: float, radius: float = 1.2, nu: float = 0.3):
    """A spherical fcc cluster (non-periodic) holding an edge dislocation, displaced by the isotropic-elasticity
    field (Hirth & Lothe, eq. 3-45).

    Frame: x = [1 -1 0] (Burgers vector b = a/2 [1 -1 0], |b| = a/sqrt(2)), y = [1 1 1] (slip-plane normal),
    z = [1 1 -2] (dislocation line). The line sits between two (111) planes and off the atom columns, so no
    atom meets the singular core. u_x = b/(2 pi) [theta + x y / (2 (1-nu) r^2)],
    u_y = -b/(2 pi) [(1-2nu)/(4(1-nu)) ln(r^2/b^2) + (x^2 - y^2)/(4 (1-nu) r^2)].
    Returns positions (N, 3) nm (centred on the line) and None (no box).
    """
    a, radius = _check_cluster(a, radius, nu)
    b = a / np.sqrt(2.0)
    d111 = a / np.sqrt(3.0)
    pts = _oriented_cluster(a, [[1, -1, 0], [1, 1, 1], [1, 1, -2]], radius, (0.25 * b, 0.5 * d111, 0.0))
    x, y = pts[:, 0], pts[:, 1]
    r2 = x * x + y * y
    ux = b / (2 * np.pi) * (np.arctan2(y, x) + x * y / (2 * (1 - nu) * r2))
    # ln(r^2 / b^2) rather than ln r^2: the constant only translates the crystal rigidly, and keeps units out
    uy = -b / (2 * np.pi) * ((1 - 2 * nu) / (4 * (1 - nu)) * np.log(r2 / b ** 2)
                             + (x * x - y * y) / (4 * (1 - nu) * r2))
    return pts + np.stack([ux, uy, np.zeros_like(ux)], axis=1), None


def fcc_screw_dislocation(a: float, radius: float = 1.2):
    """A spherical fcc cluster (non-periodic) holding a screw dislocation along z = [1 -1 0] with Burgers vector
    b = a/2 [1 -1 0]: u_z = b theta / (2 pi) (isotropic elasticity). Frame: y = [1 1 1], x = y x z = [1 1 -2].
    The line is placed off the atom columns. Returns positions (N, 3) nm and None (no box)."""
    a, radius = _check_cluster(a, radius)
    b = a / np.sqrt(2.0)
    d111 = a / np.sqrt(3.0)
    pts = _oriented_cluster(a, [[1, 1, -2], [1, 1, 1], [1, -1, 0]], radius, (0.2 * a, 0.5 * d111, 0.0))
    uz = b / (2 * np.pi) * np.arctan2(pts[:, 1], pts[:, 0])
    return pts + np.stack([np.zeros_like(uz), np.zeros_like(uz), uz], axis=1), None


def fcc_grain_boundary(a: float, angle_deg: float = 36.87, radius: float = 1.2, min_distance: Optional[float] = None):
    """A spherical fcc cluster (non-periodic) of two grains tilted by +-angle/2 about z = [001], meeting at the
    plane x = 0 (a symmetric tilt boundary; 36.87 deg is the Sigma 5 angle). Atoms of the right grain closer than
    ``min_distance`` (default 0.7 of the nearest-neighbour distance a/sqrt(2)) to an atom of the left grain are
    removed. Returns positions (N, 3) nm and None (no box)."""
    from scipy.spatial import cKDTree

    a, radius = _check_cluster(a, radius)
    if not 0.0 < float(angle_deg) < 90.0:
        raise EnpcgError(f"tilt angle must lie in (0, 90) degrees; received {angle_deg}")
    dmin = 0.7 * a / np.sqrt(2.0) if min_distance is None else check_positive("min_distance", min_distance, "nm")
    half = np.radians(float(angle_deg)) / 2

    def grain(sign):
        c, s = np.cos(sign * half), np.sin(sign * half)
        # rows are the grain's crystal axes as seen in the lab frame after a rotation by sign*half about z
        return _oriented_cluster(a, [[c, -s, 0], [s, c, 0], [0, 0, 1]], radius, (0.1 * a, 0.13 * a, 0.07 * a))

    left = grain(+1)
    left = left[left[:, 0] < 0]
    right = grain(-1)
    right = right[right[:, 0] >= 0]
    dist, _ = cKDTree(left).query(right)
    return np.concatenate([left, right[dist >= dmin]]), None


def random_rotation(rng, proper: bool = True) -> np.ndarray:
    """A Haar-random orthogonal (3, 3) matrix: det +1 when ``proper``, det -1 (a rotation times inversion)
    otherwise. ``rng`` is a numpy Generator."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) > 0) != proper:
        q = -q
    return q
