"""A streamed prune written as a sharded compact sparse checkpoint: the same weights as the in-memory prune saved
with save_sparse, read by every reader; damaged shards and indexes are refused with one line."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors
import torch
from conftest import run_main, save_tiny_model_dir
from safetensors.torch import load_file, save_file
from test_streaming import COMMON, EVAL, sharded, windows  # noqa: F401 (the sharded fixture)
from transformers import AutoModelForCausalLM

import secateurs
from secateurs.format.sparse import INDEX_NAME, WEIGHTS_NAME, is_sparse_folder, open_folder
from secateurs.oneshot.streaming import Shards, StreamedOutput, open_streamed

INT8 = {"sparse": None, "sparse-int8": "int8"}


def streamed_prune(source, out, save_format):
    model, tokenizer, shards = open_streamed(source)
    output = StreamedOutput(model, shards, tokenizer, out, save_format=save_format)
    with output as residence:
        report = secateurs.prune(model, "wanda", windows(), device="cpu", progress=False, residence=residence)
        output.save(report.masks)
        output.save_report({"recipe": report.recipe})
    return model


def memory_prune(source, out, save_format):
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source).eval()
    report = secateurs.prune(model, "wanda", windows(), device="cpu", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(source)
    masks = report.mask_tensors()
    secateurs.save_sparse(model, tokenizer, out, progress=False, masks=masks, values=INT8[save_format])
    return model


@pytest.fixture(scope="module")
def streamed_sparse(sharded, tmp_path_factory):  # noqa: F811
    """A streamed Wanda prune of the sharded tiny LLaMA written as sparse shards."""
    out = tmp_path_factory.mktemp("streamed_sparse") / "out"
    streamed_prune(sharded, out, "sparse")
    return out


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The tiny LLaMA with its LM head tied to the embeddings, in several shards."""
    folder = tmp_path_factory.mktemp("tied") / "llama"
    save_tiny_model_dir(folder, "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    weights = load_file(folder / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="40KB")
    return folder


@pytest.mark.parametrize("save_format, tie", [("sparse", False), ("sparse-int8", False), ("sparse", True)])
def test_streamed_sparse_prune_equals_the_in_memory_save(sharded, tied, tmp_path, save_format, tie):  # noqa: F811
    source = tied if tie else sharded
    model = streamed_prune(source, tmp_path / "streamed", save_format)
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())  # one layer at a time, all dropped
    memory = memory_prune(source, tmp_path / "memory", save_format)

    out = tmp_path / "streamed"
    files = sorted(p.name for p in out.iterdir())
    shards = [f"model-{i:05d}-of-00004.sparse.safetensors" for i in (1, 2, 3, 4)]
    assert [f for f in files if f.startswith("model")] == [*shards, INDEX_NAME]
    assert {"config.json", "masks.safetensors", "report.json", "tokenizer.json"} <= set(files)
    assert is_sparse_folder(out) and not (out / WEIGHTS_NAME).exists()
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"] == {"format": "secateurs-sparse", "format_version": "1", "dtype": "float32"}
    assert index["weight_map"]["lm_head.weight"] == shards[-1]  # tied or not, in the last shard
    assert index["weight_map"]["model.layers.0.self_attn.q_proj.weight"] == shards[0]  # packed, by weight name

    # the same packed weights, the same metadata, shard by shard, as the one file of the in-memory save
    whole = open_folder(tmp_path / "memory").files[0][1]
    parts = open_folder(out).files
    assert {k: v for _, h in parts for k, v in h.packed.items()} == whole.packed
    assert {k: v for _, h in parts for k, v in h.aliases.items()} == whole.aliases
    assert whole.aliases == ({"lm_head.weight": "model.embed_tokens.weight"} if tie else {})
    assert len(whole.packed) == 21 and all(
        e["dtype"] == (INT8[save_format] or "float32") for e in whole.packed.values()
    )

    got, _ = secateurs.load_pruned(out)
    want, _ = secateurs.load_pruned(tmp_path / "memory")
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if save_format == "sparse":
        assert all(torch.equal(a[k], v) for k, v in memory.state_dict().items())
    ids = windows()[:1]
    fast, _ = secateurs.load_sparse(out)
    slow, _ = secateurs.load_sparse(tmp_path / "memory")
    assert sum(isinstance(m, secateurs.SparseLinear) for m in fast.modules()) == 21
    torch.testing.assert_close(fast(ids).logits, slow(ids).logits, rtol=0, atol=0)
    assert torch.equal(
        secateurs.load_masks(out)["model.layers.1.mlp.up_proj"],
        secateurs.load_masks(tmp_path / "memory")["model.layers.1.mlp.up_proj"],
    )


def test_cli_low_memory_sparse_output_and_its_perplexity(sharded, text_file, tmp_path):  # noqa: F811
    from secateurs import cli

    streamed, memory = tmp_path / "streamed", tmp_path / "memory"
    args = ["prune", str(sharded), *COMMON, "--calibration", str(text_file), "--eval", str(text_file), *EVAL]
    args += ["--save-format", "sparse"]
    assert cli.main([*args, "--output", str(streamed), "--low-memory"]) == 0
    assert cli.main([*args, "--output", str(memory)]) == 0
    assert (streamed / INDEX_NAME).is_file() and (memory / WEIGHTS_NAME).is_file()
    reports = [json.loads((d / "report.json").read_text()) for d in (streamed, memory)]
    assert reports[0]["streamed"] is True
    assert reports[0]["perplexity"] == reports[1]["perplexity"]  # the pruned one read back from the sparse shards
    a, b = secateurs.load_pruned(streamed)[0].state_dict(), secateurs.load_pruned(memory)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)

    want = reports[1]["perplexity"]["pruned"]["perplexity"]
    for low_memory in (["--low-memory"], []):  # layer by layer from the shards, and whole through load_model
        code, stdout, stderr = run_main(
            "eval", str(streamed), *low_memory, "--eval", str(text_file), *EVAL, "--seqlen", "32", "--json"
        )
        assert code == 0, stderr
        assert json.loads(stdout)["perplexity"] == want


def test_shards_read_a_single_sparse_file_too(tied, tmp_path):
    memory_prune(tied, tmp_path / "one", "sparse-int8")
    shards = Shards(tmp_path / "one")
    assert shards.files == [WEIGHTS_NAME]
    name = "model.layers.0.mlp.down_proj.weight"
    loaded, _ = secateurs.load_pruned(tmp_path / "one")
    assert torch.equal(shards.read([name])[name], loaded.state_dict()[name])
    assert "lm_head.weight" not in shards.location  # tied: left to the model's tying


def damaged(streamed_sparse, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(streamed_sparse, folder)
    return folder, json.loads((folder / INDEX_NAME).read_text())


def refused(folder, match):
    with pytest.raises(secateurs.SecateursError, match=match) as info:
        secateurs.load_pruned(folder)
    assert "\n" not in str(info.value)
    with pytest.raises(secateurs.SecateursError, match=match):
        Shards(folder)


def test_a_missing_shard_is_refused(streamed_sparse, tmp_path):
    folder, _ = damaged(streamed_sparse, tmp_path)
    (folder / "model-00002-of-00004.sparse.safetensors").unlink()
    refused(folder, f"shard .*model-00002-of-00004.sparse.safetensors named by {INDEX_NAME} is missing")


def test_a_truncated_shard_is_refused(streamed_sparse, tmp_path):
    folder, _ = damaged(streamed_sparse, tmp_path)
    shard = folder / "model-00003-of-00004.sparse.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    refused(folder, r"cannot read .*model-00003-of-00004.sparse.safetensors: .*\(truncated or corrupt file\?\)")


def test_an_index_naming_a_tensor_a_shard_lacks_is_refused(streamed_sparse, tmp_path):
    folder, index = damaged(streamed_sparse, tmp_path)
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "model-00002-of-00004.sparse.safetensors"
    (folder / INDEX_NAME).write_text(json.dumps(index))
    refused(
        folder,
        f"{INDEX_NAME} names tensor model.layers.0.mlp.up_proj.weight in model-00002-of-00004.sparse.safetensors, "
        "which does not hold it",
    )


def test_a_tensor_in_two_shards_is_refused(streamed_sparse, tmp_path):
    folder, _ = damaged(streamed_sparse, tmp_path)
    first, second = (folder / f"model-0000{i}-of-00004.sparse.safetensors" for i in (1, 2))
    with safetensors.safe_open(str(second), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(second)
    tensors["model.layers.0.input_layernorm.weight"] = load_file(first)["model.layers.0.input_layernorm.weight"]
    save_file(tensors, second, metadata=metadata)
    refused(
        folder,
        "model.layers.0.input_layernorm.weight is in two shards, model-00001-of-00004.sparse.safetensors and "
        "model-00002-of-00004.sparse.safetensors",
    )


def test_a_shard_holding_what_the_index_does_not_name_or_a_damaged_value_is_refused(streamed_sparse, tmp_path):
    folder, index = damaged(streamed_sparse, tmp_path)
    del index["weight_map"]["model.layers.1.post_attention_layernorm.weight"]
    (folder / INDEX_NAME).write_text(json.dumps(index))
    refused(
        folder,
        "model-00002-of-00004.sparse.safetensors holds model.layers.1.post_attention_layernorm.weight, "
        f"which {INDEX_NAME} does not name",
    )

    folder, index = damaged(streamed_sparse, tmp_path / "sum")
    shard = folder / "model-00001-of-00004.sparse.safetensors"
    with safetensors.safe_open(str(shard), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.gate_proj.weight.values"][0] += 1
    save_file(tensors, shard, metadata=metadata)
    with pytest.raises(secateurs.SecateursError, match="gate_proj.weight does not match its checksum"):
        secateurs.load_pruned(folder)


def test_a_shard_the_whole_folder_lacks_is_refused(streamed_sparse, tmp_path):
    """Index and files agree, but a layer's shard and its entries are gone: the model's tensors are checked over
    all shards together."""
    folder, index = damaged(streamed_sparse, tmp_path)
    gone = "model-00002-of-00004.sparse.safetensors"
    (folder / gone).unlink()
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != gone}
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(secateurs.SecateursError, match=r"lacks tensors the model needs: model\.layers\.1\."):
        secateurs.load_pruned(folder)


@pytest.mark.parametrize("values", [None, "int8"])
def test_compress_low_memory_writes_what_compress_writes(sharded, streamed_sparse, tmp_path, values):  # noqa: F811
    from secateurs.checkpoint import compress

    pruned = tmp_path / "pruned"
    streamed_prune(sharded, pruned, "hf")  # a pruned HF folder in shards, with its masks and report
    sources = [pruned, streamed_sparse] if values == "int8" else [pruned]  # a sparse folder is requantised
    for n, source in enumerate(sources):
        low = compress(source, tmp_path / f"low{n}", low_memory=True, values=values, progress=False)
        whole = compress(source, tmp_path / f"whole{n}", low_memory=False, values=values, progress=False)
        assert (tmp_path / f"low{n}" / INDEX_NAME).is_file() and (tmp_path / f"whole{n}" / WEIGHTS_NAME).is_file()
        for field in ("packed_linears", "dense_linears", "linear_checkpoint_bytes", "dense_weights_bytes", "values"):
            assert low[field] == whole[field], field
        a = secateurs.load_pruned(tmp_path / f"low{n}")[0].state_dict()
        b = secateurs.load_pruned(tmp_path / f"whole{n}")[0].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        masks = [secateurs.load_masks(tmp_path / f"{kind}{n}") for kind in ("low", "whole")]
        assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
        reports = [json.loads((tmp_path / f"{kind}{n}" / "report.json").read_text()) for kind in ("low", "whole")]
        assert reports[0] == reports[1]


def test_cli_compress_low_memory(streamed_sparse, tmp_path):
    code, stdout, stderr = run_main(
        "compress", streamed_sparse, "--values", "int8", "--low-memory", "--output", tmp_path / "o", "--json", "--quiet"
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["streamed"] is True and summary["packed_linears"] == 21 and summary["values"] == "int8"
    assert sorted(p.name for p in (tmp_path / "o").glob("*.sparse.safetensors"))[-1] == (
        "model-00004-of-00004.sparse.safetensors"
    )


def test_cli_low_memory_sparse_int8_scores_the_written_model(sharded, text_file, tmp_path):  # noqa: F811
    """With int8 values the pruned perplexity is read back from the output: that of the int8 model written."""
    out = tmp_path / "out"
    args = ["prune", sharded, *COMMON, "--calibration", text_file, "--eval", text_file, *EVAL, "--no-dense-eval"]
    code, _, stderr = run_main(*args, "--save-format", "sparse-int8", "--low-memory", "--output", out)
    assert code == 0, stderr
    pruned = json.loads((out / "report.json").read_text())["perplexity"]["pruned"]["perplexity"]
    code, stdout, stderr = run_main("eval", out, "--eval", text_file, *EVAL, "--seqlen", "32", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["perplexity"] == pruned
    assert open_folder(out).files[0][1].packed["model.layers.0.mlp.up_proj.weight"]["dtype"] == "int8"


def test_cli_low_memory_sparse_resumes_after_sigkill(sharded, text_file, tmp_path):  # noqa: F811
    import os
    import subprocess
    import sys

    from test_resume import KILLED  # the command line, killed by SIGKILL once layer 1 is saved

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    args = ["prune", str(sharded), *COMMON, "--calibration", str(text_file), "--save-format", "sparse"]
    args += ["--low-memory", "--output", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILLED, *args], env=env, capture_output=True)
    assert killed.returncode == -9 and not out.exists()
    done = subprocess.run([sys.executable, "-m", "secateurs", *args, "--resume"], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    whole = tmp_path / "whole"
    args = ["prune", str(sharded), *COMMON, "--calibration", str(text_file), "--save-format", "sparse"]
    done = subprocess.run([sys.executable, "-m", "secateurs", *args, "--output", str(whole)], env=env)
    assert done.returncode == 0
    a, b = secateurs.load_pruned(out)[0].state_dict(), secateurs.load_pruned(whole)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    shutil.rmtree(whole)
