"""Streaming mixture-of-experts models: experts stored expert by expert on disk are fused as transformers fuses them
on loading, pruned as in memory, and written back as save_pretrained writes them.

Tiny random Mixtral (on disk ``block_sparse_moe.experts.{e}.w1/w2/w3``) and Qwen2-MoE (``mlp.experts.{e}.gate_proj``
..., plus a shared expert) models saved in several shards; each streamed prune is compared with the in-memory prune
of the same folder: masks, every tensor of the two output folders (on disk and loaded), report and perplexity.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import TOKENIZER_VOCAB, byte_level_tokenizer, run_main
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_moe import moe_config, never_to
from transformers import AutoModelForCausalLM, AutoTokenizer

import secateurs
from secateurs import cli
from secateurs.models import find_layers
from secateurs.oneshot.streaming import INDEX, StreamedOutput, open_streamed

FAMILIES = ["mixtral", "qwen2_moe"]
# one expert's matrices as save_pretrained writes them
ON_DISK = {
    "mixtral": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
    "qwen2_moe": "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
}


EXPERT_1 = ["experts.1.gate_proj", "experts.1.up_proj", "experts.1.down_proj"]


def save_moe(folder, family: str):
    torch.manual_seed(0)
    config = moe_config(family, vocab=TOKENIZER_VOCAB, bos_token_id=256, eos_token_id=257, num_hidden_layers=3)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="40KB")
    byte_level_tokenizer().save_pretrained(folder)
    assert (folder / INDEX).is_file() and not (folder / "model.safetensors").exists()
    return folder


@pytest.fixture(scope="module", params=FAMILIES)
def moe_folder(request, tmp_path_factory):
    """A tiny MoE model of the family saved in several shards, experts stored one by one, with its tokenizer."""
    return save_moe(tmp_path_factory.mktemp("moe") / request.param, request.param)


def family_of(folder) -> str:
    return folder.name


def windows():
    return torch.randint(0, TOKENIZER_VOCAB, (3, 16), generator=torch.Generator().manual_seed(5))


def on_disk(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files, by the name it is stored under."""
    out = {}
    for path in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


def assert_same_folders(streamed, memory):
    """The same tensors under the same names on disk, and the same model loaded from both."""
    a, b = on_disk(streamed), on_disk(memory)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    a = AutoModelForCausalLM.from_pretrained(streamed).state_dict()
    b = AutoModelForCausalLM.from_pretrained(memory).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def streamed_prune(folder, out, recipe, hook=None):
    model, tokenizer, shards = open_streamed(folder)
    assert all(p.device.type == "meta" for p in find_layers(model)[1].parameters())
    if hook is not None:
        for layer in find_layers(model)[1]:
            layer.mlp.gate.register_forward_hook(hook)
    output = StreamedOutput(model, shards, tokenizer, out)
    with output as residence:
        report = secateurs.prune(model, recipe, windows(), device="cpu", progress=False, residence=residence)
        output.save(report.masks)
    assert all(p.device.type == "meta" for p in find_layers(model)[1].parameters())
    return report


def memory_prune(folder, out, recipe, hook=None):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if hook is not None:
        for layer in find_layers(model)[1]:
            layer.mlp.gate.register_forward_hook(hook)
    report = secateurs.prune(model, recipe, windows(), device="cpu", progress=False)
    model.save_pretrained(out)
    return report, model


@pytest.mark.parametrize("recipe", ["wanda", {"method": "sparsegpt", "sparsity": 0.6, "allocation": "owl"}])
def test_streamed_moe_prune_equals_the_in_memory_one(moe_folder, tmp_path, recipe, text_file):
    streamed = streamed_prune(moe_folder, tmp_path / "streamed", recipe)
    expected, memory = memory_prune(moe_folder, tmp_path / "memory", recipe)
    assert {n: m.digest() for n, m in streamed.masks.items()} == {n: m.digest() for n, m in expected.masks.items()}
    assert "model.layers.2.mlp.experts.3.down_proj" in streamed.masks  # every expert pruned as its own linears
    assert streamed.linears == expected.linears

    stored = on_disk(tmp_path / "streamed")
    assert ON_DISK[family_of(moe_folder)].format(i=2, e=3) in stored  # written expert by expert, as on loading
    assert not any(name.endswith("gate_up_proj") for name in stored)
    index = json.loads((tmp_path / "streamed" / INDEX).read_text())["weight_map"]
    assert sorted(index) == sorted(stored) and len(set(index.values())) == 4  # one shard per layer + the rest
    assert_same_folders(tmp_path / "streamed", tmp_path / "memory")

    tokenizer = AutoTokenizer.from_pretrained(moe_folder)
    settings = dict(seqlen=32, max_windows=4, progress=False)
    want = secateurs.evaluate(memory, tokenizer, str(text_file), **settings)
    got = secateurs.evaluate_streamed(tmp_path / "streamed", str(text_file), device="cpu", **settings)
    assert got.to_dict() == want.to_dict()


@pytest.mark.parametrize("policy, recipe", [("dense", "wanda"), ("magnitude", "sparsegpt")])
def test_experts_without_tokens_follow_the_policy_as_in_memory(moe_folder, tmp_path, policy, recipe, caplog):
    """A router hook sends no token to expert 1: its linears are left dense or pruned by magnitude, and reported so,
    exactly as in memory."""
    recipe = secateurs.Recipe(method=recipe, sparsity=0.5, unrouted_experts=policy)
    with caplog.at_level(logging.WARNING):
        streamed = streamed_prune(moe_folder, tmp_path / "streamed", recipe, hook=never_to(1))
    assert "3 experts got no calibration token" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        expected, _ = memory_prune(moe_folder, tmp_path / "memory", recipe, hook=never_to(1))
    assert "3 experts got no calibration token" in caplog.text
    unrouted = [lin for lin in streamed.linears if lin["info"].get("unrouted")]
    assert {lin["name"].split(".mlp.")[1] for lin in unrouted} == set(EXPERT_1)
    assert all(lin["info"] == {"unrouted": True, "policy": policy} for lin in unrouted)
    assert all((lin["pruned"] == 0) == (policy == "dense") for lin in unrouted)
    assert streamed.linears == expected.linears
    assert {n: m.digest() for n, m in streamed.masks.items()} == {n: m.digest() for n, m in expected.masks.items()}
    assert_same_folders(tmp_path / "streamed", tmp_path / "memory")


def test_streamed_sparse_output_and_compress_equal_the_in_memory_ones(moe_folder, tmp_path, caplog):
    """--save-format sparse streamed, and compress --low-memory: the weights the in-memory save_sparse writes (the
    fused experts stored dense, and said so, as in memory)."""
    model, tokenizer, shards = open_streamed(moe_folder)
    output = StreamedOutput(model, shards, tokenizer, tmp_path / "streamed", save_format="sparse")
    with caplog.at_level(logging.WARNING), output as residence:
        report = secateurs.prune(model, "wanda", windows(), device="cpu", progress=False, residence=residence)
        output.save(report.masks)
    assert "6 fused MoE expert tensors (model.layers.0.mlp.experts.gate_up_proj, ...) are stored dense" in caplog.text
    _, memory = memory_prune(moe_folder, tmp_path / "unused", "wanda")
    secateurs.save_sparse(memory, tokenizer, tmp_path / "memory", progress=False, masks=report.mask_tensors())
    secateurs.compress(moe_folder, tmp_path / "compressed", low_memory=True, progress=False)
    secateurs.compress(moe_folder, tmp_path / "compressed-memory", low_memory=False, progress=False)
    for streamed, whole in (("streamed", "memory"), ("compressed", "compressed-memory")):
        a = secateurs.checkpoint.load_pruned(tmp_path / streamed)[0].state_dict()
        b = secateurs.checkpoint.load_pruned(tmp_path / whole)[0].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), streamed


COMMON = ["--method", "wanda", "--sparsity", "0.5", "--nsamples", "3", "--seqlen", "32", "--device", "cpu", "--quiet"]


def test_cli_low_memory_moe_writes_what_the_in_memory_prune_saves(moe_folder, text_file, tmp_path):
    streamed, memory = tmp_path / "streamed", tmp_path / "memory"
    args = ["prune", str(moe_folder), *COMMON, "--calibration", str(text_file), "--eval", str(text_file)]
    args += ["--eval-windows", "4", "--unrouted-experts", "magnitude"]
    assert cli.main([*args, "--output", str(streamed), "--low-memory"]) == 0
    assert cli.main([*args, "--output", str(memory)]) == 0
    assert_same_folders(streamed, memory)
    reports = [json.loads((d / "report.json").read_text()) for d in (streamed, memory)]
    assert reports[0]["streamed"] is True and reports[1]["streamed"] is False
    assert reports[0]["perplexity"] == reports[1]["perplexity"]  # dense and pruned, streamed from disk
    untimed = [[{k: v for k, v in layer.items() if k != "seconds"} for layer in r["layers"]] for r in reports]
    assert untimed[0] == untimed[1]  # every linear's target, zeros, mask digest and unrouted flag


def test_cli_low_memory_moe_resumes_after_sigkill(text_file, tmp_path):
    """Stopped once layer 1 of 3 is saved, then resumed: the output of an uninterrupted in-memory prune."""
    import os
    import subprocess
    import sys

    from test_resume import KILLED  # the command line, killed by SIGKILL once layer 1 is saved

    folder = save_moe(tmp_path / "qwen2_moe", "qwen2_moe")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    args = ["prune", str(folder), *COMMON, "--eval", "none", "--calibration", str(text_file)]
    streamed = [*args, "--low-memory", "--output", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILLED, *streamed], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not out.exists() and (tmp_path / "out.resume").is_dir()
    done = subprocess.run([sys.executable, "-m", "secateurs", *streamed, "--resume"], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "qwen2_moe"]
    assert cli.main([*args, "--output", str(tmp_path / "whole")]) == 0
    assert_same_folders(out, tmp_path / "whole")


def test_torchrun_low_memory_moe_writes_the_single_process_output(text_file, tmp_path):
    """Two gloo processes streaming the same shards, each routing its share of the windows: rank 0 writes what one
    process writes."""
    from test_distributed import torchrun

    folder = save_moe(tmp_path / "mixtral", "mixtral")
    args = [*COMMON, "--eval", "none", "--calibration", str(text_file), "--low-memory"]
    done = torchrun("-m", "secateurs", "prune", folder, *args, "--output", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli.main(["prune", str(folder), *args, "--output", str(tmp_path / "one")]) == 0
    for name in sorted(p.name for p in (tmp_path / "one").glob("model-*.safetensors")):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_experts_that_do_not_fuse_to_the_model_are_refused_before_any_work(tmp_path, text_file):
    """A checkpoint missing one expert of a layer: transformers' conversion would stack 3 experts where the model
    has 4; refused in one line, naming the tensor, before anything is read or written."""
    folder = save_moe(tmp_path / "mixtral", "mixtral")
    index = json.loads((folder / INDEX).read_text())
    gone = [k for k in index["weight_map"] if ".layers.1.block_sparse_moe.experts.3." in k]
    assert len(gone) == 3
    for file in {index["weight_map"][k] for k in gone}:
        tensors = load_file(folder / file)
        save_file({k: v for k, v in tensors.items() if k not in gone}, str(folder / file), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in gone}
    (folder / INDEX).write_text(json.dumps(index))
    message = "model.layers.1.mlp.experts.gate_up_proj [3, 96, 32], the model has [4, 96, 32]"
    with pytest.raises(secateurs.SecateursError, match=message.replace("[", r"\[").replace("]", r"\]")):
        open_streamed(folder)
    out = tmp_path / "o"
    code, _, stderr = run_main(
        "prune", str(folder), *COMMON, "--eval", "none", "--calibration", str(text_file), "--low-memory",
        "--output", str(out),
    )  # fmt: skip
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_checkpoint_of_fused_experts_streams_and_keeps_its_names(tmp_path):
    """A checkpoint that already holds the model's names (fused experts, save_pretrained without reverting) streams
    too, and is written back under those names, as save_pretrained writes a model loaded from it."""
    folder = tmp_path / "fused"
    torch.manual_seed(0)
    config = moe_config("qwen2_moe", vocab=TOKENIZER_VOCAB, bos_token_id=256, eos_token_id=257)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, save_original_format=False)
    byte_level_tokenizer().save_pretrained(folder)
    assert "model.layers.0.mlp.experts.gate_up_proj" in on_disk(folder)
    streamed_prune(folder, tmp_path / "streamed", "wanda")
    memory_prune(folder, tmp_path / "memory", "wanda")
    assert "model.layers.0.mlp.experts.gate_up_proj" in on_disk(tmp_path / "streamed")
    assert_same_folders(tmp_path / "streamed", tmp_path / "memory")
