"""A sparse-trained plain module saved in the compact format: bit-identical back, Linears on the CPU kernel, convs
packed as [out, in * kernel], the architecture rebuilt from a name (never code), bad folders one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import secateurs
from secateurs.errors import SecateursError
from secateurs.runtime.linear import SparseLinear
from secateurs.train import RigL, SparseTraining, Static
from secateurs.train.models import MLP, SmallCNN, from_architecture


def _trained(model, sparsity=0.8, method=None, steps=4, shape=(8, 64)):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparse = SparseTraining(
        model, opt, method or Static(), sparsity=sparsity, distribution="uniform", total_steps=steps
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(*shape, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sparse.step()
    return sparse.finalize().eval()


def test_mlp_round_trip_runs_on_the_kernel(tmp_path):
    torch.manual_seed(0)
    model = _trained(MLP(64, 10, hidden=(96, 48)), method=RigL(interval=2), steps=6)
    summary = secateurs.save_sparse(model, tmp_path / "mlp", progress=False)
    assert summary["packed_linears"] == 3 and summary["linear_ratio"] < 0.5
    record = json.loads((tmp_path / "mlp" / "module.json").read_text())
    assert record["architecture"] == {
        "name": "mlp",
        "arguments": {"in_features": 64, "classes": 10, "hidden": [96, 48]},
    }
    x = torch.randn(5, 64)
    plain, tokenizer = secateurs.load_pruned(tmp_path / "mlp")  # rebuilt from the record
    assert tokenizer is None and isinstance(plain, MLP)
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key  # bit-identical
    fast, _ = secateurs.load_sparse(tmp_path / "mlp")
    assert sum(isinstance(m, SparseLinear) for m in fast.modules()) == 3
    for refused, match in (({"head": "int8"}, "no LM head"), ({"activation_sparsity": 0.4}, "language model")):
        with pytest.raises(secateurs.SecateursError, match=match):
            secateurs.load_sparse(tmp_path / "mlp", **refused)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_cnn_convs_are_packed_with_their_shape(tmp_path):
    torch.manual_seed(0)
    model = _trained(SmallCNN(1, 10, width=8), sparsity=0.7, shape=(4, 1, 8, 8))
    model(torch.randn(4, 1, 8, 8))  # BatchNorm statistics are saved too
    summary = secateurs.save_sparse(model, tmp_path / "cnn", progress=False)
    assert summary["packed_linears"] >= 3
    back, _ = secateurs.load_pruned(tmp_path / "cnn")
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    conv = back.features.conv2.weight
    assert conv.shape == (8, 8, 3, 3) and float((conv == 0).float().mean()) > 0.5
    fast, _ = secateurs.load_sparse(tmp_path / "cnn")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_users_own_module_needs_its_class(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = _trained(Net(), sparsity=0.9, shape=(8, 32))
    secateurs.save_sparse(model, tmp_path / "net", progress=False)
    with pytest.raises(SecateursError, match="without an architecture record: pass model="):
        secateurs.load_sparse(tmp_path / "net")
    fast, _ = secateurs.load_sparse(tmp_path / "net", model=Net())
    x = torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(SecateursError, match=r"a.weight is shape \[64, 32\], the model expects \[64, 16\]"):
        wrong = Net()
        wrong.a = nn.Linear(16, 64)
        secateurs.load_pruned(tmp_path / "net", model=wrong)


def test_bad_architecture_records_are_refused():
    with pytest.raises(SecateursError, match="unknown architecture 'os.system'"):
        from_architecture({"name": "os.system", "arguments": {}})
    with pytest.raises(SecateursError, match="bad arguments"):
        from_architecture({"name": "mlp", "arguments": {"nonsense": 1}})
    with pytest.raises(SecateursError, match="malformed"):
        from_architecture(["mlp"])


def test_save_sparse_needs_a_folder():
    with pytest.raises(SecateursError, match="needs an output folder"):
        secateurs.save_sparse(MLP(4, 2))
