"""Physical properties of any potential (torch model or OpenMM System): forces, Hessians, normal modes,
phonons, elastic tensors, surface energies, equivariance audits, inverse design.

Units: nm, kJ/mol, amu, ps; frequencies in 1/ps (angular: rad/ps) unless a function says otherwise.
"""
from .potential import KJ_MOL_NM3_IN_BAR, KJ_MOL_NM3_IN_GPA, OpenMMPotential, Potential, TorchPotential

__all__ = ["KJ_MOL_NM3_IN_BAR", "KJ_MOL_NM3_IN_GPA", "OpenMMPotential", "Potential", "TorchPotential"]

# normal modes, phonons, equivariance audits, crystal builders (issue 8)
from .crystals import (FCC_SPECIAL_POINTS, fcc_edge_dislocation, fcc_grain_boundary, fcc_lattice,  # noqa: E402
                       fcc_primitive_cell, fcc_screw_dislocation, fcc_vacancy, lj_energy_fn,
                       lj_fcc_lattice_constant, openmm_lj_system, supercell)
from .equivariance import (EquivarianceAudit, audit_equivariance, audit_structures,  # noqa: E402
                           distorted_fcc_structures)
from .normal_modes import (CM_PER_RAD_PS, NormalModes, density_of_states, mass_weighted_hessian,  # noqa: E402
                           modes_from_hessian, normal_modes, plot_mode_spectrum, rigid_body_basis)
from .phonons import (ForceConstants, PhononDispersion, dynamical_matrix, force_constants,  # noqa: E402
                      phonon_dispersion, phonon_frequencies, phonon_mesh, plot_dispersion)

__all__ += ["FCC_SPECIAL_POINTS", "fcc_edge_dislocation", "fcc_grain_boundary", "fcc_lattice", "fcc_primitive_cell",
            "fcc_screw_dislocation", "fcc_vacancy", "lj_energy_fn", "lj_fcc_lattice_constant", "openmm_lj_system",
            "supercell", "EquivarianceAudit", "audit_equivariance", "audit_structures", "distorted_fcc_structures",
            "CM_PER_RAD_PS", "NormalModes", "density_of_states", "mass_weighted_hessian", "modes_from_hessian",
            "normal_modes", "plot_mode_spectrum", "rigid_body_basis", "ForceConstants", "PhononDispersion",
            "dynamical_matrix", "force_constants", "phonon_dispersion", "phonon_frequencies", "phonon_mesh",
            "plot_dispersion"]

# elastic tensors (non-affine term, finite-difference stress-strain route, Kob-Andersen glass) and surface
# energies (issue 8)
from .elastic import (VOIGT_PAIRS, ElasticComparison, ElasticResult, GlassSample, MinimizeResult,  # noqa: E402
                      birch_from_energy, compare_elastic, compare_model_elastic, elastic_moduli, elastic_tensor,
                      elastic_tensor_fd, energy_from_birch, from_voigt, isotropy, isotropy_statistics,
                      ka_energy_fn, ka_glass_samples, minimize, nonaffine_term, plot_elastic_comparison,
                      symmetry_report, to_voigt, young_modulus)
from .surfaces import (KJ_MOL_NM2_IN_J_M2, OrientedCell, Slab, SurfaceEnergy, zone_angle,  # noqa: E402
                       fcc_slab, oriented_fcc_cell, plot_surface_energies, surface_energies, surface_energy)

__all__ += ["VOIGT_PAIRS", "ElasticComparison", "ElasticResult", "GlassSample", "MinimizeResult",
            "birch_from_energy", "compare_elastic", "compare_model_elastic", "elastic_moduli", "elastic_tensor",
            "elastic_tensor_fd", "energy_from_birch", "from_voigt", "isotropy", "isotropy_statistics",
            "ka_energy_fn", "ka_glass_samples", "minimize", "nonaffine_term", "plot_elastic_comparison",
            "symmetry_report", "to_voigt", "young_modulus", "KJ_MOL_NM2_IN_J_M2", "OrientedCell", "Slab",
            "SurfaceEnergy", "zone_angle", "fcc_slab", "oriented_fcc_cell", "plot_surface_energies",
            "surface_energies", "surface_energy"]

# inverse design with rigid-body motions projected out (issue 8)
from .design import (DesignResult, ProjectedGradient, centre_of_mass, design, internal_hessian_eigenvalues,  # noqa: E402
                     lowest_frequency, plot_design_history, potential_energy, projected_gradient,
                     radius_of_gyration, remove_rigid_motion, step_momenta)

__all__ += ["DesignResult", "ProjectedGradient", "centre_of_mass", "design", "internal_hessian_eigenvalues",
            "lowest_frequency", "plot_design_history", "potential_energy", "projected_gradient",
            "radius_of_gyration", "remove_rigid_motion", "step_momenta"]
