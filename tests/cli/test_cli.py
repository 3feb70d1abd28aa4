"""The command line, end to end on tiny offline models: ``secateurs prune | eval``.

Most cases call ``secateurs.cli.main([...])`` in-process; two run ``python -m secateurs`` as a subprocess to see
the real exit code and stderr. Every bad input must give a non-zero exit code, one ``secateurs: error:`` line,
no traceback, nothing on stdout, and no output folder (nor a hidden ``.OUT.partial-*`` one) left behind.
"""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import run_main
from transformers import AutoModelForCausalLM, AutoTokenizer

from secateurs.api import evaluate, prune
from secateurs.data.calibration import Calibration
from secateurs.models import find_layers, find_linears, weight_view
from secateurs.oneshot.recipe import Recipe

FAST = ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "4"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not stall when the machine's cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ helpers


def run_subprocess(*argv, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "secateurs", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def assert_one_error(code, stdout: str, stderr: str) -> str:
    """Non-zero exit, exactly one ``secateurs: error:`` line on stderr, no traceback, nothing on stdout."""
    assert code not in (0, None), (code, stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("secateurs: error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert stdout == ""
    return errors[0]


def partials(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.partial-*"))


def assert_nothing_left(out: Path) -> None:
    assert not out.exists(), sorted(p.name for p in out.iterdir()) if out.is_dir() else out
    assert partials(out) == []


def decoder_linears(model) -> dict[str, torch.Tensor]:
    """Full name -> weight as [out, in] of every prunable linear in the decoder layers."""
    layers_name, layers = find_layers(model)
    return {
        f"{layers_name}.{i}.{name}": weight_view(module)
        for i, layer in enumerate(layers)
        for name, module in find_linears(layer).items()
    }


def report_linears(report: dict) -> dict[str, dict]:
    return {lin["name"]: lin for layer in report["layers"] for lin in layer["linears"]}


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def sample_ids(folder: Path) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return torch.tensor([tokenizer("In the beginning, God created the heavens and the earth.").input_ids])


# ------------------------------------------------------------------------------------------------ happy path
@pytest.fixture(scope="module")
def wanda_run(tiny_model_dir, text_file, tmp_path_factory):
    """One ``prune --method wanda --sparsity 0.5 ... --json`` run, shared by the tests that inspect it."""
    out = tmp_path_factory.mktemp("wanda") / "pruned"
    torch.set_num_threads(1)
    code, stdout, stderr = run_main(
        "prune",
        tiny_model_dir,
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--calibration",
        text_file,
        "--eval",
        text_file,
        *FAST,
        "--output",
        out,
        "--json",
    )
    assert code == 0, stderr
    assert "Traceback" not in stderr
    return out, json.loads(stdout)


def test_prune_json_report_has_every_field(wanda_run, tiny_model_dir, text_file):
    out, report = wanda_run
    assert report["model"] == str(Path(tiny_model_dir).resolve())
    assert report["output"] == str(out)
    assert report["dtype"] == "float32"
    assert report["recipe"]["method"] == "wanda"
    assert report["recipe"]["sparsity"] == 0.5
    assert report["recipe"]["pattern"] is None
    calibration = report["calibration"]
    assert calibration["source"] == str(text_file)
    assert (calibration["nsamples"], calibration["seqlen"], calibration["seed"]) == (4, 32, 0)
    assert str(text_file.resolve()) in calibration["description"]

    for key in ("dense", "pruned"):
        ppl = report["perplexity"][key]
        assert math.isfinite(ppl["perplexity"]) and ppl["perplexity"] > 1
        assert ppl["perplexity"] == pytest.approx(math.exp(ppl["nll"]))
        assert (ppl["windows"], ppl["seqlen"]) == (4, 32)
        assert ppl["bos"] is True  # the byte-level tokenizer of the fixture adds <s>
        assert isinstance(ppl["protocol"], str) and "32 tokens" in ppl["protocol"]
        assert str(text_file.resolve()) in ppl["protocol"]
    assert report["perplexity"]["pruned"]["perplexity"] != report["perplexity"]["dense"]["perplexity"]

    assert report["sparsity"] == 0.5  # every width of the tiny LLaMA is even: exactly half of each row
    assert len(report["layers"]) == 3
    linears = report_linears(report)
    assert len(linears) == 3 * 7
    for lin in linears.values():
        assert set(lin) >= {"name", "shape", "zeros", "numel"}
        assert lin["numel"] == lin["shape"][0] * lin["shape"][1]
        assert lin["zeros"] == lin["numel"] // 2
    assert report["pruned_weights"] == sum(lin["zeros"] for lin in linears.values())
    assert report["prunable_weights"] == sum(lin["numel"] for lin in linears.values())
    assert report["prune_seconds"] > 0
    assert isinstance(report["peak_rss_bytes"], int) and report["peak_rss_bytes"] > 0
    # the installed distribution's version; a build's local label (+cpu, +cu130) is not always recorded in it
    assert report["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert report["versions"]["transformers"] == transformers.__version__


def test_prune_output_is_a_normal_hf_folder_with_the_reported_sparsity(wanda_run, tiny_model_dir):
    out, report = wanda_run
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert partials(out) == []
    assert json.loads((out / "report.json").read_text()) == report

    model = load(out)
    weights = decoder_linears(model)
    reported = report_linears(report)
    assert set(weights) == set(reported)
    for name, W in weights.items():
        assert list(W.shape) == reported[name]["shape"], name
        assert W.numel() == reported[name]["numel"], name
        assert int((W == 0).sum()) == reported[name]["zeros"], name
    zeros = sum(int((W == 0).sum()) for W in weights.values())
    assert zeros / sum(W.numel() for W in weights.values()) == report["sparsity"]

    # embeddings, norms and the LM head are left as they were
    dense = load(tiny_model_dir).state_dict()
    pruned_names = {f"{name}.weight" for name in weights}
    for name, tensor in model.state_dict().items():
        if name not in pruned_names:
            assert torch.equal(tensor, dense[name]), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("abc").input_ids == [256, 97, 98, 99]


def test_prune_output_equals_the_api_on_the_same_recipe(wanda_run, tiny_model_dir, text_file):
    out, report = wanda_run
    model = load(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    api_report = prune(
        model, Recipe("wanda", 0.5), Calibration(str(text_file), 4, 32, 0), tokenizer=tokenizer, progress=False
    )
    assert api_report.sparsity == report["sparsity"]
    saved = load(out)
    for (name, W), (name2, W2) in zip(decoder_linears(saved).items(), decoder_linears(model).items(), strict=True):
        assert name == name2
        assert torch.equal(W == 0, W2 == 0), name
    ids = sample_ids(out)
    torch.testing.assert_close(logits(saved, ids), logits(model, ids))
    ppl = evaluate(saved, tokenizer, str(text_file), seqlen=32, max_windows=4, progress=False)
    assert ppl.perplexity == pytest.approx(report["perplexity"]["pruned"]["perplexity"], rel=1e-6)


def test_eval_command_reproduces_the_pruned_perplexity(wanda_run, text_file):
    out, report = wanda_run
    code, stdout, stderr = run_main(
        "eval", out, "--eval", text_file, "--seqlen", "32", "--eval-windows", "4", "--json", "--quiet"
    )
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["model"] == str(out.resolve())
    pruned = report["perplexity"]["pruned"]
    assert result["perplexity"] == pytest.approx(pruned["perplexity"], rel=1e-6)
    assert result["protocol"] == pruned["protocol"]
    assert (result["windows"], result["seqlen"], result["bos"]) == (4, 32, True)


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_prune_2_4_pattern(method, tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_main(
        "prune", tiny_model_dir, "--method", method, "--pattern", "2:4", "--calibration", text_file,
        "--eval", "none", *FAST, "--output", out, "--json", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["recipe"]["method"] == method
    assert report["recipe"]["pattern"] == "2:4"
    assert report["recipe"]["sparsity"] == 0.5
    assert report["perplexity"] == {"dense": None, "pruned": None}
    if method == "magnitude":
        assert report["calibration"] is None  # magnitude uses no data
    else:
        assert report["calibration"]["nsamples"] == 4
    reported = report_linears(report)
    for name, W in decoder_linears(load(out)).items():
        groups = (W == 0).reshape(W.shape[0], -1, 4).sum(-1)
        assert (groups >= 2).all(), name  # at least 2 zeros in every 4 consecutive inputs of a row
        assert int((W == 0).sum()) == reported[name]["zeros"], name
        assert reported[name]["pruned"] == W.numel() // 2, name
    assert json.loads((out / "report.json").read_text()) == report


def test_prune_gpt2_conv1d(tiny_gpt2_dir, text_file, tmp_path):
    out = tmp_path / "gpt2-pruned"
    code, stdout, stderr = run_main(
        "prune", tiny_gpt2_dir, "--method", "sparsegpt", "--sparsity", "0.5", "--calibration", text_file,
        "--eval", text_file, *FAST, "--output", out, "--json", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["perplexity"]["pruned"]["bos"] is False  # this tokenizer has no BOS
    model = load(out)
    assert isinstance(model, transformers.GPT2LMHeadModel)
    reported = report_linears(report)
    weights = decoder_linears(model)
    assert set(weights) == set(reported)
    assert "transformer.h.0.attn.c_attn" in weights
    assert reported["transformer.h.0.attn.c_attn"]["shape"] == [3 * 64, 64]  # [out, in], Conv1D stores [in, out]
    for name, W in weights.items():
        assert list(W.shape) == reported[name]["shape"], name
        assert int((W == 0).sum()) == reported[name]["zeros"] == W.numel() // 2, name
    assert report["sparsity"] == 0.5


def test_prune_exclude_leaves_linears_dense(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_main(
        "prune", tiny_model_dir, "--method", "magnitude", "--sparsity", "0.5", "--exclude", "*.mlp.down_proj",
        "--eval", "none", *FAST, "--output", out, "--json", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["recipe"]["exclude"] == ["*.mlp.down_proj"]
    assert not any(name.endswith("down_proj") for name in report_linears(report))
    for name, W in decoder_linears(load(out)).items():
        assert int((W == 0).sum()) == (0 if name.endswith("down_proj") else W.numel() // 2), name


def test_exclude_matching_every_linear_is_an_error_and_matching_none_a_warning(tiny_model_dir, tmp_path, caplog):
    code, stdout, stderr = run_main(*magnitude_args(tiny_model_dir, tmp_path / "a", "--exclude", "*"))
    assert "matches every prunable linear" in assert_one_error(code, stdout, stderr)
    assert not (tmp_path / "a").exists()
    code, stdout, stderr = run_main(*magnitude_args(tiny_model_dir, tmp_path / "b", "--exclude", "*.mlp.nothing"))
    assert code == 0, stderr
    assert "--exclude '*.mlp.nothing' matches no linear" in caplog.text


def test_prune_without_output_saves_nothing(tiny_model_dir, text_file, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_main(
        "prune", tiny_model_dir, "--method", "magnitude", "--eval", "none", *FAST, "--json", "--quiet"
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["output"] is None and report["sparsity"] == 0.5
    assert list(tmp_path.iterdir()) == []
    assert "no --output: the pruned model will not be saved" in caplog.text


# ------------------------------------------------------------------------------------------------ bad input
BAD_PRUNE = {
    "sparsity 1.0": ["--sparsity", "1.0"],
    "sparsity -0.1": ["--sparsity", "-0.1"],
    "pattern 2-4": ["--pattern", "2-4"],
    "pattern 4:4": ["--pattern", "4:4"],
    "pattern 0:4": ["--pattern", "0:4"],
    "pattern 2:5 (widths 64, 96)": ["--pattern", "2:5"],
    "unknown calibration": ["--calibration", "no-such-corpus"],
    "missing calibration file": ["--calibration", "{tmp}/missing.txt"],
    "calibration too short": ["--calibration", "{short}"],
    "missing eval file": ["--eval", "{tmp}/missing.txt"],
    "eval file is a folder": ["--eval", "{folder}"],
    "eval file not UTF-8": ["--eval", "{latin1}"],
    "eval file bad extension": ["--eval", "{csv}"],
    "nsamples 0": ["--nsamples", "0"],
    "seqlen 1": ["--seqlen", "1"],
    "unknown dtype": ["--dtype", "float8"],
    "unknown device": ["--device", "tpu9"],
    "blocksize 0": ["--method", "sparsegpt", "--blocksize", "0"],
}


@pytest.fixture
def bad_files(tmp_path) -> dict[str, str]:
    (tmp_path / "short.txt").write_text("Too short to hold 4 windows of 32 tokens.\n")
    (tmp_path / "folder.txt").mkdir()
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 200)
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    return {
        "tmp": str(tmp_path),
        "short": str(tmp_path / "short.txt"),
        "folder": str(tmp_path / "folder.txt"),
        "latin1": str(tmp_path / "latin1.txt"),
        "csv": str(tmp_path / "data.csv"),
    }


@pytest.mark.parametrize("case", list(BAD_PRUNE))
def test_prune_bad_input(case, tiny_model_dir, text_file, bad_files, tmp_path):
    out = tmp_path / "out"
    extra = [arg.format(**bad_files) for arg in BAD_PRUNE[case]]
    base = ["--calibration", text_file, "--eval", text_file, *FAST]  # later options win over these
    code, stdout, stderr = run_main("prune", tiny_model_dir, *base, *extra, "--output", out, "--json")
    assert_one_error(code, stdout, stderr)
    assert_nothing_left(out)


@pytest.fixture
def hub_offline(monkeypatch):
    """No network: the hub client fails at once instead of trying (and maybe hanging)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name", ["nobody-here/no-such-model-xyz", "no-such-model-xyz"])
def test_prune_unknown_hub_model(name, hub_offline, text_file, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_main("prune", name, "--eval", text_file, *FAST, "--output", out)
    line = assert_one_error(code, stdout, stderr)
    assert name in line
    assert_nothing_left(out)


def test_prune_missing_local_model(hub_offline, text_file, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "models" / "missing"
    code, stdout, stderr = run_main("prune", missing, "--eval", text_file, *FAST, "--output", out)
    line = assert_one_error(code, stdout, stderr)
    assert "missing" in line
    assert_nothing_left(out)


def test_prune_folder_without_config(hub_offline, text_file, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "README.md").write_text("nothing here\n")
    out = tmp_path / "out"
    code, stdout, stderr = run_main("prune", folder, "--eval", text_file, *FAST, "--output", out)
    line = assert_one_error(code, stdout, stderr)
    assert "config.json" in line
    assert_nothing_left(out)


def test_prune_bos_always_without_bos_token(tiny_gpt2_dir, text_file, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_main(
        "prune", tiny_gpt2_dir, "--eval", text_file, "--bos", "always", *FAST, "--output", out
    )
    line = assert_one_error(code, stdout, stderr)
    assert "BOS" in line
    assert_nothing_left(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_prune_cuda_without_cuda(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_main("prune", tiny_model_dir, "--device", "cuda", *FAST, "--output", out)
    assert "CUDA" in assert_one_error(code, stdout, stderr)
    assert_nothing_left(out)


@pytest.mark.parametrize(
    "argv",
    [
        ["--sparsity", "abc"],
        ["--sparsity", "0.5", "--pattern", "2:4"],
        ["--method", "obs"],
        ["--nsamples", "four"],
        ["--no-such-option"],
    ],
    ids=["sparsity abc", "sparsity and pattern", "unknown method", "nsamples four", "unknown option"],
)
def test_prune_argparse_errors_exit_2(argv, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_main("prune", tiny_model_dir, *argv, "--output", out)
    assert code == 2
    assert "error:" in stderr and "Traceback" not in stderr
    assert stdout == ""
    assert_nothing_left(out)


def test_eval_bad_input(text_file, tmp_path, hub_offline, tiny_model_dir):
    code, stdout, stderr = run_main("eval", tmp_path / "missing", "--eval", text_file, "--seqlen", "32")
    assert_one_error(code, stdout, stderr)
    code, stdout, stderr = run_main("eval", tiny_model_dir, "--eval", "none", "--seqlen", "32")
    assert "--eval" in assert_one_error(code, stdout, stderr)
    code, stdout, stderr = run_main("eval", tiny_model_dir, "--eval", tmp_path / "missing.txt", "--seqlen", "32")
    assert "missing.txt" in assert_one_error(code, stdout, stderr)
    code, stdout, stderr = run_main("eval", tiny_model_dir, "--eval", text_file, "--seqlen", "100000")
    assert "exceeds the model's maximum of 128" in assert_one_error(code, stdout, stderr)


# ------------------------------------------------------------------------------------------------ output folder
def magnitude_args(model_dir, out, *extra):
    return ("prune", model_dir, "--method", "magnitude", "--eval", "none", *FAST, "--output", out, *extra)


def test_output_non_empty_is_refused_then_replaced_with_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious\n")
    code, stdout, stderr = run_main(*magnitude_args(tiny_model_dir, out, "--json"))
    assert "--overwrite" in assert_one_error(code, stdout, stderr)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious\n"
    assert partials(out) == []

    # --overwrite never deletes a folder that is not a secateurs output
    code, stdout, stderr = run_main(*magnitude_args(tiny_model_dir, out, "--json", "--overwrite"))
    assert "holds no secateurs output" in assert_one_error(code, stdout, stderr)
    assert (out / "keep.txt").read_text() == "precious\n" and partials(out) == []

    (out / "report.json").write_text("{}\n")  # an earlier secateurs output: replaced
    code, stdout, stderr = run_main(*magnitude_args(tiny_model_dir, out, "--json", "--overwrite"))
    assert code == 0, stderr
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "report.json").read_text()) == json.loads(stdout)
    load(out)
    assert partials(out) == []


def test_overwrite_refuses_the_current_folder_and_its_parents(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "report.json").write_text("{}\n")
    monkeypatch.chdir(out / "sub")
    for target in (out, ".."):
        code, stdout, stderr = run_main(*magnitude_args(tiny_model_dir, target, "--overwrite"))
        assert code == 2 and "secateurs: error:" in stderr
    assert (out / "sub").is_dir() and (out / "report.json").is_file()


def test_output_empty_folder_is_used(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code, _, stderr = run_main(*magnitude_args(tiny_model_dir, out, "--quiet"))
    assert code == 0, stderr
    assert (out / "config.json").is_file() and partials(out) == []


def test_output_is_a_file(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a folder\n")
    code, stdout, stderr = run_main(*magnitude_args(tiny_model_dir, out))
    assert_one_error(code, stdout, stderr)
    assert out.read_text() == "not a folder\n" and partials(out) == []


def test_output_under_a_regular_file(tiny_model_dir, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x\n")
    out = blocker / "sub" / "out"
    code, stdout, stderr = run_main(*magnitude_args(tiny_model_dir, out))
    assert_one_error(code, stdout, stderr)
    assert blocker.read_text() == "x\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_output_missing_parents_are_created(tiny_model_dir, tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    code, _, stderr = run_main(*magnitude_args(tiny_model_dir, out, "--quiet"))
    assert code == 0, stderr
    assert (out / "config.json").is_file() and partials(out) == []


def test_failed_run_creates_no_parent_folders(tiny_model_dir, tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    code, stdout, stderr = run_main(*magnitude_args(tiny_model_dir, out, "--pattern", "2:5"))
    assert "2:5" in assert_one_error(code, stdout, stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(IS_ROOT, reason="root ignores directory permissions")
def test_output_under_a_read_only_folder(tiny_model_dir, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        out = parent / "out"
        code, stdout, stderr = run_main(*magnitude_args(tiny_model_dir, out))
        assert_one_error(code, stdout, stderr)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_output_folder_gets_the_umask_permissions(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    umask = os.umask(0o022)
    try:
        code, _, stderr = run_main(*magnitude_args(tiny_model_dir, out, "--quiet"))
    finally:
        os.umask(umask)
    assert code == 0, stderr
    assert out.stat().st_mode & 0o777 == 0o755


# ------------------------------------------------------------------------------------------------ interruptions
def test_ctrl_c_while_pruning(monkeypatch, tiny_model_dir, text_file, tmp_path):
    calls = []

    def interrupted_walk(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr("secateurs.oneshot.prune.walk", interrupted_walk)
    out = tmp_path / "out"
    code, stdout, stderr = run_main(
        "prune", tiny_model_dir, "--calibration", text_file, "--eval", text_file, *FAST, "--output", out, "--json"
    )
    assert calls and code == 130
    assert "nothing was saved" in stderr and "Traceback" not in stderr
    assert stdout == ""
    assert_nothing_left(out)


@pytest.fixture
def interrupt_saving(monkeypatch):
    """Make ``save_pretrained`` write the model into the temporary folder, then raise ``exc``; records where."""
    seen = []

    def install(exc):
        real = transformers.PreTrainedModel.save_pretrained

        def save_then_fail(self, folder, *args, **kwargs):
            real(self, folder, *args, **kwargs)
            seen.append(Path(folder))
            assert any(Path(folder).iterdir())
            raise exc

        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_fail)
        return seen

    return install


def test_ctrl_c_while_saving_leaves_nothing(interrupt_saving, tiny_model_dir, tmp_path):
    seen = interrupt_saving(KeyboardInterrupt())
    out = tmp_path / "out"
    code, stdout, stderr = run_main(*magnitude_args(tiny_model_dir, out, "--json"))
    assert code == 130
    assert "nothing was saved" in stderr and "Traceback" not in stderr
    assert stdout == ""
    assert len(seen) == 1 and seen[0].parent == tmp_path and seen[0].name.startswith(".out.partial-")
    assert not seen[0].exists()
    assert_nothing_left(out)


def test_ctrl_c_while_overwriting_keeps_the_old_output(interrupt_saving, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert run_main(*magnitude_args(tiny_model_dir, out, "--quiet"))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    interrupt_saving(KeyboardInterrupt())
    code, _, stderr = run_main(*magnitude_args(tiny_model_dir, out, "--overwrite", "--sparsity", "0.25"))
    assert code == 130, stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert partials(out) == []


def test_disk_full_while_saving(interrupt_saving, tiny_model_dir, tmp_path):
    interrupt_saving(OSError(errno.ENOSPC, "No space left on device"))
    out = tmp_path / "out"
    try:
        code, stdout, stderr = run_main(*magnitude_args(tiny_model_dir, out))
    except OSError:
        code, stdout, stderr = None, "", "Traceback (escaped the CLI)"
    assert "No space left" in assert_one_error(code, stdout, stderr)
    assert_nothing_left(out)


# ------------------------------------------------------------------------------------------------ real process
def test_subprocess_prune_json(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    proc = run_subprocess(
        "prune", tiny_model_dir, "--method", "wanda", "--calibration", text_file, "--eval", text_file, *FAST,
        "--output", out, "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "saved to" in proc.stderr  # log lines and progress go to stderr ...
    report = json.loads(proc.stdout)  # ... so stdout holds the JSON report and nothing else
    assert report["sparsity"] == 0.5
    assert json.loads((out / "report.json").read_text()) == report
    assert partials(out) == []


def test_subprocess_unknown_hub_model(text_file, tmp_path):
    out = tmp_path / "out"
    proc = run_subprocess(
        "prune", "nobody-here/no-such-model-xyz", "--eval", text_file, *FAST, "--output", out, "--quiet"
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.splitlines()  # --quiet: the error line and nothing else
    assert line.startswith("secateurs: error:") and "nobody-here/no-such-model-xyz" in line
    assert proc.stdout == ""
    assert_nothing_left(out)


def test_eval_windows_default_is_capped_for_local_text_and_whole_for_wikitext2():
    from secateurs.api import default_eval_windows
    from secateurs.cli import build_parser

    assert build_parser().parse_args(["prune"]).eval_windows == "auto"
    assert build_parser().parse_args(["eval", "m", "--eval-windows", "all"]).eval_windows is None
    assert build_parser().parse_args(["eval", "m", "--eval-windows", "7"]).eval_windows == 7
    assert default_eval_windows("bible") == 40
    assert default_eval_windows("wikitext2") is None
    assert default_eval_windows("c4") == 256


def test_prune_with_owl_allocation_reports_per_layer_ratios(tiny_model_dir, text_file, tmp_path, capsys):
    from secateurs.cli import main

    code = main(
        [
            "prune",
            str(tiny_model_dir),
            "--sparsity",
            "0.6",
            "--allocation",
            "owl",
            "--owl-lambda",
            "0.05",
            "--calibration",
            str(text_file),
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            "--eval",
            "none",
            "--json",
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recipe"]["allocation"] == "owl" and report["recipe"]["options"]["allocation"]["lam"] == 0.05
    targets = [layer["sparsity_target"] for layer in report["layers"]]
    assert sum(targets) / len(targets) == pytest.approx(0.6)
    assert all("outlier_ratio" in layer for layer in report["layers"])


def test_missing_allocation_file_fails_before_loading(tiny_model_dir, tmp_path):
    code, stdout, stderr = run_main(
        "prune", tiny_model_dir, "--allocation", tmp_path / "nope.json", "--output", tmp_path / "out"
    )
    assert "allocation file not found" in assert_one_error(code, stdout, stderr)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"0": 0.5, "model.layers.7": 0.5}', "unknown layer 'model.layers.7'"),
        ('{"0": 0.5}', "no sparsity for 2 layer"),
    ],
)
def test_bad_allocation_table_fails_before_any_forward_pass(tiny_model_dir, tmp_path, text_file, content, message):
    """A table that does not fit the model's layers is refused right after loading, before the dense evaluation."""
    path = tmp_path / "alloc.json"
    path.write_text(content)
    code, stdout, stderr = run_main(
        "prune", tiny_model_dir, "--allocation", path, "--eval", text_file, "--seqlen", 32, "--calibration", text_file
    )
    assert message in assert_one_error(code, stdout, stderr)
    assert "dense perplexity" not in stderr


def test_prune_with_dsnot(tiny_model_dir, text_file):
    code, stdout, stderr = run_main(
        "prune",
        tiny_model_dir,
        "--method",
        "magnitude",
        "--sparsity",
        "0.7",
        "--refine",
        "dsnot",
        "--dsnot-cycles",
        "10",
        "--dsnot-threshold",
        "0",
        "--dsnot-target",
        "*.mlp.*",
        "--calibration",
        text_file,
        "--eval",
        "none",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--json",
        "--quiet",
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["recipe"]["refine"] == "dsnot" and report["recipe"]["options"]["refine"]["cycles"] == 10
    assert report["calibration"] is not None  # magnitude + DSnoT needs the activations
    refined = [lin for layer in report["layers"] for lin in layer["linears"] if "dsnot" in lin["info"]]
    assert refined and all(".mlp." in lin["name"] for lin in refined)
    assert all(lin["info"]["dsnot"]["swaps"] <= 10 * lin["shape"][0] for lin in refined)


def test_bad_refine_is_rejected(tiny_model_dir):
    code, stdout, stderr = run_main("prune", tiny_model_dir, "--refine", "sparse-grow")
    assert code == 2 and "unknown refinement 'sparse-grow': choose one of dsnot" in stderr
