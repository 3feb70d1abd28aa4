"""GPTQ rounding of pruned weights to int8 codes: the maths on small cases, then through save, load and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_main, save_tiny_model_dir, tiny_model

import secateurs
from secateurs.errors import SecateursError
from secateurs.format.bits import quantize_rows, row_scales, stored_bits
from secateurs.format.sparse import PackedTensor
from secateurs.oneshot.quantize import gptq_codes, int8_codes, reconstruction_error


def _pruned(rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W[torch.rand(rows, cols, generator=g) < sparsity] = 0
    return W


def _correlated_gram(cols: int, tokens: int = 400, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, 4, generator=g) @ torch.randn(4, cols, generator=g) + 0.3 * torch.randn(
        tokens, cols, generator=g
    )
    return (X.T @ X).double()


def _reference(W: torch.Tensor, stored: torch.Tensor, H: torch.Tensor, damp: float) -> torch.Tensor:
    """GPTQ by its definition (OBS, one column at a time, float64): round column j, then move the columns not yet
    rounded by the optimal compensation, err / [H_F⁻¹]_jj · [H_F⁻¹]_j,F with H_F⁻¹ the inverse of H restricted to
    the columns F still free (recomputed from scratch each step, no Cholesky tricks)."""
    W = W.double().clone()
    H = H.double().clone()
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    scales = row_scales(W, stored).double()
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        free = list(range(j, W.shape[1]))
        Hinv = torch.linalg.inv(H[free][:, free])
        q = torch.round(W[:, j] / scales).clamp(-127, 127)
        q = torch.where(stored[:, j] & (q == 0), torch.where(W[:, j] < 0, -1.0, 1.0).double(), q)
        q = torch.where(stored[:, j], q, torch.zeros_like(q))
        Q[:, j] = q
        err = (W[:, j] - q * scales) / Hinv[0, 0]
        W[:, j + 1 :] -= err[:, None] * Hinv[0, 1:][None, :]
    return Q


def test_with_uncorrelated_inputs_gptq_is_rounding_to_nearest():
    W = _pruned(12, 40, 0.6)
    stored = stored_bits(W)
    H = torch.diag(torch.rand(40, dtype=torch.float64) + 0.5)  # a diagonal H: nothing to spread the error through
    q, scales = gptq_codes(W, stored, H)
    q_rtn, scales_rtn = quantize_rows(W, stored)
    assert torch.equal(scales, scales_rtn)
    assert torch.equal(q, q_rtn)


@pytest.mark.parametrize("block", [1, 5, 128])
def test_codes_equal_the_column_by_column_definition(block):
    W = _pruned(7, 19, 0.5, seed=3)
    stored = stored_bits(W)
    H = _correlated_gram(19)
    q, _ = gptq_codes(W, stored, H, damp=0.05, block=block)
    want = _reference(W, stored, H, damp=0.05)
    assert torch.equal(q.double(), want)


def test_codes_keep_the_mask_and_lower_the_layer_error_below_rounding_to_nearest():
    W = _pruned(64, 48, 0.7, seed=5)
    W[3] = 0  # an empty row
    stored = stored_bits(W)
    H = _correlated_gram(48, seed=6)
    H[7, :] = H[:, 7] = 0  # an input that never fires
    q, scales = gptq_codes(W, stored, H)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.equal(q != 0, stored)  # every stored weight keeps a non-zero code, nothing else gets one
    q_rtn, s_rtn = quantize_rows(W, stored)
    gptq = reconstruction_error(W, q.float() * scales[:, None], H)
    nearest = reconstruction_error(W, q_rtn.float() * s_rtn[:, None], H)
    assert gptq < 0.6 * nearest, (gptq, nearest)


def test_bad_shapes_are_refused():
    W = _pruned(4, 8, 0.5)
    with pytest.raises(ValueError, match="shapes"):
        gptq_codes(W, stored_bits(W), torch.eye(7))
    with pytest.raises(SecateursError, match="does not store"):
        PackedTensor.from_weight(W, values="int8", codes=(torch.ones(4, 8, dtype=torch.int8), torch.ones(4)))
    with pytest.raises(SecateursError, match="do not fit"):
        PackedTensor.from_weight(W, values="int8", codes=(torch.ones(4, 7, dtype=torch.int8), torch.ones(4)))


def test_saved_codes_are_the_ones_given_and_load_back_as_their_weights(tmp_path):
    model = tiny_model("llama")
    secateurs.prune(model, secateurs.Recipe(method="magnitude", sparsity=0.6), progress=False)
    windows = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    codes = int8_codes(model, windows, progress=False)
    assert len(codes) == 3 * 7
    summary = secateurs.save_sparse(model, tmp_path / "gptq", values="int8", int8_codes=codes, progress=False)
    assert summary["int8_rounding"] == "gptq"
    loaded, _ = secateurs.load_pruned(tmp_path / "gptq")
    nearest_differs = 0
    for name, (q, scales) in codes.items():
        W = loaded.get_submodule(name).weight
        assert torch.equal(W, q.float() * scales[:, None]), name
        original = model.get_submodule(name).weight
        q_rtn, _ = quantize_rows(original, stored_bits(original))
        nearest_differs += int((q_rtn != q).sum())
    assert nearest_differs > 0  # GPTQ moved some codes away from the nearest ones
    with pytest.raises(SecateursError, match="only with values='int8'"):
        secateurs.save_sparse(model, tmp_path / "x", int8_codes=codes, progress=False)


def _logits_error(model, reference, ids) -> float:
    with torch.no_grad():
        return float((model(ids).logits - reference(ids).logits).pow(2).mean())


def test_compress_with_calibration_text_stays_closer_to_the_pruned_model(tmp_path, text_file):
    folder = tmp_path / "pruned"
    save_tiny_model_dir(folder)
    code, _, err = run_main(
        "prune", folder, "--method", "magnitude", "--sparsity", "0.6", "--eval", "none",
        "--output", tmp_path / "p", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    args = ("--values", "int8", "--quiet")
    code, _, err = run_main("compress", tmp_path / "p", "--output", tmp_path / "rtn", *args)
    assert code == 0, err
    calib = ("--calibration", text_file, "--nsamples", "8", "--seqlen", "32")
    code, out, err = run_main("compress", tmp_path / "p", "--output", tmp_path / "gptq", *args, *calib, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["int8_rounding"] == "gptq" and summary["int8_calibration"]["nsamples"] == 8
    pruned, tokenizer, _ = secateurs.load_model(str(tmp_path / "p"), "float32")
    text = secateurs.data.read_text("bible")[20000:24000]  # the same kind of text, not the calibration windows
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :1536].reshape(8, -1)
    rtn = _logits_error(secateurs.load_pruned(tmp_path / "rtn")[0], pruned, ids)
    gptq = _logits_error(secateurs.load_pruned(tmp_path / "gptq")[0], pruned, ids)
    assert gptq < rtn, (gptq, rtn)
    code, _, err = run_main("compress", tmp_path / "p", "--output", tmp_path / "y", "--quiet", *calib)
    assert code == 2 and "needs values='int8'" in err and not (tmp_path / "y").exists()
    code, _, err = run_main("compress", tmp_path / "p", "--output", tmp_path / "z", *args, *calib, "--low-memory")
    assert code == 2 and "needs the model in memory" in err and not (tmp_path / "z").exists()


def test_prune_to_sparse_int8_rounds_by_gptq_unless_told_otherwise(tmp_path, text_file):
    folder = tmp_path / "dense"
    save_tiny_model_dir(folder)
    common = (
        "prune", folder, "--method", "wanda", "--sparsity", "0.5", "--eval", "none", "--calibration", text_file,
        "--nsamples", "4", "--seqlen", "32", "--save-format", "sparse-int8", "--quiet",
    )  # fmt: skip
    assert run_main(*common, "--output", tmp_path / "g")[0] == 0
    assert run_main(*common, "--output", tmp_path / "n", "--int8-rounding", "nearest")[0] == 0
    reports = {k: json.loads((tmp_path / k / "report.json").read_text()) for k in ("g", "n")}
    assert reports["g"]["int8_rounding"] == "gptq" and reports["n"]["int8_rounding"] == "nearest"
    g, n = secateurs.load_pruned(tmp_path / "g")[0], secateurs.load_pruned(tmp_path / "n")[0]
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(g.get_submodule(name).weight != 0, n.get_submodule(name).weight != 0)  # same mask
    assert not torch.equal(g.get_submodule(name).weight, n.get_submodule(name).weight)  # other codes
