"""A real transformers.Trainer run with the sparse-training callback: masks kept, counts exact, updates made."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from secateurs.train import RigL
from secateurs.train import masks as M
from secateurs.train.callback import SparseTrainingCallback


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(96, 16, generator=g), torch.randint(0, 4, (96,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def train(model, callback, tmp_path, **arguments) -> None:
    """A Trainer run on the CPU with nothing saved or logged."""
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, **arguments
    )
    Trainer(model=model, args=args, train_dataset=Data(), callbacks=[callback]).train()


def test_trainer_keeps_the_model_sparse(tmp_path):
    torch.manual_seed(0)
    model = Classifier()
    callback = SparseTrainingCallback(RigL(interval=3), sparsity=0.8, distribution="uniform")
    train(model, callback, tmp_path, max_steps=12, per_device_train_batch_size=8, learning_rate=1e-2, weight_decay=0.1)
    sparse = callback.sparse
    assert sparse.total_steps == 12 and sparse.step_count == 12
    assert len(sparse.history) == 2  # steps 3 and 6, before T_end = 9
    assert any(r["layers"]["fc1"]["dropped"] > 0 for r in sparse.history)
    for name in ("fc1", "fc2"):
        W = model.get_submodule(name).weight
        assert int((W == 0).sum()) >= W.numel() - M.kept_count(W.numel(), 0.2)


def test_static_mask_stays_exact_without_finalize(tmp_path):
    torch.manual_seed(1)
    model = Classifier()
    callback = SparseTrainingCallback("static", sparsity=0.75, distribution="uniform", total_steps=5, finalize=False)
    train(model, callback, tmp_path, max_steps=5, per_device_train_batch_size=16, learning_rate=5e-2)
    sparse = callback.sparse
    assert sparse.optimizer is not None and sparse.total_steps == 5 and sparse.step_count == 5
    for name, keep in sparse.keep_masks().items():
        W = model.get_submodule(name).weight
        assert int(keep.sum()) == M.kept_count(W.numel(), 0.25)  # the count is exact, not approximate
        assert (W[~keep] == 0).all() and (W[keep] != 0).all()  # pruned stay zero, the rest trained
        assert hasattr(model.get_submodule(name), "sparse_keep")  # not finalized
