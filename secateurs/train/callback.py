"""Sparse training inside a ``transformers.Trainer``: a callback that drives :class:`SparseTraining`.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[SparseTrainingCallback(RigL(), sparsity=0.9)])

The masks are built when training begins (``total_steps`` defaults to the Trainer's ``max_steps``), gradients
of pruned weights are zeroed just before each optimizer step and the masks are updated just after it.
"""

from __future__ import annotations

from transformers import TrainerCallback

from secateurs.train.sparse import SparseTraining


class SparseTrainingCallback(TrainerCallback):
    """Keeps the Trainer's model sparse; the :class:`SparseTraining` it runs is ``.sparse`` once training begins."""

    def __init__(self, method=None, *, finalize: bool = True, **options) -> None:
        self.method, self.options, self.finalize = method, options, finalize
        self.sparse: SparseTraining | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.sparse is None:
            options = dict(self.options)
            options.setdefault("total_steps", state.max_steps or None)
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
            self.sparse = SparseTraining(model, inner, self.method, hook_optimizer=False, **options)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.sparse.mask_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sparse.step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.finalize and self.sparse is not None:
            self.sparse.finalize()
