"""Training-free refinements applied after a method's mask."""

from secateurs.refine.dsnot import DSnoTOptions, DSnoTResult, dsnot, refined_weight

__all__ = ["DSnoTOptions", "DSnoTResult", "dsnot", "refined_weight"]
