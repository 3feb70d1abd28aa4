"""Pruning methods: pure functions from a weight (and calibration statistics) to a mask and new weight."""

from secateurs.methods.magnitude import magnitude_mask
from secateurs.methods.sparsegpt import sparsegpt_prune
from secateurs.methods.wanda import wanda_mask, wanda_scores

METHODS = ("magnitude", "wanda", "sparsegpt")

__all__ = ["METHODS", "magnitude_mask", "sparsegpt_prune", "wanda_mask", "wanda_scores"]
