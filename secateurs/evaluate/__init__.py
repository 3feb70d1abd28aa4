"""What pruning cost: perplexity with the papers' protocol, zero-shot accuracy through lm-eval."""

from secateurs.evaluate.perplexity import PerplexityResult, perplexity, wants_bos
from secateurs.evaluate.zeroshot import ZeroShotResult, zero_shot

__all__ = ["PerplexityResult", "ZeroShotResult", "perplexity", "wants_bos", "zero_shot"]
