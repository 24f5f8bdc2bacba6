"""enpcg: multiscale coarse-graining for OpenMM.

Units everywhere are OpenMM's: nm, ps, kJ/mol, amu, K; forces in kJ/mol/nm; angles in radians. Box
vectors are the rows of a (3, 3) array. See docs/conventions.md.
"""
__version__ = "0.1.0"
