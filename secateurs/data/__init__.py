"""Text sources and seeded token windows for calibration and evaluation.

:mod:`~secateurs.data.sources` resolves a source name or path (bundled corpus, local file, hub dataset) and reads
its text; :mod:`~secateurs.data.windows` tokenises it into calibration windows or the evaluation token stream.
"""

from secateurs.data.bundled import BUNDLED
from secateurs.data.sources import COMPRESSED_SUFFIXES, HUB, TEXT_SUFFIXES, describe_source, read_text, source_kind
from secateurs.data.windows import C4_EVAL_DOCUMENTS, calibration_windows, evaluation_tokens

__all__ = [
    "BUNDLED",
    "C4_EVAL_DOCUMENTS",
    "COMPRESSED_SUFFIXES",
    "HUB",
    "TEXT_SUFFIXES",
    "calibration_windows",
    "describe_source",
    "evaluation_tokens",
    "read_text",
    "source_kind",
]
