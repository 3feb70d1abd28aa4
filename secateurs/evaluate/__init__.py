"""What pruning cost: perplexity with the papers' protocol."""

from secateurs.evaluate.perplexity import PerplexityResult, perplexity, wants_bos

__all__ = ["PerplexityResult", "perplexity", "wants_bos"]
