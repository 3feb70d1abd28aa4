"""Pruning at scale: peak memory of a streamed prune against model size and depth, 1 against 2 gloo processes, and a
run killed by SIGKILL then resumed.

Protocol (printed with the figures):
* models: random-weight LLaMA-shaped checkpoints written shard by shard (one safetensors file per decoder layer
  plus one for the rest; never whole in memory): hidden ``--hidden``, MLP ``--intermediate``, 16 heads (4 KV heads),
  SmolLM2's tokenizer and vocabulary (49152, tied embeddings), fp32, seed 0. Random weights are fine for memory and
  time (the work depends on shapes, not values) and say nothing about quality.
* ``secateurs prune MODEL --low-memory --method M --sparsity 0.5 --calibration shakespeare --nsamples N --seqlen S
  --eval none --device cpu`` in a child process; peak RSS is the child's own high-water mark (VmHWM, read as it
  exits: not ``wait4``'s, which counts the fork's copy of the parent), the model's size is its shard bytes; wall
  time includes loading and saving.
* masks: the ``mask_sha256`` of every linear in report.json, hashed together.
* distributed: the same command under ``torchrun --standalone --nproc-per-node 2`` against one process, 1 thread
  per process in both (fp32 rounding in the forward passes depends on the thread count); same windows.
* resume: the child is killed by SIGKILL right after layer ``layers // 2`` is saved, then run again with
  ``--resume``; the output's tensors (and metadata) are hashed against an uninterrupted run's.

    python benchmarks/scale.py                          # Wanda at 8/16/32 layers (1.9-6.3 GB), SparseGPT at 32
    python benchmarks/scale.py --depths 4,8 --hidden 1024 --intermediate 2816 --parts memory   # quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# runs the command line in a child and writes the child's own peak resident memory (VmHWM, which starts afresh at
# exec: a fork's copy of this process's memory is not counted) to SECATEURS_BENCH_HWM when it exits
CHILD = """
import atexit, os, sys
def report():
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM"))
    with open(os.environ["SECATEURS_BENCH_HWM"], "w") as f:
        f.write(kb)
atexit.register(report)
from secateurs.cli import main
sys.exit(main(sys.argv[1:]))
"""

KILL_AFTER = """
import os, signal, sys
from secateurs.cli import main
from secateurs.oneshot.resume import RunState
real, stop = RunState.save_layer, int(os.environ["SECATEURS_BENCH_KILL_AFTER"])
def save_then_die(self, index, *args, **kwargs):
    real(self, index, *args, **kwargs)
    if index == stop:
        os.kill(os.getpid(), signal.SIGKILL)
RunState.save_layer = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def write_model(folder: Path, layers: int, hidden: int, intermediate: int) -> int:
    """A random LLaMA-shaped sharded checkpoint, one layer at a time; returns its weight bytes."""
    import transformers

    from secateurs.models import _smollm2_folder

    source = _smollm2_folder()
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    kv = hidden // 4
    shapes = {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (intermediate, hidden),
        "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
    }
    total, weight_map = layers + 1, {}
    size = 0
    for i in range(layers + 1):
        name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        if i < layers:
            tensors = {f"model.layers.{i}.{k}": torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
            tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
            tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden)
        else:
            tensors = {
                "model.embed_tokens.weight": torch.randn(49152, hidden, generator=g) * 0.02,
                "model.norm.weight": torch.ones(hidden),
            }
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        size += sum(t.numel() * 4 for t in tensors.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return size


def run(argv: list[str], *, threads: int, env_extra: dict | None = None, script: str | None = None) -> dict:
    """Run a command in a child: its exit code, wall seconds and (for ``secateurs`` commands, run through
    :data:`CHILD`) its own peak resident memory in bytes."""
    hwm = Path(tempfile.mkstemp(prefix="hwm-")[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "SECATEURS_BENCH_HWM": str(hwm)}
    env.update(env_extra or {})
    if script is None and argv[:3] == [sys.executable, "-m", "secateurs"]:
        script, argv = CHILD, argv[3:]
    command = [sys.executable, "-c", script, *argv] if script else argv
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    text = hwm.read_text().strip()
    hwm.unlink(missing_ok=True)
    peak = int(text) * 1024 if text else None
    return {"code": done.returncode, "seconds": seconds, "peak_rss": peak, "stderr": done.stderr.decode()[-2000:]}


def prune_args(model: Path, out: Path, args, method: str) -> list[str]:
    return [
        *("prune", str(model), "--method", method, "--sparsity", "0.5", "--calibration", "shakespeare"),
        *("--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--eval", "none", "--device", "cpu"),
        *("--quiet", "--output", str(out)),
    ]


def masks_hash(out: Path) -> str:
    report = json.loads((out / "report.json").read_text())
    digests = [lin["mask_sha256"] for layer in report["layers"] for lin in layer["linears"]]
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def content_hash(out: Path) -> str:
    """Every safetensors file's tensors and metadata (not its bytes: the writer orders metadata at random)."""
    h = hashlib.sha256()
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            h.update(path.name.encode() + json.dumps(f.metadata(), sort_keys=True).encode())
            for key in sorted(f.keys()):
                t = f.get_tensor(key)
                h.update(key.encode() + t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check(result: dict, what: str) -> None:
    if result["code"] != 0:
        raise SystemExit(f"{what} failed ({result['code']}):\n{result['stderr']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="8,16,32", help="decoder layers of the models (comma-separated)")
    parser.add_argument("--main-depth", type=int, default=32, help="depth of the largest model (SparseGPT too)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", default="memory,depth,distributed,resume")
    parser.add_argument("--workdir", default=None, help="where the models go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="secateurs-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"protocol": {k: v for k, v in vars(args).items() if k != "json"}}
    print(f"# scale benchmark, {os.cpu_count()} CPUs, threads {args.threads}, work in {work}")
    print(f"# protocol: {json.dumps(figures['protocol'])}")
    models: dict[int, tuple[Path, int]] = {}

    def model(depth: int) -> tuple[Path, int]:
        if depth not in models:
            folder = work / f"llama-{depth}"
            if folder.exists():
                shutil.rmtree(folder)
            models[depth] = (folder, write_model(folder, depth, args.hidden, args.intermediate))
        return models[depth]

    def prune(depth: int, method: str, label: str, extra=(), **kw) -> dict:
        folder, size = model(depth)
        out = work / f"out-{label}"
        shutil.rmtree(out, ignore_errors=True)
        result = run([sys.executable, "-m", "secateurs", *prune_args(folder, out, args, method), *extra], **kw)
        check(result, label)
        result.update(size=size, out=out, masks=masks_hash(out))
        print(
            f"{label:34s} {size / 1e9:6.2f} GB  peak RSS {result['peak_rss'] / 1e9:5.2f} GB "
            f"({result['peak_rss'] / size:.2f}x size)  {result['seconds']:7.1f} s  masks {result['masks']}"
        )
        return result

    if "depth" in parts:  # Wanda at every depth (the main depth included): memory flat, time linear
        for depth in sorted({*[int(d) for d in args.depths.split(",")], args.main_depth}):
            r = prune(depth, "wanda", f"wanda {depth} layers streamed", ["--low-memory"], threads=args.threads)
            figures[f"depth_{depth}"] = {k: v for k, v in r.items() if k not in ("out", "stderr")}
            shutil.rmtree(r["out"], ignore_errors=True)
    if "memory" in parts:  # SparseGPT (the largest statistics and scratch) at the main depth
        r = prune(
            args.main_depth,
            "sparsegpt",
            f"sparsegpt {args.main_depth} layers streamed",
            ["--low-memory"],
            threads=args.threads,
        )
        figures["memory_sparsegpt"] = {k: v for k, v in r.items() if k not in ("out", "stderr")}
        shutil.rmtree(r["out"], ignore_errors=True)
        shutil.rmtree(model(args.main_depth)[0], ignore_errors=True)
        models.pop(args.main_depth)
    if "distributed" in parts:
        depth = min(int(d) for d in args.depths.split(","))
        # one thread per process in both: fp32 rounding in the forward passes depends on the thread count, so only
        # runs with the same threads per process are comparable bit for bit
        one = prune(depth, "sparsegpt", f"sparsegpt {depth} layers, 1 process", ["--low-memory"], threads=1)
        folder, size = model(depth)
        out = work / "out-two"
        shutil.rmtree(out, ignore_errors=True)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        two = run(
            [*torchrun, "-m", "secateurs", *prune_args(folder, out, args, "sparsegpt"), "--low-memory"],
            threads=max(1, args.threads // 2),
        )
        check(two, "2 processes")
        same = masks_hash(out) == one["masks"] and content_hash(out) == content_hash(one["out"])
        print(
            f"{'sparsegpt, 2 gloo processes':34s} {two['seconds']:7.1f} s (1 process: {one['seconds']:.1f} s); "
            f"masks {masks_hash(out)}, output identical to 1 process: {same}"
        )
        figures["distributed"] = {"one_seconds": one["seconds"], "two_seconds": two["seconds"], "identical": same}
    if "resume" in parts:
        depth = min(int(d) for d in args.depths.split(","))
        whole = prune(depth, "sparsegpt", f"sparsegpt {depth} layers, whole", ["--low-memory"], threads=args.threads)
        folder, _ = model(depth)
        out = work / "out-resumed"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / "out-resumed.resume", ignore_errors=True)
        argv = [*prune_args(folder, out, args, "sparsegpt"), "--low-memory"]
        stop = depth // 2 - 1
        killed = run(argv, threads=args.threads, script=KILL_AFTER, env_extra={"SECATEURS_BENCH_KILL_AFTER": str(stop)})
        assert killed["code"] == -signal.SIGKILL, killed
        resumed = run([sys.executable, "-m", "secateurs", *argv, "--resume"], threads=args.threads)
        check(resumed, "resumed run")
        same = content_hash(out) == content_hash(whole["out"])
        print(
            f"{'sparsegpt, SIGKILL after layer ' + str(stop) + ', resumed':34s} killed at {killed['seconds']:.1f} s, "
            f"resumed in {resumed['seconds']:.1f} s (whole run {whole['seconds']:.1f} s); output content "
            f"{content_hash(out)} vs {content_hash(whole['out'])}: identical {same}"
        )
        figures["resume"] = {
            "killed_after_layer": stop,
            "killed_seconds": killed["seconds"],
            "resumed_seconds": resumed["seconds"],
            "whole_seconds": whole["seconds"],
            "identical": same,
        }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
