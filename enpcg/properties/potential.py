"""One interface to the energy, forces, Hessian and stress of any potential: a torch model or an OpenMM System.

Units: positions and box in nm (box vectors are the rows of a (3, 3) array), energy kJ/mol, forces
kJ/mol/nm, Hessian kJ/mol/nm^2, stress kJ/mol/nm^3 (1 kJ/mol/nm^3 = 16.6054 bar), strain dimensionless,
masses amu. Arrays are numpy float64 in and out.

* :class:`TorchPotential` wraps any function ``energy(positions (n, 3), box (3, 3) or None) -> ()`` written in
  torch — every :class:`enpcg.models.CGModel` (CG spline, priors, neural; the equivariant atomistic model)
  through :meth:`TorchPotential.from_model`. Derivatives come from autograd in float64: exact to round-off.
* :class:`OpenMMPotential` wraps an ``openmm.System`` through a Context (Reference platform by default).
  Energies and forces are OpenMM's; the Hessian and the strain derivatives are central finite differences
  (stated step), since OpenMM has no second derivatives.

Strain convention: a homogeneous deformation x -> x (I + eps) applied to positions and box rows alike
(``eps`` symmetric, small). The stress is sigma = (1/V) dE/d eps (virial stress of the potential, no kinetic
part; positive = tensile for this sign convention of E, i.e. sigma = -P I for a fluid at pressure P from
the potential alone).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ..errors import EnpcgError

KJ_MOL_NM3_IN_BAR = 16.6054  # 1 kJ/mol/nm^3 in bar
KJ_MOL_NM3_IN_GPA = 1.66054e-3  # 1 kJ/mol/nm^3 in GPa


def _positions(positions, n: Optional[int] = None) -> np.ndarray:
    x = np.asarray(positions, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3:
        raise EnpcgError(f"positions must have shape (n, 3) in nm; received shape {x.shape}")
    if n is not None and x.shape[0] != n:
        raise EnpcgError(f"positions hold {x.shape[0]} particles; this potential has {n}")
    if not np.all(np.isfinite(x)):
        raise EnpcgError("positions contain NaN or infinite values")
    return x


def _box(box) -> Optional[np.ndarray]:
    if box is None:
        return None
    b = np.asarray(box, dtype=np.float64)
    if b.shape == (3,):
        b = np.diag(b)
    if b.shape != (3, 3):
        raise EnpcgError(f"box must be (3, 3) nm (rows a, b, c) or three edge lengths; received shape {b.shape}")
    return b


class Potential:
    """Base class: energy (kJ/mol) of positions (n, 3) nm in a box (3, 3) nm rows or None.

    Attributes: ``masses`` (n,) amu; ``n_particles``.
    """

    masses: np.ndarray

    @property
    def n_particles(self) -> int:
        return len(self.masses)

    def energy(self, positions, box=None) -> float:
        raise NotImplementedError

    def forces(self, positions, box=None) -> np.ndarray:
        """(n, 3) kJ/mol/nm."""
        return self.energy_and_forces(positions, box)[1]

    def energy_and_forces(self, positions, box=None):
        raise NotImplementedError

    def hessian(self, positions, box=None) -> np.ndarray:
        """(3n, 3n) kJ/mol/nm^2, d2E / dx_(3i+a) dx_(3j+b), symmetrised."""
        raise NotImplementedError

    def strain_energy(self, positions, box, strain) -> float:
        """Energy (kJ/mol) after the homogeneous deformation x -> x (I + strain), box rows alike."""
        f = np.eye(3) + np.asarray(strain, dtype=np.float64)
        return self.energy(_positions(positions) @ f, _box(box) @ f)

    def stress(self, positions, box) -> np.ndarray:
        """(3, 3) kJ/mol/nm^3: sigma = (1/V) dE/d strain at zero strain (potential part only)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- torch
class TorchPotential(Potential):
    """A torch energy function with autograd derivatives (float64).

    energy_fn : callable (positions (n, 3) tensor nm, box (3, 3) tensor nm or None) -> scalar tensor kJ/mol
    masses : (n,) amu
    """

    def __init__(self, energy_fn: Callable, masses):
        self.energy_fn = energy_fn
        self.masses = np.asarray(masses, dtype=np.float64).reshape(-1)

    @classmethod
    def from_model(cls, model, masses=None) -> "TorchPotential":
        """A CGModel (any kind, e.g. spline, neural, equivariant) in float64; masses default to its topology's."""
        import copy

        m = copy.deepcopy(model).to(torch.float64)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        if masses is None:
            masses = model.topology.masses
        return cls(lambda x, b: m(x, b), masses)

    def _tensors(self, positions, box):
        x = torch.tensor(_positions(positions, self.n_particles), dtype=torch.float64)
        b = _box(box)
        return x, None if b is None else torch.tensor(b, dtype=torch.float64)

    def energy(self, positions, box=None) -> float:
        x, b = self._tensors(positions, box)
        with torch.no_grad():
            return float(self.energy_fn(x, b))

    def energy_and_forces(self, positions, box=None):
        x, b = self._tensors(positions, box)
        x.requires_grad_(True)
        e = self.energy_fn(x, b)
        (g,) = torch.autograd.grad(e, x)
        return float(e.detach()), (-g).numpy()

    def hessian(self, positions, box=None) -> np.ndarray:
        x, b = self._tensors(positions, box)
        n3 = x.numel()
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(self.energy_fn(x, b), x, create_graph=True)
        g = g.reshape(-1)
        rows = []
        for k in range(n3):
            (h,) = torch.autograd.grad(g[k], x, retain_graph=k < n3 - 1, allow_unused=True)
            rows.append(torch.zeros(n3, dtype=torch.float64) if h is None else h.reshape(-1))
        hess = torch.stack(rows).numpy()
        return 0.5 * (hess + hess.T)

    def _strained(self, x, b, eps):
        f = torch.eye(3, dtype=torch.float64) + 0.5 * (eps + eps.T)
        return self.energy_fn(x @ f, b @ f)

    def stress(self, positions, box) -> np.ndarray:
        x, b = self._tensors(positions, box)
        if b is None:
            raise EnpcgError("stress needs a periodic box (3, 3) nm")
        eps = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(self._strained(x, b, eps), eps)
        return g.numpy() / abs(float(torch.linalg.det(b)))

    def strain_derivatives(self, positions, box):
        """Second derivatives at zero strain, for elastic constants:

        ``d2E/d eps_ab d eps_cd`` (3, 3, 3, 3) kJ/mol (the affine, Born term times V) and the mixed
        ``d2E/d eps_ab d x_i`` (3, 3, 3n) kJ/mol/nm (the forces a strain induces, for the non-affine term).
        """
        x, b = self._tensors(positions, box)
        if b is None:
            raise EnpcgError("strain derivatives need a periodic box (3, 3) nm")
        eps = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
        x.requires_grad_(True)
        e = self._strained(x, b, eps)
        (ge,) = torch.autograd.grad(e, eps, create_graph=True)
        born = np.zeros((3, 3, 3, 3))
        mixed = np.zeros((3, 3, x.numel()))
        for a in range(3):
            for c in range(3):
                d_eps, d_x = torch.autograd.grad(ge[a, c], (eps, x), retain_graph=True, allow_unused=True)
                if d_eps is not None:
                    born[a, c] = d_eps.numpy()
                if d_x is not None:
                    mixed[a, c] = d_x.reshape(-1).numpy()
        return born, mixed


# ---------------------------------------------------------------------------------------------- OpenMM
class OpenMMPotential(Potential):
    """An ``openmm.System`` evaluated through a Context; finite-difference Hessian and stress.

    system : openmm.System; platform : OpenMM platform name ("Reference" by default: double precision);
    step : float, nm (Hessian) and strain (stress) step of the central differences.
    """

    def __init__(self, system, platform: str = "Reference", step: float = 1e-5, properties: Optional[dict] = None):
        import openmm

        self.system = system
        self.masses = np.array([system.getParticleMass(i)._value for i in range(system.getNumParticles())])
        self.step = float(step)
        self.context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                                      openmm.Platform.getPlatformByName(platform), properties or {})
        self.periodic = system.usesPeriodicBoundaryConditions()

    def _set(self, positions, box):
        import openmm

        x = _positions(positions, self.n_particles)
        b = _box(box)
        if b is not None:
            self.context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in b])
            # OpenMM's Reference neighbour search (ReferenceNeighborList.cpp, VoxelHash::getVoxelIndex) wraps
            # each particle along c, then b, then a and bins it; a particle within round-off of a cell face
            # can land in voxel index n (outside 0..n-1) and then all its pairs are silently missing. Seen:
            # -5e-21 fractional after a rotation (8 % of E lost), and a 256-atom LJ fcc crystal in a cell
            # sheared by 1e-3 (1 % of E lost, which broke finite-difference stresses), whether the positions
            # were wrapped into the parallelepiped or into OpenMM's brick. Fix: translate the configuration
            # (rigidly, which leaves the energy of a periodic, translation-invariant System unchanged) so that
            # each face of the brick [0, a_x) x [0, b_y) x [0, c_z) sits in the middle of the widest empty
            # slab of particle coordinates, then wrap the way OpenMM does: no particle is near a face.
            # (Forces that are not translation invariant, e.g. absolute position restraints, are not
            # supported in periodic Systems here, as wrapping alone would already change them.)
            x = x.copy()
            for k in (2, 1, 0):
                w = b[k, k]
                u = np.sort(np.mod(x[:, k], w))
                gaps = np.diff(np.append(u, u[0] + w))
                g = int(np.argmax(gaps))
                x[:, k] -= u[g] + 0.5 * gaps[g]
                x -= np.outer(np.floor(x[:, k] / w), b[k])
        elif self.periodic:
            raise EnpcgError("this System is periodic: pass its box (3, 3) nm")
        self.context.setPositions(x)

    def energy_and_forces(self, positions, box=None):
        from openmm import unit

        self._set(positions, box)
        s = self.context.getState(getEnergy=True, getForces=True)
        f = s.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        return s.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole), np.asarray(f)

    def energy(self, positions, box=None) -> float:
        return self.energy_and_forces(positions, box)[0]

    def hessian(self, positions, box=None) -> np.ndarray:
        x = _positions(positions, self.n_particles)
        n3 = x.size
        hess = np.zeros((n3, n3))
        for k in range(n3):
            d = np.zeros(n3)
            d[k] = self.step
            fp = self.forces(x + d.reshape(-1, 3), box).reshape(-1)
            fm = self.forces(x - d.reshape(-1, 3), box).reshape(-1)
            hess[k] = -(fp - fm) / (2 * self.step)
        return 0.5 * (hess + hess.T)

    def strain_energy(self, positions, box, strain) -> float:
        """As :meth:`Potential.strain_energy`; the deformed cell is rotated back into OpenMM's reduced form (a
        along x, b in the xy plane), which leaves the energy unchanged."""
        f = np.eye(3) + np.asarray(strain, dtype=np.float64)
        x = _positions(positions) @ f
        b = _box(box) @ f
        q, r = np.linalg.qr(b.T)  # b = r^T q^T, so b q = r^T is lower triangular
        q = q * np.sign(np.diag(r))  # positive diagonal
        return self.energy(x @ q, np.tril(b @ q))  # tril: exact zeros where round-off leaves 1e-17

    def stress(self, positions, box) -> np.ndarray:
        b = _box(box)
        if b is None:
            raise EnpcgError("stress needs a periodic box (3, 3) nm")
        h = self.step
        sigma = np.zeros((3, 3))
        for a in range(3):
            for c in range(a, 3):
                eps = np.zeros((3, 3))
                eps[a, c] = eps[c, a] = 0.5 * h if a != c else h
                de = self.strain_energy(positions, b, eps) - self.strain_energy(positions, b, -eps)
                # a symmetric strain with eps_ac = eps_ca = h/2 moves E by (sigma_ac + sigma_ca) V h/2
                sigma[a, c] = sigma[c, a] = de / (2 * h) / abs(np.linalg.det(b))
        return sigma
