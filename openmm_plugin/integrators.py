"""Langevin integrators for CG dynamics: one friction for all particles, or one per particle.

Units: K, 1/ps, ps, amu.

A CG model removes degrees of freedom and with them most of the friction a bead feels, so CG dynamics run
faster than the mapped atomistic dynamics. A Langevin friction per bead type puts some of it back
(:mod:`openmm_plugin.cg_dynamics` fits it on the mapped atomistic diffusion coefficient). OpenMM's
``LangevinMiddleIntegrator`` has a single friction; :func:`langevin_integrator` returns it when every particle
has the same friction, and otherwise a ``CustomIntegrator`` with the same splitting (the "LFMiddle" scheme
of OpenMM's ``LangevinMiddleIntegrator``: kick, half drift, Ornstein–Uhlenbeck step, half drift, with
constraints applied to velocities after the kick and to positions at the end) and a per-degree-of-freedom
friction. Massless particles (virtual sites) are left to OpenMM, which skips them in per-DOF updates and
places them after each step.

For a free particle of mass m with friction gamma the integrator samples the Ornstein–Uhlenbeck process
exactly, so its diffusion coefficient is k_B T / (m gamma) at any time step (tests/test_cg_dynamics.py checks
that known answer per particle).
"""
from __future__ import annotations

import numpy as np
import openmm
from openmm import unit

from enpcg.errors import EnpcgError

BOLTZMANN = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)  # kJ/mol/K


class PerParticleLangevinIntegrator(openmm.CustomIntegrator):
    """LangevinMiddle splitting with a friction per particle.

    Parameters
    ----------
    temperature : float, K
    frictions : sequence of float, 1/ps, one per particle (massless particles: any value, ignored)
    timestep : float, ps

    The frictions are stored in the per-DOF variable ``gamma`` and applied when the integrator is attached to
    a Context (:meth:`apply_frictions` does it; :func:`langevin_integrator` users call it once after creating
    the Context, ``openmm_plugin.simulate.run_simulation`` does it for them).
    """

    def __init__(self, temperature, frictions, timestep):
        super().__init__(float(timestep))
        self.frictions = np.asarray(frictions, dtype=float)
        self.addGlobalVariable("kT", BOLTZMANN * float(temperature))
        self.addPerDofVariable("gamma", 1.0)
        self.addPerDofVariable("x1", 0.0)
        self.addUpdateContextState()
        self.addComputePerDof("v", "v + dt*f/m")
        self.addConstrainVelocities()
        self.addComputePerDof("x", "x + 0.5*dt*v")
        # Exact Ornstein-Uhlenbeck step over dt: a = exp(-gamma dt), noise variance (1 - a^2) kT/m.
        self.addComputePerDof("v", "exp(-gamma*dt)*v + sqrt((1 - exp(-2*gamma*dt))*kT/m)*gaussian")
        self.addComputePerDof("x", "x + 0.5*dt*v")
        self.addComputePerDof("x1", "x")
        self.addConstrainPositions()
        self.addComputePerDof("v", "v + (x - x1)/dt")

    def setTemperature(self, temperature):  # mirrors LangevinMiddleIntegrator.setTemperature (K)
        value = temperature.value_in_unit(unit.kelvin) if unit.is_quantity(temperature) else float(temperature)
        self.setGlobalVariableByName("kT", BOLTZMANN * value)

    def apply_frictions(self):
        """Copy the per-particle frictions (1/ps) into the per-DOF variable (needs an attached Context)."""
        self.setPerDofVariableByName("gamma", [openmm.Vec3(g, g, g) for g in self.frictions])


def langevin_integrator(temperature, friction, timestep, *, n_particles=None):
    """A Langevin integrator with one friction (float, 1/ps) or one per particle (array, 1/ps).

    Parameters
    ----------
    temperature : float, K
    friction : float or sequence of float, 1/ps; a sequence has one value per particle
    timestep : float, ps
    n_particles : int, the System's particle count (checked against a per-particle friction)

    Returns
    -------
    openmm.LangevinMiddleIntegrator when all frictions are equal, else a :class:`PerParticleLangevinIntegrator`
    (call its ``apply_frictions()`` once a Context exists).
    """
    gam = np.atleast_1d(np.asarray(friction, dtype=float))
    if gam.ndim != 1 or gam.size == 0:
        raise EnpcgError(f"friction must be a number or one value per particle (1/ps); you supplied {friction!r}")
    if n_particles is not None and gam.size not in (1, n_particles):
        raise EnpcgError(f"friction has {gam.size} values but the System has {n_particles} particles. Fix: give "
                         "one friction (1/ps) or one per particle")
    if not np.all(np.isfinite(gam)) or np.any(gam <= 0):
        raise EnpcgError(f"frictions must be finite and > 0 (1/ps); the smallest is {gam.min()!r}")
    if np.all(gam == gam[0]):
        return openmm.LangevinMiddleIntegrator(float(temperature) * unit.kelvin, float(gam[0]) / unit.picosecond,
                                               float(timestep) * unit.picosecond)
    return PerParticleLangevinIntegrator(temperature, gam, timestep)


def attach(integrator):
    """Finish setting up an integrator after its Context exists (per-particle frictions); returns it."""
    if isinstance(integrator, PerParticleLangevinIntegrator):
        integrator.apply_frictions()
    return integrator
