"""Read pruning results back and show them: tables, the essential-sparsity knee, plots, a static HTML page.

``summary`` holds the pure table logic, ``plots`` draws PNG figures with matplotlib (no pyplot state),
``html`` assembles one self-contained page, ``folder`` reads a pruned folder's report back
(``secateurs report DIR`` is :mod:`secateurs.cli.report`).
"""

from secateurs.analysis.summary import Knee, Results, essential_sparsity

__all__ = ["Knee", "Results", "essential_sparsity"]
