"""Time per call of the packed sparse matmul against dense ``F.linear`` on SmolLM2-135M's linear shapes.

Protocol (printed with the table): random weights pruned to exactly the given sparsity per row; for each shape,
dtype (weights and activations alike), sparsity and batch, our ``spmm`` and torch's dense ``F.linear`` are timed in
the same run, interleaved, each as the median over repeats of a pass over enough distinct copies of the weights to
exceed the last-level cache (``--cold-mb``), so that decode reads its weights from memory as it does in a model.
Prefill batches use fewer copies (they are compute-bound). ``ratio`` = dense time / our time (> 1: we are faster);
GB/s = weight bytes read per second (packed values + mask for ours, the dense matrix for torch). The ``layer``
shape is the seven linears of one decoder layer called in turn (q, k, v, o, gate, up, down).

    python benchmarks/kernel_shapes.py                      # the full grid, torch.get_num_threads() threads
    python benchmarks/kernel_shapes.py --threads 1 --batches 1 --json out.json

``--prefill`` times one weight at a time (no copies: prefill is compute-bound) at prefill token counts, on
SmolLM2's shapes and the fused groups a model on the kernel multiplies as one (q+k+v 960x576, gate+up 3072x576),
with random unstructured masks (exactly the given sparsity per row): dense ``F.linear`` on the dense weight against
``spmm`` as it dispatches (``auto``) and, with ``--paths``, forced onto each of its prefill paths (``outer``: the
AVX-512 outer-product kernel; ``block``: the inner-product kernel; ``tiled``: decompress + dense matmul). Each
is timed interleaved with the others, median of ``--repeats`` (>= 7 advised) wall-clock repeats.

    python benchmarks/kernel_shapes.py --prefill --threads 1 --paths auto outer block tiled
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from secateurs.runtime import kernels

# SmolLM2-135M: hidden 576, 9 query heads and 3 key/value heads of 64, MLP 1536; weights are [out, in]
SHAPES = {
    "q/o 576x576": [(576, 576)],
    "k/v 192x576": [(192, 576)],
    "gate/up 1536x576": [(1536, 576)],
    "down 576x1536": [(576, 1536)],
    "layer": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def pruned(out: int, cols: int, sparsity: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A random weight with exactly floor(cols * sparsity) zeros in every row (as Wanda leaves it)."""
    weight = torch.randn(out, cols, generator=gen)
    drop = torch.rand(out, cols, generator=gen).argsort(dim=1)[:, : int(cols * sparsity)]
    weight.scatter_(1, drop, 0.0)
    return weight.to(dtype)


def _passes(fn, min_seconds: float) -> int:
    fn()  # warm-up: first touch, thread pool start
    start = time.perf_counter()
    fn()
    return max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-9)))


def per_call_seconds(fns, calls: int, repeats: int, min_seconds: float) -> list[float]:
    """For each fn: median over repeats of the seconds per call of ``passes`` passes (>= min_seconds a repeat).

    The fns take turns inside every repeat, so a change in machine load hits them alike.
    """
    passes = [_passes(fn, min_seconds) for fn in fns]
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for fn, n, out in zip(fns, passes, samples, strict=True):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            out.append((time.perf_counter() - start) / (n * calls))
    return [statistics.median(s) for s in samples]


def bench_case(shapes, dtype, sparsity, batch, cold_bytes, repeats, min_seconds, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dense_bytes = sum(o * i for o, i in shapes) * torch.tensor([], dtype=dtype).element_size()
    copies = max(1, math.ceil(cold_bytes / dense_bytes)) if batch <= 8 else 2
    dense = [[pruned(o, i, sparsity, dtype, gen) for o, i in shapes] for _ in range(copies)]
    packed = [[kernels.pack(w) for w in layer] for layer in dense]
    xs = {i: torch.randn(batch, i, generator=gen).to(dtype) for _, i in shapes}
    calls = copies * len(shapes)

    def ours():
        for layer in packed:
            for p in layer:
                kernels.spmm(xs[p.shape[1]], p)

    def theirs():
        for layer in dense:
            for w in layer:
                F.linear(xs[w.shape[1]], w)

    t_ours, t_dense = per_call_seconds([ours, theirs], calls, repeats, min_seconds)
    sparse_bytes = sum(p.nbytes for p in packed[0])
    return {
        "shape": shapes,
        "copies": copies,
        "us_ours": t_ours * len(shapes) * 1e6,
        "us_dense": t_dense * len(shapes) * 1e6,
        "ratio": t_dense / t_ours,
        "gbps_ours": sparse_bytes / (t_ours * len(shapes)) / 1e9,
        "gbps_dense": dense_bytes / (t_dense * len(shapes)) / 1e9,
        "bytes_ours": sparse_bytes,
        "bytes_dense": dense_bytes,
    }


PREFILL_SHAPES = {
    "q/o 576x576": (576, 576),
    "k/v 192x576": (192, 576),
    "gate/up 1536x576": (1536, 576),
    "down 576x1536": (576, 1536),
    "q+k+v 960x576": (960, 576),
    "gate+up 3072x576": (3072, 576),
}
PATHS = ("auto", "outer", "block", "tiled")
NEVER = 1 << 30


def _forced(path: str, fn):
    """fn run with spmm forced onto ``path`` (settings restored after)."""
    if path == "auto":
        return fn
    outer, prefill = {"outer": (1, NEVER), "block": (NEVER, NEVER), "tiled": (NEVER, 1)}[path]

    def run():
        kernels.set_outer_rows(outer)
        kernels.set_prefill_rows(prefill)
        try:
            fn()
        finally:
            kernels.set_outer_rows(None)
            kernels.set_prefill_rows(None)

    return run


def auto_path(tokens: int, dtype: torch.dtype, packed: kernels.PackedWeight) -> str:
    """The path spmm's dispatch takes for a sparse (not full) weight in the row layout."""
    if kernels.isa() == "torch":
        return "torch"
    if tokens >= kernels.prefill_rows(kernels._tiles_key(dtype, packed.dtype), packed.density):
        return "tiled"
    return "outer" if kernels.isa() == "avx512" and tokens >= kernels.outer_rows() else "block"


def prefill_case(shape, dtype, sparsity, tokens, paths, repeats, min_seconds, values=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = pruned(*shape, sparsity, dtype, gen)
    packed = kernels.pack(weight, values)
    x = torch.randn(tokens, shape[1], generator=gen).to(dtype)
    fns = [lambda: F.linear(x, weight)] + [_forced(path, lambda: kernels.spmm(x, packed)) for path in paths]
    times = per_call_seconds(fns, 1, repeats, min_seconds)
    row = {"us_dense": times[0] * 1e6, "auto": auto_path(tokens, dtype, packed)}
    for path, t in zip(paths, times[1:], strict=True):
        row[f"us_{path}"] = t * 1e6
        row[f"ratio_{path}"] = times[0] / t
    return row


def prefill_main(args, threads: int) -> None:
    outer, rows = kernels.outer_rows(), kernels.PREFILL_ROWS

    def tiles(dtype):
        return ", ".join(
            f"<= {density:g} stored: {'never' if n == kernels.NEVER else f'from {n}'}"
            for density, n in kernels.OUTER_PREFILL_ROWS[dtype]
        )

    print(f"# CPU {cpu_name()}; kernel path {kernels.isa()}; {threads} thread(s); torch {torch.__version__}")
    print(
        f"# prefill protocol: one random weight per case, exact per-row sparsity (unstructured); x and weight in the "
        f"same dtype{' (int8 values)' if args.int8 else ''}; dense F.linear and spmm's paths interleaved, median "
        f"of {args.repeats} wall-clock repeats of >= {args.min_seconds:g} s; ratio = dense time / ours (> 1: "
        f"faster than dense); dispatch: on AVX-512 outer products from {outer} tokens (bf16 x with bf16 or int8 "
        f"values: the bf16 pair form) and tiles in fp32 {tiles(torch.float32)}, in bf16 {tiles(torch.bfloat16)} "
        f"(int8 values: {tiles(torch.int8)}); "
        f"otherwise (denser, or without AVX-512) tiles from {rows[torch.float32]} (fp32) / "
        f"{rows[torch.bfloat16]} (bf16) tokens"
    )
    header = f"{'shape':18} {'dtype':5} {'sparsity':>8} {'tokens':>6} {'dense us':>9}"
    for path in args.paths:
        header += f" {path + ' us':>10} {'ratio':>6}"
    print(header + "  auto path")
    results = []
    for name in args.prefill_shapes:
        for dtype_name in args.dtypes:
            for sparsity in args.sparsities:
                for tokens in args.tokens:
                    row = prefill_case(
                        PREFILL_SHAPES[name],
                        DTYPES[dtype_name],
                        sparsity,
                        tokens,
                        args.paths,
                        args.repeats,
                        args.min_seconds,
                        "int8" if args.int8 else None,
                    )
                    row.update(name=name, dtype=dtype_name, sparsity=sparsity, tokens=tokens)
                    results.append(row)
                    line = f"{name:18} {dtype_name:5} {sparsity:8.2f} {tokens:6d} {row['us_dense']:9.1f}"
                    for path in args.paths:
                        line += f" {row[f'us_{path}']:10.1f} {row[f'ratio_{path}']:6.2f}"
                    print(line + f"  {row['auto']}", flush=True)
    if args.json:
        meta = {"cpu": cpu_name(), "isa": kernels.isa(), "threads": threads, "torch": torch.__version__}
        meta.update(int8=args.int8, outer_rows=outer)
        meta.update(outer_prefill_rows={str(k)[6:]: v for k, v in kernels.OUTER_PREFILL_ROWS.items()})
        meta.update(prefill_rows={k: rows[DTYPES[k]] for k in DTYPES})
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "prefill": results}, f, indent=1)


def call_overhead_us(repeats: int) -> dict:
    """Per-call cost on a tiny weight (8x16, batch 1): what ~210 calls a token pay on top of the work."""
    p = kernels.pack(torch.randn(8, 16))
    w = kernels.unpack(p)
    x = torch.randn(1, 16)
    n = 2000

    def loop(fn):
        return lambda: [fn() for _ in range(n)]

    ours, dense = per_call_seconds([loop(lambda: kernels.spmm(x, p)), loop(lambda: F.linear(x, w))], n, repeats, 0.05)
    return {"spmm": ours * 1e6, "F.linear": dense * 1e6}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), metavar="SHAPE")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 128, 512])
    parser.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    parser.add_argument("--isa", default=None, help="force a kernel path (avx512, avx2, scalar, torch)")
    parser.add_argument("--cold-mb", type=float, default=256, help="weights cycled per decode case (beyond the LLC)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=0.05, help="least time of one repeat")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--prefill", action="store_true", help="prefill token counts, one weight per case")
    parser.add_argument(
        "--prefill-shapes", nargs="+", default=list(PREFILL_SHAPES), choices=list(PREFILL_SHAPES), metavar="SHAPE"
    )
    parser.add_argument("--tokens", nargs="+", type=int, default=[64, 512], help="prefill token counts")
    parser.add_argument("--paths", nargs="+", default=["auto"], choices=PATHS, help="spmm paths timed (prefill)")
    parser.add_argument("--int8", action="store_true", help="prefill: int8 values (dense: the dtype's F.linear)")
    args = parser.parse_args()

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    kernels.set_num_threads(threads)
    kernels.set_isa(args.isa)
    if args.prefill:
        if "--sparsities" not in sys.argv:
            args.sparsities = [0.5, 0.7]
        if "--repeats" not in sys.argv:
            args.repeats = 7
        prefill_main(args, threads)
        return
    overhead = call_overhead_us(args.repeats)
    print(f"# CPU {cpu_name()}; kernel path {kernels.isa()}; {threads} thread(s); torch {torch.__version__}")
    print(
        f"# protocol: exact per-row sparsity; weights cycled over >= {args.cold_mb:g} MB per decode case (2 copies "
        f"for batch > 8); median of {args.repeats} repeats of >= {args.min_seconds:g} s; ours and dense interleaved"
    )
    ours, dense = overhead["spmm"], overhead["F.linear"]
    print(f"# per-call cost, 8x16 weight, batch 1: spmm {ours:.2f} us, F.linear {dense:.2f} us")
    header = f"{'shape':18} {'dtype':5} {'sparsity':>8} {'batch':>5} {'ours us':>10} {'dense us':>10} {'ratio':>6}"
    print(header + f" {'ours GB/s':>9} {'dense GB/s':>10}")
    results = []
    for name in args.shapes:
        for dtype_name in args.dtypes:
            for sparsity in args.sparsities:
                for batch in args.batches:
                    row = bench_case(
                        SHAPES[name],
                        DTYPES[dtype_name],
                        sparsity,
                        batch,
                        args.cold_mb * 2**20,
                        args.repeats,
                        args.min_seconds,
                    )
                    row.update(name=name, dtype=dtype_name, sparsity=sparsity, batch=batch)
                    results.append(row)
                    print(
                        f"{name:18} {dtype_name:5} {sparsity:8.2f} {batch:5d} {row['us_ours']:10.1f} "
                        f"{row['us_dense']:10.1f} {row['ratio']:6.2f} {row['gbps_ours']:9.1f} "
                        f"{row['gbps_dense']:10.1f}",
                        flush=True,
                    )
    if args.json:
        meta = {"cpu": cpu_name(), "isa": kernels.isa(), "threads": threads, "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "overhead_us": overhead, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
