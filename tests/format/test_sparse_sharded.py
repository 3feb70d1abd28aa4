"""The sharded form of the sparse checkpoint (secateurs.format.sparse): shards, index, and what readers refuse."""

from __future__ import annotations

import json

import pytest
import torch

from secateurs.errors import SecateursError
from secateurs.format import sparse
from secateurs.format.sparse import INDEX_NAME, WEIGHTS_NAME, PackedTensor

W = torch.tensor([[0.0, 1.5, 0.0, 2.0], [0.0, 0.0, 0.0, -3.0]])
EXPECTED = {"a.weight": (2, 4), "norm.weight": (4,), "emb.weight": (3, 4), "head.weight": (3, 4)}


def two_shards(folder):
    """Two shards: a packed weight and a norm in the first, an embedding and its tied head in the second."""
    first, second = sparse.shard_name(1, 2), sparse.shard_name(2, 2)
    sparse.write_sparse(
        folder / first, {"a.weight": PackedTensor.from_weight(W), "norm.weight": torch.ones(4)}, {}, torch.float32
    )
    sparse.write_sparse(
        folder / second, {"emb.weight": torch.randn(3, 4)}, {"head.weight": "emb.weight"}, torch.float32
    )
    weight_map = {"a.weight": first, "norm.weight": first, "emb.weight": second, "head.weight": second}
    sparse.write_index(folder, weight_map, torch.float32)
    return first, second


def test_shards_and_index_read_as_one_checkpoint(tmp_path):
    first, second = two_shards(tmp_path)
    assert (first, second) == ("model-00001-of-00002.sparse.safetensors", "model-00002-of-00002.sparse.safetensors")
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"] == {"format": "secateurs-sparse", "format_version": "1", "dtype": "float32"}
    assert sparse.is_sparse_folder(tmp_path) and not (tmp_path / WEIGHTS_NAME).exists()
    weights = sparse.open_folder(tmp_path)
    assert weights.weight_map == index["weight_map"] and weights.aliases == {"head.weight": "emb.weight"}
    dense, packed = sparse.read_folder(weights, EXPECTED)
    assert set(dense) == {"norm.weight", "emb.weight"} and torch.equal(packed["a.weight"].to_dense(), W)
    with pytest.raises(SecateursError, match=r"lacks tensors the model needs: more\.weight$"):
        sparse.read_folder(weights, {**EXPECTED, "more.weight": (1,)})


def test_the_single_file_still_reads_and_wins(tmp_path):
    two_shards(tmp_path)
    sparse.write_sparse(tmp_path / WEIGHTS_NAME, {"norm.weight": torch.ones(4)}, {}, torch.float32)
    weights = sparse.open_folder(tmp_path)
    assert weights.weight_map is None and [p.name for p, _ in weights.files] == [WEIGHTS_NAME]
    assert set(sparse.read_folder(weights, {"norm.weight": (4,)})[0]) == {"norm.weight"}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: {**i, "metadata": {**i["metadata"], "format_version": "2"}}, "version '2'; this secateurs reads"),
        (lambda i: {**i, "metadata": {**i["metadata"], "format": "other"}}, "is not a secateurs-sparse index"),
        (
            lambda i: {**i, "metadata": {**i["metadata"], "dtype": "bfloat16"}},
            "holds a float32 model, .* says bfloat16",
        ),
        (lambda i: {"weight_map": i["weight_map"]}, "is not a sparse index"),
        (lambda i: {**i, "weight_map": {**i["weight_map"], "x": "../elsewhere"}}, "is not a sparse index"),
        (
            lambda i: {**i, "weight_map": {**i["weight_map"], "head.weight": sparse.shard_name(1, 2)}},
            "names tensor head.weight in model-00001",
        ),
        (
            lambda i: {**i, "weight_map": {k: v for k, v in i["weight_map"].items() if k != "head.weight"}},
            "holds head.weight, which .* does not name",
        ),
        (
            lambda i: {
                **i,
                "weight_map": {**i["weight_map"], "gone.weight": "model-00009-of-00009.sparse.safetensors"},
            },
            "shard .*00009.sparse.safetensors named by .* is missing",
        ),
    ],
)
def test_a_bad_index_is_refused_with_one_line(tmp_path, change, message):
    two_shards(tmp_path)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    (tmp_path / INDEX_NAME).write_text(json.dumps(change(index)))
    with pytest.raises(SecateursError, match=message) as info:
        sparse.open_folder(tmp_path)
    assert "\n" not in str(info.value)


def test_an_index_that_is_not_json_is_refused(tmp_path):
    two_shards(tmp_path)
    (tmp_path / INDEX_NAME).write_text("{")
    with pytest.raises(SecateursError, match=f"cannot read .*{INDEX_NAME}"):
        sparse.open_folder(tmp_path)
