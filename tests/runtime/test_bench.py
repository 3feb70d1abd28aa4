"""``secateurs bench`` (secateurs.runtime.bench) on tiny models."""

from __future__ import annotations

import importlib
import importlib.util
import json

import pytest
import torch
from conftest import run_main

import secateurs
from secateurs.checkpoint import save_sparse
from secateurs.errors import SecateursError
from secateurs.runtime import bench, kernels
from secateurs.runtime.linear import SparseLinear


def _own_greedy(model, ids, new_tokens, eos):
    """Greedy decoding by hand: full forward each step, no cache, EOS suppressed (min_new_tokens = new_tokens)."""
    out = ids
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(out, use_cache=False).logits[:, -1].float()
            logits[:, eos] = float("-inf")
            out = torch.cat([out, logits.argmax(-1, keepdim=True)], 1)
    return out[:, ids.shape[1] :]


@pytest.fixture
def sparse_tiny_dir(tmp_path, tiny_model_dir):
    """(sparse checkpoint of the tiny LLaMA pruned 70% by magnitude, the pruned model in memory)."""
    model, tokenizer, _ = secateurs.load_model(str(tiny_model_dir))
    secateurs.prune(model, secateurs.Recipe(method="magnitude", sparsity=0.7), progress=False)
    save_sparse(model, tokenizer, tmp_path / "s", progress=False)
    return tmp_path / "s", model


def test_cli_bench(sparse_tiny_dir):
    folder, pruned = sparse_tiny_dir
    args = ["--tokens", "3", "--prompt-len", "4", "--repeat", "1", "--threads", "1", "--quiet"]
    code, out, err = run_main("bench", folder, *args, "--json")
    assert code == 0, err
    result = json.loads(out)
    for name in ("dense", "sparse"):
        assert result[name]["decode_tokens_per_s"] > 0 and result[name]["prefill_tokens_per_s"] > 0
        assert result[name]["bandwidth_bound_tokens_per_s"] == pytest.approx(
            result["read_bandwidth_gbps"] * 1e9 / result[name]["bytes_per_decode_step"]
        )
    assert result["sparse"]["weight_bytes"] < result["dense"]["weight_bytes"]
    assert result["sparse"]["bytes_per_decode_step"] < result["dense"]["bytes_per_decode_step"]
    assert result["speedup_decode"] == pytest.approx(
        result["sparse"]["decode_tokens_per_s"] / result["dense"]["decode_tokens_per_s"]
    )
    assert result["same_tokens"] is True
    assert result["cpu"]["cpus"] >= 1 and "caches" in result["cpu"]
    llc = result["cpu"]["last_level_cache_bytes"]
    if llc:  # the tiny model fits in any last-level cache
        assert result["dense"]["fits_last_level_cache"] is (result["dense"]["bytes_per_decode_step"] <= llc) is True
    linears = {n: m for n, m in pruned.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert result["conversion"]["converted"] == len(linears) == 3 * 7  # every pruned linear runs on the kernel
    # per shape: how many linears have it, and their density, as counted from the pruned weights
    want = {}
    for m in linears.values():
        count, nonzero, numel = want.get(tuple(m.weight.shape), (0, 0, 0))
        want[tuple(m.weight.shape)] = (count + 1, nonzero + int((m.weight != 0).sum()), numel + m.weight.numel())
    assert {tuple(s["shape"]): s["count"] for s in result["shapes"]} == {k: v[0] for k, v in want.items()}
    for s in result["shapes"]:
        count, nonzero, numel = want[tuple(s["shape"])]
        assert s["density"] == pytest.approx(nonzero / numel, abs=1e-6)
    code, out, err = run_main("bench", folder, *args, "--no-micro", "--dtype", "bfloat16")
    assert code == 0, err
    assert "sparse/dense" in out and "bfloat16" in out


def _wrap_bench_helper(monkeypatch, name, make_wrapper):
    """Wrap ``name`` (decode_loop, generate) wherever the benchmark looks it up: bench itself or its timing module."""
    modules = [
        importlib.import_module(m)
        for m in ("secateurs.runtime.bench", "secateurs.runtime.timing")
        if importlib.util.find_spec(m) is not None
    ]
    real = next(getattr(m, name) for m in modules if hasattr(m, name))
    wrapper = make_wrapper(real)
    for m in modules:
        if hasattr(m, name):
            monkeypatch.setattr(m, name, wrapper)


@pytest.mark.parametrize("decoder", ["hf", "lean"])
def test_bench_decodes_on_the_kernel_and_matches_the_pruned_model(sparse_tiny_dir, monkeypatch, decoder):
    """During the benchmark's decode, in either loop, the sparse model calls the kernel once per packed linear per
    forward, once for each group of linears sharing an input (the dense one never), and both produce the greedy
    tokens of the pruned model, decoded here by hand."""
    folder, pruned = sparse_tiny_dir
    calls = {"spmm": 0}
    real_spmm = kernels.spmm

    def counting_spmm(*args, **kwargs):
        calls["spmm"] += 1
        return real_spmm(*args, **kwargs)

    def packed(model):
        return sum(isinstance(m, SparseLinear) for m in model.modules())

    def calls_per_forward(model):  # one per linear, but one per group of linears sharing an input
        linears = [m for m in model.modules() if isinstance(m, SparseLinear)]
        return sum(m.shared is None for m in linears) + len({id(m.shared[0]) for m in linears if m.shared})

    decodes = []
    real_loops = bench._decode_loops

    def watched_loops(models, *args):
        used, loops = real_loops(models, *args)

        def watch(model, loop):
            def run(ids, tokens):
                before = calls["spmm"]
                seconds, new = loop(ids, tokens)
                decodes.append(
                    {
                        "packed": packed(model),
                        "calls": calls_per_forward(model),
                        "tokens": tokens,
                        "spmm": calls["spmm"] - before,
                        "new": new,
                        "ids": ids,
                    }
                )
                return seconds, new

            return run

        return used, {name: watch(models[name], loop) for name, loop in loops.items()}

    monkeypatch.setattr(kernels, "spmm", counting_spmm)  # SparseLinear.forward calls kernels.spmm
    monkeypatch.setattr(bench, "_decode_loops", watched_loops)
    settings = dict(tokens=4, prompt_len=5, repeat=2, threads=1, micro=False, decoder=decoder)
    result = bench.benchmark(folder, head="torch", **settings)  # the pruned linears alone on the kernel
    assert result["same_tokens"] is True and result["conversion"]["converted"] == 21
    assert result["decoder"] == decoder and f"in the {decoder} loop" in result["protocol"]
    sparse_runs = [d for d in decodes if d["packed"]]
    dense_runs = [d for d in decodes if not d["packed"]]
    assert len(sparse_runs) == len(dense_runs) == 1 + 1 + 2  # warm-up, the tokens compared, then the repeats
    assert all(d["packed"] == 21 for d in sparse_runs)  # every pruned linear is packed in the sparse model
    for d in sparse_runs:  # a forward per new token (the prefill, then tokens - 1 steps), every packed linear
        assert d["calls"] == 21 - 3 * (2 + 1)  # per layer q/k/v one call, gate/up one call
        assert d["spmm"] == d["tokens"] * d["calls"], d
    assert all(d["spmm"] == 0 for d in dense_runs)
    ids = decodes[0]["ids"]
    want = _own_greedy(pruned, ids, 4, pruned.config.eos_token_id)
    for d in decodes:
        assert torch.equal(d["ids"], ids)
        if d["tokens"] == 4:
            assert torch.equal(d["new"], want)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{tmp}/nothing"], "is not a model folder"),
        (["{dense}"], "no linear is sparse enough"),
        (["{dense}", "--tokens", "1"], "--tokens >= 2"),
        (["{dense}", "--threads", "0"], "--threads must be at least 1"),
        (["{dense}", "--dtype", "int3"], "unknown dtype"),
    ],
)
def test_cli_bench_errors(tmp_path, tiny_model_dir, argv, message):
    argv = [a.format(tmp=tmp_path, dense=tiny_model_dir) for a in argv]
    code, out, err = run_main("bench", *argv, "--quiet", "--repeat", "1")
    assert code == 2 and out == "" and message in err, err


def test_bench_of_int8_values_compares_with_dense_bf16(sparse_tiny_dir, tmp_path):
    folder, _ = sparse_tiny_dir
    secateurs.compress(folder, tmp_path / "i8", values="int8", progress=False)
    args = ["--tokens", "3", "--prompt-len", "4", "--repeat", "1", "--threads", "1", "--quiet", "--no-micro"]
    code, out, err = run_main("bench", tmp_path / "i8", *args, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["sparse_values"] == ["int8"] and result["dense_dtype"] == "bfloat16"
    # 30% of the weights stored at 1 byte, a bit each for the mask, per row a 4-byte scale and an 8-byte offset
    model, _ = secateurs.load_sparse(tmp_path / "i8")
    linears = [m for m in model.modules() if isinstance(m, SparseLinear)]
    want = sum(m.packed.nnz + m.packed.mask.numel() + 12 * m.out_features + 8 for m in linears)
    want /= sum(m.out_features * m.in_features for m in linears)
    assert result["sparse"]["linear_bytes_per_weight"] == pytest.approx(want) and 0.3 + 1 / 8 < want < 0.7
    assert result["dense"]["linear_bytes_per_weight"] == 2
    code, out, err = run_main("bench", tmp_path / "i8", *args, "--json", "--head", "int8")
    assert code == 0, err
    with_head = json.loads(out)
    assert with_head["sparse_head"] == "int8"
    assert with_head["sparse"]["bytes_per_decode_step"] < result["sparse"]["bytes_per_decode_step"]
    code, out, err = run_main("bench", tmp_path / "i8", *args, "--json", "--dense-dtype", "float32")
    assert code == 0, err
    assert json.loads(out)["dense_dtype"] == "float32"


def test_head_choice_is_the_same_for_the_api_and_the_command_line():
    from secateurs.runtime.bench import head_choice

    assert head_choice("auto", "cpu") == "kernel" and head_choice("auto", "cuda:0") is None
    assert head_choice("torch", "cpu") is None and head_choice(None, "cpu") is None
    assert head_choice("int8", "cpu") == "int8" and head_choice("kernel", "cpu") == "kernel"
    with pytest.raises(SecateursError, match="head must be one of"):
        head_choice("fast", "cpu")


def test_bench_api_puts_the_head_on_the_kernel_by_default(sparse_tiny_dir):
    folder, _ = sparse_tiny_dir
    settings = dict(tokens=3, prompt_len=4, repeat=1, threads=1, micro=False)
    assert secateurs.runtime.bench.benchmark(folder, **settings)["sparse_head"] == "kernel"
    assert secateurs.runtime.bench.benchmark(folder, head="torch", **settings)["sparse_head"] == "as stored"
