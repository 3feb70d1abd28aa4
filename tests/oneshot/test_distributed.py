"""Pruning on 2 gloo processes gives the masks and weights of one process on the same windows."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model

import secateurs
from secateurs import cli
from secateurs.oneshot.distributed import Ranks
from secateurs.oneshot.stats import InputStats

TESTS = Path(__file__).resolve().parents[1]

RECIPES = {
    "wanda": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt-2:4": {"method": "sparsegpt", "pattern": "2:4"},
    "owl-wanda-dsnot": {"method": "wanda", "sparsity": 0.6, "allocation": "owl", "refine": "dsnot"},
}

# run on every rank by torchrun: prune a tiny model with each recipe, write what came out
SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from conftest import VOCAB, tiny_model
    import secateurs

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {{}}
    for label, recipe in json.loads({recipes!r}).items():
        model = tiny_model("llama")
        torch.manual_seed(1)
        windows = torch.randint(0, VOCAB, (5, 16))
        if rank == 1 and {mismatch!r} == "recipe":
            recipe = {{**recipe, "exclude": ["*.down_proj"]}}
        if rank == 1 and {mismatch!r} == "calibration window":
            windows[4, 3] += 1
        try:
            report = secateurs.prune(model, recipe, windows, device="cpu", progress=False)
        except secateurs.SecateursError as exc:
            out[label] = {{"error": str(exc)}}
            continue
        weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        out[label] = {{
            "masks": {{n: m.digest() for n, m in report.masks.items()}},
            "weights": weights,
            "errors": [layer["output_error"] for layer in report.layers],
        }}
    with open(os.path.join({folder!r}, f"rank{{rank}}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
    """
)


def torchrun(*argv, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def run_ranks(tmp_path: Path, recipes: dict, mismatch: str = "") -> list[dict]:
    script = tmp_path / "ranks.py"
    script.write_text(
        SCRIPT.format(tests=str(TESTS), recipes=json.dumps(recipes), mismatch=mismatch, folder=str(tmp_path))
    )
    done = torchrun(script)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_gloo_processes_compute_the_masks_of_one(tmp_path):
    ranks = run_ranks(tmp_path, RECIPES)
    for label, recipe in RECIPES.items():
        model = tiny_model("llama")
        torch.manual_seed(1)
        windows = torch.randint(0, VOCAB, (5, 16))
        report = secateurs.prune(model, recipe, windows, device="cpu", progress=False)
        weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        single = {n: m.digest() for n, m in report.masks.items()}
        for r in ranks:  # windows 0-1 on rank 0, 2-4 on rank 1: masks, weights, errors as one process's
            assert r[label]["masks"] == single, label
            assert r[label]["weights"] == weights, label
            assert r[label]["errors"] == pytest.approx([layer["output_error"] for layer in report.layers], rel=1e-9)


@pytest.mark.parametrize("mismatch", ["recipe", "calibration window"])
def test_ranks_started_differently_are_refused(mismatch, tmp_path):
    ranks = run_ranks(tmp_path, {"wanda": RECIPES["wanda"]}, mismatch)
    for r in ranks:  # every rank stops with the same one line
        assert r["wanda"]["error"].startswith(f"the processes were started with different {mismatch}s: rank 1 ")


def test_torchrun_cli_prune_writes_the_single_process_output(tiny_model_dir, text_file, tmp_path):
    """``torchrun --nproc-per-node 2 -m secateurs prune`` saves (rank 0 only) what one process saves."""
    common = ["--method", "sparsegpt", "--sparsity", "0.5", "--calibration", text_file, "--nsamples", "3"]
    common += ["--seqlen", "32", "--eval", "none", "--device", "cpu", "--quiet"]
    two, one = tmp_path / "two", tmp_path / "one"
    done = torchrun("-m", "secateurs", "prune", tiny_model_dir, *common, "--output", two)
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli.main(["prune", str(tiny_model_dir), *map(str, common), "--output", str(one)]) == 0
    assert (two / "model.safetensors").read_bytes() == (one / "model.safetensors").read_bytes()
    reports = [json.loads((d / "report.json").read_text()) for d in (one, two)]
    digests = [[lin["mask_sha256"] for layer in r["layers"] for lin in layer["linears"]] for r in reports]
    assert digests[0] == digests[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # nothing else written by rank 1


def test_torchrun_gptq_int8_codes_are_those_of_one_process(tiny_model_dir, text_file, tmp_path):
    """GPTQ rounding under torchrun: every rank sums x xᵀ over its windows, the sums are added, rank 0 writes."""
    common = ["--method", "wanda", "--sparsity", "0.5", "--calibration", text_file, "--nsamples", "3"]
    common += ["--seqlen", "32", "--eval", "none", "--device", "cpu", "--quiet", "--save-format", "sparse-int8"]
    two, one = tmp_path / "two", tmp_path / "one"
    done = torchrun("-m", "secateurs", "prune", tiny_model_dir, *common, "--output", two)
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli.main(["prune", str(tiny_model_dir), *map(str, common), "--output", str(one)]) == 0
    from safetensors import safe_open

    with (
        safe_open(str(one / "model.sparse.safetensors"), "pt") as a,
        safe_open(str(two / "model.sparse.safetensors"), "pt") as b,
    ):  # (the header's metadata is a map: its order on disk may differ between processes)
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118
    assert json.loads((two / "report.json").read_text())["int8_rounding"] == "gptq"


def test_one_process_sums_are_untouched_and_shares_cover_every_window():
    stats = InputStats()
    stats.add(torch.ones(1, 3, 4), {"sq_norm"})
    Ranks().sum_stats([(stats, 4)])  # no process group: nothing to do
    assert stats.nsamples == 1 and stats.ntokens == 3
    for world in (1, 2, 3, 7):
        shares = [Ranks(r, world).share(10) for r in range(world)]
        assert [i for s in shares for i in range(10)[s]] == list(range(10))
        assert max(s.stop - s.start for s in shares) - min(s.stop - s.start for s in shares) <= 1
    with pytest.raises(secateurs.SecateursError, match="2 calibration windows for 3 processes"):
        Ranks(0, 3).share(2)
