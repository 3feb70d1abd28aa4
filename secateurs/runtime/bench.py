"""``secateurs bench DIR``: tokens per second of the sparse model against the same model dense, in one process.

Both models have the same weights, dtype and threads. Measured, dense and sparse interleaved, median of repeats:

- **decode**: N greedy steps with the KV cache after the prompt (a loop over ``model(token, cache=...)``),
  the N - 1 steps after the prefill timed, (N - 1) · batch tokens over their time; the tokens of ``generate``
  (``min_new_tokens = max_new_tokens``, no sampling) of both models are compared;
- **prefill**: one forward pass over batch × prompt-len tokens;
- **per shape**: each weight shape's multiplication, our kernel against ``F.linear`` with the dense weight, at the
  decode batch and at prefill length;
- **memory**: bytes of weights each model holds, and the RSS each one added when loaded;
- **bandwidth bound**: decoding reads every weight once per step, so tokens/s <= streaming read bandwidth
  (measured here, ``sum`` over a large buffer) × batch / weight bytes per step (the embedding table counts only
  when it is also the LM head; the KV cache is left out).

The measuring tools themselves (timing, byte accounting, decoding loops) are in :mod:`secateurs.runtime.timing`.

On CUDA (``--device cuda``) the sparse model is the 2:4 semi-structured one of :mod:`secateurs.runtime.cuda`.
"""

from __future__ import annotations

import gc
import logging
import statistics
from functools import partial
from pathlib import Path

import torch

from secateurs import loading
from secateurs.errors import SecateursError
from secateurs.format.sparse import dtype_name
from secateurs.measure import cpu_info, versions
from secateurs.models import default_device, load_model, resolve_dtype
from secateurs.runtime import kernels, timing
from secateurs.runtime.activation import check_sparsity, sparsify_activations
from secateurs.runtime.cuda import to_semi_structured
from secateurs.runtime.decode import LeanDecoder, lean_loop_seconds, why_not
from secateurs.runtime.fused import fuse_shared_inputs
from secateurs.runtime.linear import (
    HEADS,
    SparseLinear,
    kernel_head,
    load_sparse,
    torch_threads,
    use_int8_activations,
)

log = logging.getLogger(__name__)


def _int8(model) -> bool:
    return any(isinstance(m, SparseLinear) and m.packed.dtype == torch.int8 for m in model.modules())


def _load_pair(
    folder: Path,
    dtype,
    device: torch.device,
    min_sparsity: float | None,
    dense_dtype=None,
    head=None,
    activation=None,
    fuse: bool = True,
    int8_activations: bool = False,
):
    """(models by name, tokenizer, rss added by each, conversion summary); the models are ``dense`` and ``sparse``,
    and with ``activation`` (the sparse model's activation sparsity) also ``weights_only``, the same sparse weights
    without it. ``dense_dtype``: the dense model's dtype (default: the sparse one's; bfloat16 against int8
    values)."""

    def dense_load(want=None):
        if loading.is_sparse_folder(folder):
            model = loading.load_pruned(folder, dtype)[0]
        else:
            model = load_model(str(folder), dtype or "auto")[0]
        return model if want is None else model.to(want)

    if device.type == "cuda":  # memory: what each model added to the CUDA allocator
        before = torch.cuda.memory_allocated(device)
        sparse = dense_load().to(device, dtype or torch.bfloat16)
        summary = to_semi_structured(sparse)
        gc.collect()
        middle = torch.cuda.memory_allocated(device)
        dense = dense_load().to(device, dtype or torch.bfloat16)
        added = {"sparse": middle - before, "dense": torch.cuda.memory_allocated(device) - middle}
        return {"dense": dense, "sparse": sparse}, None, added, summary
    # one-time costs (the model's modules imported, the tokenizer) before memory is counted
    loading.empty_model(folder, torch.float32)
    loading.load_tokenizer(folder)

    def sparse_load(with_activation: bool):
        model, tokenizer = load_sparse(folder, dtype=dtype, min_sparsity=min_sparsity, fuse=False)
        int8 = _int8(model)
        if dtype is None and int8:
            model.to(torch.bfloat16)  # int8 values run with bf16 activations (the codes stay int8)
        if head is not None:  # after the dtype is settled: a head kept as it is runs in the model's dtype
            kernel_head(model, "int8" if head == "int8" else None)
        summary = None
        if with_activation:
            summary = sparsify_activations(model, activation, tokenizer, kernel=True)
        if int8_activations:
            use_int8_activations(model)
        if fuse:
            fuse_shared_inputs(model)
        return model, tokenizer, int8, summary

    rss = timing.rss()
    sparse, tokenizer, int8, act_summary = sparse_load(activation is not None)
    rss_sparse = timing.rss() - rss
    if dense_dtype is None and int8:
        dense_dtype = torch.bfloat16  # int8 values are measured against what a user would run dense instead
    rss = timing.rss()
    dense = dense_load(dense_dtype)
    rss_dense = timing.rss() - rss
    converted = len(timing.kernel_linears(sparse))
    if not converted:
        raise SecateursError(f"{folder}: no linear is sparse enough to run on the sparse kernel")
    models = {"dense": dense, "sparse": sparse}
    rss = {"sparse": rss_sparse, "dense": rss_dense}
    summary = {"converted": converted}
    if activation is not None:  # the same sparse weights without activation sparsity, to compare with
        rss_before = timing.rss()
        models["weights_only"] = sparse_load(False)[0]
        rss["weights_only"] = timing.rss() - rss_before
        summary["activation"] = act_summary
    return models, tokenizer, rss, summary


def benchmark(
    folder: str | Path,
    *,
    tokens: int = 32,
    prompt_len: int = 64,
    batch: int = 1,
    threads: int | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    repeat: int = 3,
    min_sparsity: float | None = None,
    micro: bool = True,
    seed: int = 0,
    sparse_torch_threads: int | None = 1,
    dense_dtype: str | torch.dtype | None = None,
    head: str | None = "auto",
    activation_sparsity=None,
    fuse: bool = True,
    decoder: str = "auto",
    int8_activations: bool = False,
) -> dict:
    """Measure decode and prefill tokens/s of the sparse and the dense model of ``folder``; see the module doc.

    ``dense_dtype``: the dtype of the dense model compared against (default: the sparse model's, and bfloat16
    when the sparse folder holds int8 values, whose sparse model then runs bfloat16 activations too unless
    ``dtype`` says otherwise). ``head="kernel"``: the sparse model's LM head on the kernel's threads as it is;
    ``"int8"``: as int8 rows (and a tied plain embedding too), see :func:`secateurs.runtime.linear.kernel_head`;
    ``"torch"`` (or None): left to torch; ``"auto"`` (default): the kernel on the CPU, torch on cuda, as the
    command line does. ``activation_sparsity``: the sparse model
    also skips that fraction of each linear's inputs (:func:`secateurs.runtime.activation.sparsify_activations`),
    and the same sparse weights without it are measured too (``weights_only``). ``fuse``: the sparse linears
    that share an input run as one kernel call (:func:`secateurs.runtime.fused.fuse_shared_inputs`).
    ``decoder``: the loop both models decode in: ``lean`` (:class:`secateurs.runtime.decode.LeanDecoder`, for
    Llama-family models at batch 1), ``hf`` (the model's own forward with transformers' KV cache) or ``auto``
    (lean where it runs, else hf). ``int8_activations``: the sparse model's int8-valued linears (and an int8 head)
    take their inputs quantised to int8 and multiply by integer dot products
    (:func:`secateurs.runtime.linear.use_int8_activations`)."""
    if tokens < 2 or prompt_len < 1 or batch < 1 or repeat < 1:
        raise SecateursError("need --tokens >= 2, --prompt-len >= 1, --batch >= 1 and --repeat >= 1")
    if decoder not in DECODERS:
        raise SecateursError(f"--decoder must be one of {', '.join(DECODERS)}, not {decoder!r}")
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise SecateursError(f"{folder} is not a model folder (no config.json)")
    device = default_device(device)
    head = head_choice(head, device)
    if head is not None and device.type != "cpu":
        raise SecateursError(f"--head {head} runs on the CPU kernel: use --device cpu")
    if activation_sparsity is not None:
        check_sparsity(activation_sparsity)
        if device.type != "cpu":
            raise SecateursError("--activation-sparsity runs on the CPU kernel: use --device cpu")
    dtype = resolve_dtype(dtype)
    dtype = None if dtype == "auto" else dtype
    if threads is not None:
        if threads < 1:
            raise SecateursError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    kernels.set_num_threads(threads)
    dense_dtype = resolve_dtype(dense_dtype)
    dense_dtype = None if dense_dtype == "auto" else dense_dtype
    bandwidth = timing.read_bandwidth(device=device)
    models, _, rss, conversion = _load_pair(
        folder, dtype, device, min_sparsity, dense_dtype, head, activation_sparsity, fuse, int8_activations
    )
    sparse, dense = models["sparse"], models["dense"]
    dtype = next(sparse.parameters()).dtype
    values = sorted({dtype_name(m.packed.dtype) for m in timing.kernel_linears(sparse)})
    vocab = dense.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(device)
    # torch's own threads while each model runs: the sparse model's linears run on the kernel's threads, and
    # torch's idle OpenMP workers spinning between ops would take the cores the kernel needs
    own_threads = {name: sparse_torch_threads or torch.get_num_threads() for name in models}
    own_threads["dense"] = torch.get_num_threads()
    if device.type != "cpu":
        own_threads["sparse"] = own_threads["dense"]
    used, loops = _decode_loops(models, decoder, batch, prompt_len + tokens, device)
    for name, loop in loops.items():  # warm-up: first calls allocate caches and pick kernels
        with torch_threads(own_threads[name]):
            loop(ids, 2)
    decode = {name: [] for name in models}
    prefill = {name: [] for name in models}
    outputs = {}
    for name, loop in loops.items():
        with torch_threads(own_threads[name]):
            outputs[name] = loop(ids, tokens)[1]
    for _ in range(repeat):
        for name, model in models.items():
            with torch_threads(own_threads[name]):
                decode[name].append(loops[name](ids, tokens)[0])
                prefill[name].append(timing.prefill_seconds(model, ids, device))
    result = {
        "model": str(folder),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "dense_dtype": str(next(dense.parameters()).dtype).removeprefix("torch."),
        "sparse_values": values or None,
        "sparse_head": head or "as stored",
        "int8_activations": ("vnni" if kernels.vnni_available() else "float kernel") if int8_activations else None,
        "fused_shared_inputs": fuse and device.type == "cpu",
        "threads": torch.get_num_threads(),
        "kernel_threads": kernels.num_threads(),
        "sparse_torch_threads": own_threads["sparse"],
        "kernel_isa": kernels.isa() if device.type == "cpu" else "semi-structured 2:4",
        "decoder": used,
        "protocol": f"batch {batch}, random prompt of {prompt_len} tokens (seed {seed}), greedy KV-cache decode "
        f"of {tokens} tokens in the {used} loop (the {tokens - 1} steps after the prefill timed); "
        "prefill = one forward pass; "
        f"median of {repeat}, dense and sparse interleaved"
        + (
            f"; sparse = weights + activation sparsity {activation_sparsity}, weights_only = the same weights without"
            if activation_sparsity is not None
            else ""
        ),
        "read_bandwidth_gbps": bandwidth / 1e9,
        "cpu": cpu_info(),
        "conversion": conversion,
        "same_tokens": bool(torch.equal(outputs["dense"], outputs["sparse"])),
        "versions": versions(),
    }

    def packed_bytes_per_weight(model):
        linears = timing.kernel_linears(model)
        if not linears:  # nothing on the kernel (a dense folder's weights without activation sparsity)
            return next(model.parameters()).element_size()
        numel = sum(m.out_features * m.in_features for m in linears)
        return sum(m.packed.nbytes for m in linears) / max(numel, 1)

    bytes_per_weight = {name: packed_bytes_per_weight(model) for name, model in models.items() if name != "dense"}
    bytes_per_weight["dense"] = next(dense.parameters()).element_size()
    for name, model in models.items():
        per_step = timing.step_bytes(model)
        result[name] = {
            "linear_bytes_per_weight": bytes_per_weight[name],
            "decode_tokens_per_s": (tokens - 1) * batch / statistics.median(decode[name]),
            "prefill_tokens_per_s": prompt_len * batch / statistics.median(prefill[name]),
            "weight_bytes": timing.weight_bytes(model),
            "memory_added_bytes": rss[name],  # RSS on CPU, CUDA allocator on GPU
            "bytes_per_decode_step": per_step,
            "bandwidth_bound_tokens_per_s": bandwidth * batch / per_step,
        }
    llc = result["cpu"]["last_level_cache_bytes"]
    for name in models:  # whether a decode step's weights could stay in the last-level cache between steps
        result[name]["fits_last_level_cache"] = None if not llc else result[name]["bytes_per_decode_step"] <= llc
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "bandwidth_bound_tokens_per_s"):
        result[f"speedup_{key.removesuffix('_tokens_per_s')}"] = result["sparse"][key] / result["dense"][key]
    if "weights_only" in models:  # what the activation sparsity adds on top of the weight sparsity
        result["activation_sparsity"] = activation_sparsity
        for key in ("decode", "prefill"):
            result[f"speedup_{key}_vs_weights_only"] = (
                result["sparse"][f"{key}_tokens_per_s"] / result["weights_only"][f"{key}_tokens_per_s"]
            )
    if micro and device.type == "cpu":
        result["shapes"] = timing.microbench(sparse, dtype, batch, batch * prompt_len)
    return result


def _cpu_line(r: dict) -> str:
    cpu = r.get("cpu") or {}
    caches = ", ".join(
        f"{level} {c['bytes'] / 2**20:g} MiB" for level, c in sorted(cpu.get("caches", {}).items()) if c.get("bytes")
    )
    fits = {name: r[name].get("fits_last_level_cache") for name in ("dense", "sparse")}
    said = ", ".join(f"{name} {'fits' if f else 'does not fit'}" for name, f in fits.items() if f is not None)
    return f"cpu: {cpu.get('model')} ({cpu.get('cpus')} CPUs; {caches or 'caches unknown'})" + (
        f"; a decode step's weights vs the last-level cache: {said}" if said else ""
    )


DECODERS = ("auto", "lean", "hf")


def _decode_loops(models: dict, decoder: str, batch: int, max_len: int, device) -> tuple[str, dict]:
    """(the loop used, "lean" or "hf"; name -> callable(ids, tokens) -> (seconds of the steps, new tokens)): the
    same loop for every model."""
    if batch > 1:
        reason = "it decodes one sequence, not a batch"
    elif torch.device(device).type != "cpu":
        reason = "it runs on the CPU here"
    else:
        reason = next(filter(None, (why_not(m) for m in models.values())), None)
    if decoder == "lean" and reason:
        raise SecateursError(f"--decoder lean: {reason}")
    if decoder == "hf" or reason:
        if decoder == "auto":
            log.info("decode loop: transformers' forward (%s)", reason)
        return "hf", {name: partial(timing.decode_loop, model, device=device) for name, model in models.items()}
    return "lean", {name: partial(lean_loop_seconds, LeanDecoder(model, max_len)) for name, model in models.items()}


def format_table(r: dict) -> str:
    """The result of :func:`benchmark` as a few readable lines."""
    lines = [
        f"{r['model']}: {r['device']} {r['dtype']}, {r['threads']} threads, kernel {r['kernel_isa']} "
        f"({r['kernel_threads']} threads; torch {r.get('sparse_torch_threads', r['threads'])} while sparse runs)",
        f"sparse values {', '.join(r.get('sparse_values') or ['-'])} against dense {r.get('dense_dtype', r['dtype'])}"
        + (
            f"; linear weights {r['sparse']['linear_bytes_per_weight']:.3f} vs "
            f"{r['dense']['linear_bytes_per_weight']:.0f} bytes per weight"
            if "linear_bytes_per_weight" in r.get("sparse", {})
            else ""
        )
        + (f"; int8 activations ({r['int8_activations']})" if r.get("int8_activations") else ""),
        f"protocol: {r['protocol']}",
        _cpu_line(r),
        f"read bandwidth {r['read_bandwidth_gbps']:.1f} GB/s; greedy tokens identical: {r['same_tokens']}",
        "",
        f"{'':8}{'decode tok/s':>14}{'bound tok/s':>13}{'prefill tok/s':>15}{'weights MB':>12}{'added MB':>9}"
        f"{'MB/step':>9}",
    ]
    for name in ("dense", "sparse", "weights_only"):
        if name not in r:
            continue
        m = r[name]
        rss = f"{m['memory_added_bytes'] / 1e6:.0f}"
        lines.append(
            f"{name[:8]:8}{m['decode_tokens_per_s']:>14.2f}{m['bandwidth_bound_tokens_per_s']:>13.1f}"
            f"{m['prefill_tokens_per_s']:>15.1f}{m['weight_bytes'] / 1e6:>12.1f}{rss:>9}"
            f"{m['bytes_per_decode_step'] / 1e6:>9.1f}"
        )
    lines.append(
        f"{'sparse/dense':14}{r['speedup_decode']:>8.2f}x{r['speedup_bandwidth_bound']:>12.2f}x"
        f"{r['speedup_prefill']:>14.2f}x"
    )
    if "speedup_decode_vs_weights_only" in r:
        act = r["conversion"]["activation"]
        lines.append(
            f"activation sparsity {act['target']} ({act['linears']} linears; "
            f"{100 * act['measured_on_first_window']:.1f}% of inputs skipped on calibration text): decode "
            f"{r['speedup_decode_vs_weights_only']:.2f}x, prefill {r['speedup_prefill_vs_weights_only']:.2f}x "
            "the same weights without it"
        )
    if r.get("shapes"):
        lines += [
            "",
            f"{'shape':>12}{'count':>6}{'density':>8}  {'decode us (dense/sparse)':>26}  "
            f"{'GB/s sparse':>11}  {'prefill ms (dense/sparse)':>27}",
        ]
        for s in r["shapes"]:
            d, p = s["decode"], s["prefill"]
            lines.append(
                f"{'x'.join(map(str, s['shape'])):>12}{s['count']:>6}{s['density']:>8.3f}  "
                f"{d['dense_s'] * 1e6:>9.1f} / {d['sparse_s'] * 1e6:>7.1f} {d['speedup']:>5.2f}x  "
                f"{d['sparse_gbps']:>11.1f}  "
                f"{p['dense_s'] * 1e3:>9.2f} / {p['sparse_s'] * 1e3:>7.2f} {p['speedup']:>5.2f}x"
            )
    return "\n".join(lines)


def add_parser(subparsers, name: str) -> None:
    """``secateurs bench DIR``: decode and prefill tokens/s of the sparse model vs the same model dense."""
    p = subparsers.add_parser(
        name,
        help="tokens/s of a pruned model on the sparse kernel vs dense, in the same process",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    p.add_argument("model", metavar="DIR", help="a sparse checkpoint or a pruned Hugging Face folder")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per greedy decode (default 32)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens, also the prefill length (default 64)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--threads", type=int, default=None, help="threads for torch and the kernel (default: torch's)")
    p.add_argument("--dtype", default="auto", help="auto (as stored), float32 or bfloat16")
    p.add_argument(
        "--dense-dtype",
        default="auto",
        help="the dense model compared against: auto (the sparse model's dtype; bfloat16 for int8 values), "
        "float32 or bfloat16",
    )
    p.add_argument("--device", default="cpu", help="cpu (sparse kernel) or cuda (2:4 semi-structured)")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats, median reported (default 3)")
    p.add_argument("--min-sparsity", type=float, default=None, help="linears less sparse than this stay dense")
    p.add_argument(
        "--head",
        choices=["auto", *HEADS, "torch"],
        default="auto",
        help="the sparse model's LM head: on the kernel's threads as it is (kernel: torch runs on one thread while "
        "the sparse model decodes), as int8 rows there (int8, a tied embedding too), or left to torch (torch); "
        "auto (default): kernel on the CPU, torch on cuda",
    )
    p.add_argument(
        "--activation-sparsity",
        type=float,
        default=None,
        metavar="S",
        help="the sparse model also skips this fraction of each linear's inputs (thresholds calibrated on bundled "
        "text); the same weights without it are measured too",
    )
    p.add_argument(
        "--int8-activations",
        action="store_true",
        help="int8 values only: the sparse model's linears (and an int8 head) quantise their inputs to int8, one "
        "scale per 64, and multiply by integer dot products (AVX-512 VNNI). Its perplexity: eval DIR "
        "--int8-activations --dtype bfloat16 measures the model bench runs with --dtype bfloat16 --head int8",
    )
    p.add_argument("--no-micro", action="store_true", help="skip the per-shape microbenchmarks")
    p.add_argument(
        "--decoder",
        choices=DECODERS,
        default="auto",
        help="decode loop of both models: lean (a Llama-family loop with about half of transformers' operator "
        "calls; batch 1), hf (the model's own forward), auto (lean where it runs; default)",
    )
    p.add_argument(
        "--sparse-torch-threads",
        type=int,
        default=1,
        metavar="N",
        help="torch's own threads while the sparse model runs (its sparse linears use the kernel's --threads); "
        "default 1, so idle torch workers do not spin on the kernel's cores; 0 = same as --threads",
    )
    p.add_argument(
        "--no-fuse",
        action="store_true",
        help="run every sparse linear in a call of its own (default: the linears that share an input, q/k/v and "
        "gate/up, run as one call)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no log lines")
    p.set_defaults(run=_run)


def head_choice(head: str | None, device) -> str | None:
    """The sparse model's head as the benchmark runs it: ``"kernel"`` or ``"int8"``, or None for torch.

    ``"auto"`` is the kernel on the CPU and torch on cuda; ``"torch"`` and None are torch."""
    if head == "auto":
        head = "torch" if str(device).startswith("cuda") else "kernel"
    if head not in (None, "torch", *HEADS):
        raise SecateursError(f"head must be one of auto, {', '.join(HEADS)} or torch, not {head!r}")
    return None if head == "torch" else head


def _run(args) -> dict:
    result = benchmark(
        args.model,
        tokens=args.tokens,
        prompt_len=args.prompt_len,
        batch=args.batch,
        threads=args.threads,
        dtype=args.dtype,
        device=args.device,
        repeat=args.repeat,
        min_sparsity=args.min_sparsity,
        micro=not args.no_micro,
        sparse_torch_threads=args.sparse_torch_threads,
        dense_dtype=args.dense_dtype,
        head=args.head,
        activation_sparsity=args.activation_sparsity,
        fuse=not args.no_fuse,
        decoder=args.decoder,
        int8_activations=args.int8_activations,
    )
    if not args.json:
        print(format_table(result))
    return result
