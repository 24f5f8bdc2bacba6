"""Oriented beads in OpenMM: rigid massive sites, a virtual-site centre, a TorchForce, a torque reporter.

Representation (well posed: only massive particles carry mass and inertia):

* Each oriented bead of mass M is k rigid massive sites of mass M/k placed so that their second moment
  sum_s m_s p_s p_s^T equals the bead's mean body-frame second moment C (``CGTopology.body_moments``, amu nm^2),
  so the sites have the bead's mass, centre and inertia tensor: k = 2 for director beads (sites at
  R +- sqrt(I_perp/M) u, I_perp = (tr C + C_xx)/2), k = 3 for planar beads (C of rank 2), k = 4 (a
  tetrahedron) otherwise. The sites are held rigid by distance constraints between all of them.
* The bead centre is a massless virtual site at the sites' centre of mass (written to trajectories).
* Sites have no interactions of their own: the TorchForce reads the sites, rebuilds each bead's centre R and
  body axes Q, evaluates the CG model E(R, Q) and returns site forces by autograd. The bead force is
  sum_s f_s and the bead torque sum_s (r_s - R) x f_s: for a rigid body that is exactly -dE/dtheta.

Units: nm, ps, kJ/mol, amu; torques kJ/mol.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch  # before openmm (openmm-torch plugin loading)
import openmm
from openmm import app, unit
from torch import Tensor

from enpcg.errors import EnpcgError
from enpcg.geometry import minimum_image
from enpcg.oriented.base import OrientedModel

from ._imports import import_openmmtorch

_TETRAHEDRON = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float64)   # sum v v^T = 4 I
_TRIANGLE = np.array([[0.0, 1.0], [-np.sqrt(3) / 2, -0.5], [np.sqrt(3) / 2, -0.5]])            # sum v v^T = 1.5 I
PLANAR_TOLERANCE = 1e-6  # smallest/largest second moment below which a bead is treated as planar


@dataclass
class RigidBodyLayout:
    """Massive sites of one oriented bead type.

    kind : "director" | "planar" | "general"; sites : (k, 3) nm body-frame offsets from the centre;
    masses : (k,) amu; basis : (3, 3) proper rotation whose columns are the body-frame principal axes used
    by the sites; duals : (k, 2) weights with sum_s (r_s - R) duals[s, m] = Q basis[:, m] for a rigid bead.
    """

    kind: str
    sites: np.ndarray
    masses: np.ndarray
    basis: np.ndarray
    duals: np.ndarray

    @property
    def n_sites(self) -> int:
        return len(self.sites)


def rigid_body_layout(orientation: str, mass: float, moments) -> RigidBodyLayout:
    """Sites with mass ``mass`` (amu) and body-frame second moment ``moments`` (3, 3) amu nm^2."""
    c = np.asarray(moments, dtype=np.float64)
    if c.shape != (3, 3) or not np.all(np.isfinite(c)) or mass <= 0:
        raise EnpcgError(f"rigid body layout needs a positive mass (amu) and a finite (3, 3) second moment "
                         f"(amu nm^2); received mass {mass}, moments shape {c.shape}")
    c = 0.5 * (c + c.T)
    if orientation == "director":
        i_perp = 0.5 * (np.trace(c) + c[0, 0])
        h = np.sqrt(i_perp / mass)
        sites = np.array([[-h, 0, 0], [h, 0, 0]])
        return RigidBodyLayout("director", sites, np.full(2, mass / 2), np.eye(3), np.zeros((2, 2)))
    if orientation != "frame":
        raise EnpcgError(f"bead orientation {orientation!r} has no rigid-body layout; expected director or frame")
    w, v = np.linalg.eigh(c)                     # ascending
    w, v = w[::-1], v[:, ::-1]                   # largest first
    if np.linalg.det(v) < 0:
        v[:, 2] *= -1
    if w[2] < PLANAR_TOLERANCE * w[0]:
        scale = np.sqrt(2.0 * np.clip(w[:2], 0, None) / mass)
        local = _TRIANGLE * scale                                       # (3, 2) in the principal plane
        sites = local @ v[:, :2].T
        duals = _TRIANGLE / (1.5 * scale)
        return RigidBodyLayout("planar", sites, np.full(3, mass / 3), v, duals)
    scale = np.sqrt(w / mass)
    sites = (_TETRAHEDRON * scale) @ v.T
    duals = _TETRAHEDRON[:, :2] / (4.0 * scale[:2])
    return RigidBodyLayout("general", sites, np.full(4, mass / 4), v, duals)


def _complete_frame(u: Tensor) -> Tensor:
    """Frame (n, 3, 3) with e_x = u (n, 3) unit and a deterministic e_y, e_z (as enpcg.oriented.director_frame)."""
    helper = torch.nn.functional.one_hot(torch.argmin(torch.abs(u), dim=-1), 3).to(u.dtype)
    ey = helper - (helper * u).sum(-1, keepdim=True) * u
    ey = ey / torch.linalg.norm(ey, dim=-1, keepdim=True)
    return torch.stack([u, ey, torch.linalg.cross(u, ey, dim=-1)], dim=-1)


class SiteDecoder(torch.nn.Module):
    """Bead centres (n, 3) nm and axes (n, 3, 3) from site positions: ``forward(positions (N, 3), box)``.

    TorchScript. Sites of a bead are unwrapped by minimum image relative to its first site, so beads that
    straddle the box boundary decode correctly.
    """

    def __init__(self, site_index, duals, basis, director: bool):
        super().__init__()
        self.register_buffer("site_index", torch.as_tensor(site_index, dtype=torch.long))   # (n, k)
        self.register_buffer("duals", torch.as_tensor(duals, dtype=torch.float64))          # (n, k, 2)
        self.register_buffer("basis", torch.as_tensor(basis, dtype=torch.float64))          # (n, 3, 3)
        self.director = bool(director)

    def forward(self, positions: Tensor, box: Optional[Tensor]):
        n, k = self.site_index.shape[0], self.site_index.shape[1]
        s = positions[self.site_index.reshape(-1)].reshape(n, k, 3)
        d = s - s[:, :1]
        if box is not None:
            d = minimum_image(d.reshape(1, n * k, 3), box.unsqueeze(0)).reshape(n, k, 3)
        centre_rel = d.mean(dim=1)                              # equal site masses: centre of mass
        centre = s[:, 0] + centre_rel
        rel = d - centre_rel.unsqueeze(1)
        if self.director:
            u = rel[:, 1] - rel[:, 0]
            u = u / torch.linalg.norm(u, dim=-1, keepdim=True)
            return centre, _complete_frame(u)
        w = self.duals.to(positions.dtype)
        a = torch.einsum("nks,nkm->nsm", rel, w)                # (n, 3, 2): lab images of the basis axes
        a0 = a[..., 0] / torch.linalg.norm(a[..., 0], dim=-1, keepdim=True)
        a1 = a[..., 1] - (a[..., 1] * a0).sum(-1, keepdim=True) * a0
        a1 = a1 / torch.linalg.norm(a1, dim=-1, keepdim=True)
        lab = torch.stack([a0, a1, torch.linalg.cross(a0, a1, dim=-1)], dim=-1)    # Q basis
        return centre, torch.matmul(lab, self.basis.to(positions.dtype).transpose(1, 2))


class _PeriodicSiteEnergy(torch.nn.Module):
    """TorchForce module: site positions (N, 3) nm, box (3, 3) nm -> energy () kJ/mol (float64)."""

    def __init__(self, decoder: SiteDecoder, model: OrientedModel, dtype: torch.dtype):
        super().__init__()
        self.decoder = decoder
        self.model = model
        self.dtype = dtype

    def forward(self, positions: Tensor, box: Tensor) -> Tensor:
        b = box.to(self.dtype)
        centre, axes = self.decoder(positions.to(self.dtype), b)
        return self.model(centre, axes, b).to(torch.float64)


class _NonPeriodicSiteEnergy(torch.nn.Module):
    def __init__(self, decoder: SiteDecoder, model: OrientedModel, dtype: torch.dtype):
        super().__init__()
        self.decoder = decoder
        self.model = model
        self.dtype = dtype

    def forward(self, positions: Tensor) -> Tensor:
        centre, axes = self.decoder(positions.to(self.dtype), None)
        return self.model(centre, axes, None).to(torch.float64)


@dataclass
class OrientedSystem:
    """An OpenMM System of oriented beads and the index maps between beads and particles.

    system : openmm.System; topology : openmm.app.Topology (per bead a centre "C" then sites "S1".."Sk");
    positions : (N, 3) nm particle positions; box : (3, 3) nm or None; centre_index : (n,) particle of each
    bead centre (a virtual site); site_index : (n, k) its massive sites; layouts : bead type -> layout;
    cg_topology : the model's CGTopology; force_group : group of the model's force.
    """

    system: openmm.System
    topology: app.Topology
    positions: np.ndarray
    box: Optional[np.ndarray]
    centre_index: np.ndarray
    site_index: np.ndarray
    layouts: dict
    cg_topology: object
    force_group: int = 0
    decoder: SiteDecoder = field(default=None, repr=False)

    def beads(self, positions, box=None):
        """Bead centres (n, 3) nm and axes (n, 3, 3) from particle positions (N, 3) nm (float64)."""
        x = torch.as_tensor(np.asarray(positions), dtype=torch.float64)
        b = None if box is None else torch.as_tensor(np.asarray(box), dtype=torch.float64)
        with torch.no_grad():
            c, q = self.decoder(x, b)
        return c.numpy(), q.numpy()

    def bead_forces_torques(self, positions, forces, box=None):
        """Bead forces sum_s f_s (n, 3) kJ/mol/nm and torques sum_s (r_s - R) x f_s (n, 3) kJ/mol."""
        x = np.asarray(positions, dtype=np.float64)
        f = np.asarray(forces, dtype=np.float64)
        s = x[self.site_index]
        d = s - s[:, :1]
        if box is not None:
            from enpcg.mapping import minimum_image as mi_np
            d = mi_np(d.reshape(1, -1, 3), np.asarray(box)[None]).reshape(d.shape)
        arm = d - d.mean(axis=1, keepdims=True)
        fs = f[self.site_index]
        return fs.sum(axis=1), np.cross(arm, fs).sum(axis=1)

    def rotational_kinetic_energy(self, velocities) -> np.ndarray:
        """K_rot (n,) kJ/mol of each bead: 1/2 sum_s m_s |v_s - V|^2 with V the bead's centre-of-mass velocity."""
        v = np.asarray(velocities, dtype=np.float64)[self.site_index]
        m = self.site_masses
        vc = (m[..., None] * v).sum(1) / m.sum(1)[:, None]
        return 0.5 * (m * ((v - vc[:, None]) ** 2).sum(-1)).sum(-1)

    @property
    def site_masses(self) -> np.ndarray:
        """(n, k) amu, the masses of each bead's sites."""
        if getattr(self, "_site_masses", None) is None:
            self._site_masses = np.array([[self.system.getParticleMass(int(p)).value_in_unit(unit.dalton)
                                           for p in row] for row in self.site_index])
        return self._site_masses

    @property
    def rotational_dof(self) -> int:
        """Rotational degrees of freedom per bead: 2 for director beads, 3 for frame beads."""
        return 2 if self.site_index.shape[1] == 2 else 3


def _layouts(topo) -> dict:
    out = {}
    for t in topo.type_names():
        beads = [i for i, bt in enumerate(topo.bead_types) if bt == t]
        kinds = {topo.orientations[i] for i in beads}
        if kinds == {"none"} or len(kinds) != 1:
            raise EnpcgError(f"bead type {t!r}: every bead of an oriented system must be oriented, and all beads "
                             f"of a type alike; found {sorted(kinds)}")
        if t not in (topo.body_moments or {}):
            raise EnpcgError(f"bead type {t!r} has no body_moments in the CG topology; map the data with "
                             "enpcg.mapping.map_trajectory (it records them) or set topology.body_moments")
        out[t] = rigid_body_layout(kinds.pop(), float(topo.masses[beads[0]]), topo.body_moments[t])
    if len({l.n_sites for l in out.values()}) != 1:
        raise EnpcgError(f"all bead types must use the same number of massive sites; layouts: "
                         f"{ {t: l.kind for t, l in out.items()} }")
    return out


def create_oriented_system(model: OrientedModel, positions, axes, box=None, *, backend: str = "torch",
                           dtype=None, force_group: int = 0, remove_cm_motion: bool = True) -> OrientedSystem:
    """An OpenMM System that simulates ``model``'s oriented beads (see module docstring).

    positions : (n, 3) nm bead centres; axes : (n, 3, 3) body axes (columns); box : (3, 3) nm rows or None
    (non-periodic). backend : "torch" (TorchForce, the product's contract) or "python" (PythonForce).
    dtype : precision of the model in the force ("float32"/"float64"/None = the model's own).
    """
    if not isinstance(model, OrientedModel):
        raise EnpcgError(f"create_oriented_system needs an oriented model; received {type(model).__name__} "
                         "(point-bead models use openmm_plugin.CGPotential)")
    topo = model.topology
    layouts = _layouts(topo)
    pos = np.asarray(positions, dtype=np.float64).reshape(topo.n_beads, 3)
    q = np.asarray(axes, dtype=np.float64).reshape(topo.n_beads, 3, 3)
    system = openmm.System()
    omm_top = app.Topology()
    chains = {}
    centre_index, site_index, site_pos, duals, basis = [], [], [], [], []
    residue = None
    for i in range(topo.n_beads):
        lay = layouts[topo.bead_types[i]]
        mol = int(topo.molecule_index[i])
        if mol not in chains:
            chains[mol] = omm_top.addChain()
            residue = omm_top.addResidue(topo.residue_names[mol] if mol < len(topo.residue_names) else "CG",
                                         chains[mol])
        c = system.addParticle(0.0)
        omm_top.addAtom("C", None, residue)
        centre_index.append(c)
        row = []
        for s in range(lay.n_sites):
            row.append(system.addParticle(float(lay.masses[s])))
            omm_top.addAtom(f"S{s + 1}", None, residue)
        site_index.append(row)
        site_pos.append(pos[i] + lay.sites @ q[i].T)
        duals.append(lay.duals)
        basis.append(lay.basis)
        for a in range(lay.n_sites):
            for b in range(a + 1, lay.n_sites):
                system.addConstraint(row[a], row[b], float(np.linalg.norm(lay.sites[a] - lay.sites[b])))
        if lay.n_sites == 2:
            vs = openmm.TwoParticleAverageSite(row[0], row[1], 0.5, 0.5)
        elif lay.n_sites == 3:
            vs = openmm.ThreeParticleAverageSite(row[0], row[1], row[2], 1 / 3, 1 / 3, 1 / 3)
        else:
            vs = openmm.LocalCoordinatesSite(row, [0.25] * 4, [-1.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 1.0, 0.0],
                                             openmm.Vec3(0, 0, 0))
        system.setVirtualSite(c, vs)
    site_index = np.array(site_index, dtype=np.int64)
    n_part = system.getNumParticles()
    all_pos = np.zeros((n_part, 3))
    all_pos[np.array(centre_index)] = pos
    all_pos[site_index.reshape(-1)] = np.concatenate(site_pos)
    periodic = box is not None
    if periodic:
        b = np.asarray(box, dtype=np.float64)
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) * unit.nanometer for row in b])
        omm_top.setPeriodicBoxVectors(b * unit.nanometer)
    decoder = SiteDecoder(site_index, np.array(duals), np.array(basis), director=site_index.shape[1] == 2)
    force = _site_force(model, decoder, backend=backend, periodic=periodic, dtype=dtype)
    force.setForceGroup(int(force_group))
    system.addForce(force)
    if remove_cm_motion:
        system.addForce(openmm.CMMotionRemover())
    return OrientedSystem(system, omm_top, all_pos, None if box is None else np.asarray(box, dtype=np.float64),
                          np.array(centre_index), site_index, layouts, topo, int(force_group), decoder)


class SiteModelComputation:
    """PythonForce computation of an oriented model on sites (picklable: description + weights)."""

    def __init__(self, model: OrientedModel, decoder: SiteDecoder, periodic: bool, dtype: torch.dtype):
        self.module = (_PeriodicSiteEnergy if periodic else _NonPeriodicSiteEnergy)(decoder, model, dtype)
        self.periodic = periodic

    def __call__(self, state):
        pos = torch.as_tensor(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                              dtype=torch.float64).requires_grad_(True)
        if self.periodic:
            box = torch.as_tensor(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer),
                                  dtype=torch.float64)
            e = self.module(pos, box)
        else:
            e = self.module(pos)
        (g,) = torch.autograd.grad(e, pos)
        return float(e), (-g).numpy()


def _site_force(model, decoder, *, backend, periodic, dtype):
    from .export import _model_copy, _resolve_dtype

    dt = _resolve_dtype(model, dtype)
    m = _model_copy(model, dt)
    dec = copy.deepcopy(decoder)
    if backend == "torch":
        openmmtorch = import_openmmtorch()
        module = (_PeriodicSiteEnergy if periodic else _NonPeriodicSiteEnergy)(dec, m, dt)
        try:
            scripted = torch.jit.script(module)
        except Exception as e:
            raise EnpcgError(f"oriented model kind {model.kind!r} could not be compiled with torch.jit.script "
                             f"({e}); use backend='python'") from None
        force = openmmtorch.TorchForce(scripted)
        force.setUsesPeriodicBoundaryConditions(bool(periodic))
        force.setOutputsForces(False)
    elif backend == "python":
        if not hasattr(openmm, "PythonForce"):
            raise EnpcgError("backend='python' needs openmm.PythonForce (OpenMM >= 8.6); use backend='torch'")
        force = openmm.PythonForce(SiteModelComputation(m, dec, periodic, dt))
        force.setUsesPeriodicBoundaryConditions(bool(periodic))
    else:
        raise EnpcgError(f"unknown backend {backend!r} for oriented beads; available: torch, python")
    force.setName(f"enpcg {model.kind} oriented ({backend})")
    return force


class OrientedForceReporter:
    """OpenMM reporter writing per-bead centres, forces, torques and body axes to an H5MD file.

    Each report asks OpenMM once for positions and the forces of the model's force group (one model
    evaluation per report) and converts them: F_I = sum_s f_s (kJ/mol/nm), tau_I = sum_s (r_s - R_I) x f_s
    (kJ/mol). The file is a CG H5MD file that :func:`enpcg.oriented.read_oriented` reads.
    """

    def __init__(self, path, reportInterval: int, oriented: OrientedSystem, *, resume: bool = False):
        from enpcg.h5md import H5MDWriter
        from enpcg.mapping import ORIENTED_VECTORS

        self.interval = int(reportInterval)
        if self.interval < 1:
            raise EnpcgError(f"reportInterval must be >= 1 step; received {reportInterval}")
        self.oriented = oriented
        topo = oriented.cg_topology
        self.writer = H5MDWriter(path, topo.n_beads, masses=topo.masses, species=list(topo.bead_types),
                                 topology_json=json.dumps(topo.to_dict()), extra_vectors=ORIENTED_VECTORS,
                                 resume=resume, metadata={"source": "enpcg OrientedForceReporter"})

    def describeNextReport(self, simulation):
        steps = self.interval - simulation.currentStep % self.interval
        # (steps, positions, velocities, forces, energy, wrap): forces come from our own group query below
        return {"steps": steps, "periodic": False, "include": []}

    def report(self, simulation, state):
        st = simulation.context.getState(getPositions=True, getForces=True, getEnergy=True,
                                         groups={self.oriented.force_group})
        x = st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        f = st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        box = st.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer) \
            if self.oriented.box is not None else None
        centre, axes = self.oriented.beads(x, box)
        fb, tb = self.oriented.bead_forces_torques(x, f, box)
        e = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        self.writer.append(centre, fb, box if box is not None else np.zeros((3, 3)),
                           st.getTime().value_in_unit(unit.picosecond), simulation.currentStep,
                           potential_energy=e, torque=tb, body_x=axes[..., 0], body_y=axes[..., 1],
                           body_z=axes[..., 2])

    def close(self):
        self.writer.close()

    def __del__(self):
        try:
            self.writer.close()
        except Exception:
            pass
