"""Old home of :func:`save_pruned` and the atomic output folder, kept so existing imports still work.

Saving and loading pruned models is :mod:`secateurs.checkpoint`; atomic folders are :mod:`secateurs.format.folder`.
"""

from secateurs.checkpoint import save_pruned, save_sparse
from secateurs.format.folder import REPORT_NAME, AtomicFolder, check_output

__all__ = ["REPORT_NAME", "AtomicFolder", "check_output", "save_pruned", "save_sparse"]
