"""Decode speed where the weights cannot stay in cache: a random-weight LLaMA-shaped model several times larger
than the last-level cache, pruned by magnitude, sparse kernel against dense.

Random weights are fine for speed (the kernel's work depends on the mask density and shapes, not the values) and
say nothing about quality. Protocol (printed with the figures): a LlamaConfig of ``--layers`` layers, hidden size
``--hidden``, MLP ``--intermediate``, ``--heads`` heads, vocabulary 49152 (no tied embeddings), initialised by
transformers with seed 0; every decoder linear pruned to ``--sparsity`` by magnitude per matrix; saved with
``save_sparse``; then ``secateurs.runtime.bench.benchmark`` of that folder in fp32 and bf16 (batch 1, random
64-token prompt, 32 greedy tokens, median of ``--repeat``, dense and sparse interleaved in one process). The
default shape is 1.9 GB of fp32 weights.

    python benchmarks/large_llama.py                      # 28 layers, hidden 1024, MLP 4096: ~2.3 GB fp32
    python benchmarks/large_llama.py --dtypes float32 --json benchmarks/results/large_llama.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import transformers

from secateurs.checkpoint import save_sparse
from secateurs.measure import versions
from secateurs.models import decoder_linears, weight_view
from secateurs.runtime import bench


def build(args) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for module in decoder_linears(model).values():
            W = weight_view(module)
            k = int(round(args.sparsity * W.numel()))
            if k:
                cut = W.abs().flatten().kthvalue(k).values
                W[W.abs() <= cut] = 0
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = build(args)
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "large"
        tokenizer = None
        save_sparse(model, tokenizer, folder, progress=False)
        del model
        for dtype in args.dtypes.split(","):
            r = bench.benchmark(folder, dtype=dtype, repeat=args.repeat, threads=args.threads, micro=False)
            llc = r["cpu"]["last_level_cache_bytes"]
            print(
                f"{dtype}: decode dense {r['dense']['decode_tokens_per_s']:.2f} tok/s, sparse "
                f"{r['sparse']['decode_tokens_per_s']:.2f} ({r['speedup_decode']:.2f}x; bandwidth bound "
                f"{r['speedup_bandwidth_bound']:.2f}x); prefill {r['speedup_prefill']:.2f}x; read bandwidth "
                f"{r['read_bandwidth_gbps']:.1f} GB/s; dense streams "
                f"{r['dense']['bytes_per_decode_step'] * r['dense']['decode_tokens_per_s'] / 1e9:.1f} GB/s, sparse "
                f"{r['sparse']['bytes_per_decode_step'] * r['sparse']['decode_tokens_per_s'] / 1e9:.1f} GB/s; "
                f"weights per step {r['dense']['bytes_per_decode_step'] / 1e6:.0f} / "
                f"{r['sparse']['bytes_per_decode_step'] / 1e6:.0f} MB"
                + (f" ({r['dense']['bytes_per_decode_step'] / llc:.0f}x / " if llc else "")
                + (f"{r['sparse']['bytes_per_decode_step'] / llc:.0f}x the last-level cache)" if llc else ""),
                flush=True,
            )
            results.append({k: r[k] for k in r if k != "shapes"})
    print(
        f"protocol: random LLaMA, {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, "
        f"{weight_bytes / 1e9:.2f} GB fp32, magnitude {args.sparsity:.0%} per matrix; {results[0]['protocol']}; "
        f"cpu {results[0]['cpu'].get('model')}, {results[0]['threads']} threads"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"runs": results, "versions": versions()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
