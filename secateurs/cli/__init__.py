"""``secateurs prune | eval``: the command line."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from secateurs import data
from secateurs.cli.options import PAPER_HINT, add_common, add_eval, add_tasks, bos_choice
from secateurs.cli.stages import add_stage_choices, add_stage_settings, recipe_from_args
from secateurs.errors import Interrupted, SecateursError
from secateurs.evaluate.zeroshot import check_tasks, format_table
from secateurs.oneshot.allocations.table import Table

log = logging.getLogger("secateurs")

# Further subcommands: each module has add_parser(subparsers, name) (which sets the parser's ``run``
# default to a function args -> dict) and may reuse secateurs.cli.options.
_EXTRA_COMMANDS = {
    "sweep": "secateurs.cli.sweep",
    "report": "secateurs.cli.report",
    "compress": "secateurs.checkpoint",
    "bench": "secateurs.runtime.bench",
    "finetune": "secateurs.cli.finetune",
    "train": "secateurs.cli.train",
    "delta": "secateurs.cli.merge",
    "merge": "secateurs.cli.merge",
}


def _batch(text: str) -> int | str:
    """``--calibration-batch``: a positive integer or auto."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secateurs", description="Prune Hugging Face causal language models and measure what it cost."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model layer by layer on calibration text and save it", epilog=PAPER_HINT)
    p.add_argument(
        "model",
        nargs="?",
        default="smollm2-135m",
        help="hub id, local HF folder, .gguf file, or smollm2-135m (the bundled default)",
    )
    p.add_argument(
        "--recipe",
        default=None,
        metavar="FILE",
        help="start from a recipe file (.yaml/.yml or .json, or a report.json); flags given override it",
    )
    add_stage_choices(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--sparsity", type=float, default=None, help="unstructured sparsity in [0, 1) (default 0.5)")
    group.add_argument("--pattern", default=None, metavar="N:M", help="N:M sparsity, e.g. 2:4 (2 zeros in every 4)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave linears whose name matches dense (repeatable), e.g. '*.mlp.down_proj'",
    )
    p.add_argument(
        "--calibration",
        default="shakespeare",
        metavar="SOURCE",
        help="calibration text: bundled name (shakespeare, bible), .txt/.jsonl path, c4, wikitext2",
    )
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window, calibration and evaluation")
    p.add_argument("--seed", type=int, default=0)
    add_eval(p, "bible")
    p.add_argument("--no-dense-eval", action="store_true", help="skip the perplexity (and --tasks) of the dense model")
    add_tasks(p)
    add_stage_settings(p)
    p.add_argument("--output", "-o", default=None, metavar="DIR", help="where to save the pruned model")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output folder (and start a stopped run again)"
    )
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="stream the model from its safetensors shards one decoder layer at a time and write each as it is "
        "pruned (chosen by itself when the weights would not fit in the free memory); writes a sharded HF folder, "
        "or sparse shards with --save-format sparse or sparse-int8",
    )
    p.add_argument(
        "--offload-activations",
        action="store_true",
        help="on a GPU, keep the calibration hidden states in pinned CPU memory between layers (GPU memory then "
        "holds one layer and one window's activations)",
    )
    p.add_argument(
        "--calibration-batch",
        type=_batch,
        default=1,
        metavar="N|auto",
        help="calibration windows run through a layer at once (default 1; auto: as many as a quarter of the free "
        "memory holds); statistics are still summed window by window",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run stopped while writing --output (its finished layers are kept in OUTPUT.resume/), "
        "with the result an uninterrupted run gives; a different recipe, model or calibration is refused",
    )
    p.add_argument(
        "--save-format",
        choices=["hf", "sparse", "sparse-int8"],
        default="hf",
        help="hf: a plain Hugging Face folder; sparse: pruned linears as a 1-bit mask plus their non-zero values "
        "(load with secateurs.load_sparse or load_pruned); sparse-int8: the same with int8 values and per-row "
        "scales. With --low-memory each is written one shard per decoder layer (sparse: "
        "model-0000i-of-0000n.sparse.safetensors + model.sparse.safetensors.index.json)",
    )
    p.add_argument(
        "--int8-rounding",
        choices=["gptq", "nearest"],
        default="gptq",
        help="sparse-int8: choose the codes by GPTQ rounding against each pruned linear's inputs on the calibration "
        "windows (gptq, the default: one more pass over them) or round each weight to nearest (nearest; what a "
        "streamed prune does)",
    )
    add_common(p)

    p = sub.add_parser("eval", help="perplexity (paper protocol) and zero-shot accuracy (--tasks) of a model")
    p.add_argument("model", help="hub id, local HF folder (e.g. a pruned output), .gguf file, or smollm2-135m")
    p.add_argument("--seqlen", type=int, default=512)
    add_eval(p, "bible")
    add_tasks(p)
    p.add_argument(
        "--activation-sparsity",
        type=float,
        default=None,
        metavar="S",
        help="evaluate with this fraction of each linear's inputs (not the LM head's) thresholded to zero, "
        "thresholds calibrated on bundled text (as bench and load_sparse run it)",
    )
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="read the model one decoder layer at a time from its safetensors shards, or a sparse folder's: a "
        "model bigger than memory gets the same perplexity and, with --tasks (log-likelihood and multiple-choice "
        "tasks), the same accuracy",
    )
    p.add_argument(
        "--int8-activations",
        action="store_true",
        help="a sparse folder with int8 values only: measure it on the sparse kernel as bench and the decoder run "
        "it with --int8-activations --head int8 (load_sparse(DIR, head='int8', int8_activations=True)): every int8 "
        "linear and the LM head, held as int8 too, quantise their inputs to int8 (one scale per 64) and multiply "
        "by integer dot products (AVX-512 VNNI, else the float kernel on the same quantised inputs); on the CPU "
        "(--device auto means cpu here), in the stored dtype unless --dtype float32 or bfloat16 (--dtype bfloat16: "
        "the model of bench --dtype bfloat16 --head int8 --int8-activations); not with --low-memory or "
        "--activation-sparsity",
    )
    add_common(p)

    for name, module in _EXTRA_COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a command whose optional module is not installed
            if not exc.name or not module.startswith(exc.name):
                raise
            continue
        mod.add_parser(sub, name)
    return parser


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    if quiet:
        transformers.utils.logging.disable_progress_bar()


def _evaluate(model, tokenizer, args, label: str, streamed_from=None):
    """Perplexity of ``model``, or (``streamed_from``) of the folder's model read one decoder layer at a time."""
    from secateurs.api import evaluate, evaluate_streamed

    settings = dict(
        seqlen=args.seqlen, max_windows=args.eval_windows, bos=bos_choice(args.bos), progress=not args.quiet
    )
    if streamed_from is not None:
        result = evaluate_streamed(streamed_from, args.eval, dtype=args.dtype, device=args.device, **settings)
    else:
        result = evaluate(model, tokenizer, args.eval, **settings)
    log.info("%s perplexity %.3f  [%s]", label, result.perplexity, result.protocol)
    return result


def _zero_shot(model, tokenizer, args, label: str, streamed_from=None):
    """Accuracy of ``model``, or (``streamed_from``) of the folder's model read one decoder layer at a time."""
    from secateurs.evaluate.zeroshot import zero_shot
    from secateurs.oneshot.streamed_zeroshot import zero_shot_streamed

    settings = dict(limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size, progress=not args.quiet)
    if streamed_from is not None:
        result = zero_shot_streamed(streamed_from, args.tasks, dtype=args.dtype, device=args.device, **settings)
    else:
        result = zero_shot(model, tokenizer, args.tasks, **settings)
    log.info("%s accuracy in %.1f s  [%s]\n%s", label, result.seconds, result.protocol, result.table())
    return result


def _check_tasks(args, streamed: bool) -> list[str]:
    """The task names, checked before any work (for a streamed model: tasks it can score, a fixed batch size)."""
    if streamed:
        from secateurs.oneshot.streamed_zeroshot import check_options

        check_options(args.limit, args.num_fewshot, args.batch_size)
    return check_tasks(args.tasks, streamed=streamed)


def _streamed_folder(args):
    """The local folder to stream layer by layer (--low-memory, or weights larger than the free memory), or None."""
    from secateurs.models import resolve_folder
    from secateurs.oneshot.streaming import should_stream

    folder = resolve_folder(args.model)
    gguf = Path(args.model).expanduser()
    if args.low_memory and gguf.suffix == ".gguf" and gguf.is_file():
        return gguf  # dequantised tensor by tensor as the walk reaches each layer
    if args.low_memory:
        if folder is None:
            raise SecateursError(
                f"--low-memory streams a local Hugging Face folder of safetensors shards or a .gguf file; "
                f"{args.model} is neither"
            )
        return folder
    if folder is not None and should_stream(folder):
        log.info("%s would not fit in the free memory: streaming it layer by layer (as with --low-memory)", folder)
        return folder
    return None


def _check_room(model, output, progress_dir) -> None:
    """Refuse, before the walk, an output (and run state) that the disk has no room for."""
    from secateurs.format.folder import check_disk
    from secateurs.oneshot.moe import expert_linears
    from secateurs.oneshot.prune import linear_names

    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    linears = {**dict(model.named_modules()), **expert_linears(model)}  # MoE experts are views, not modules
    state = 0
    for name in linear_names(model):
        weight = linears[name].weight
        state += weight.numel() * weight.element_size()
    check_disk(output.parent, total + (1 << 20), "the pruned model")
    if progress_dir is not None:
        check_disk(progress_dir.parent, total + state + (1 << 20), "the pruned model and the run's progress")


def cmd_prune(args) -> dict:
    import contextlib

    import torch

    from secateurs.checkpoint import check_output, save_pruned
    from secateurs.data.calibration import Calibration
    from secateurs.models import default_device, load_model
    from secateurs.oneshot.distributed import join_from_environment
    from secateurs.oneshot.prune import check_recipe, prune

    recipe = recipe_from_args(args)
    calibration = Calibration(args.calibration, args.nsamples, args.seqlen, args.seed)
    ranks, device = join_from_environment(default_device(args.device))
    if not ranks.main:  # rank 0 speaks, evaluates and writes; the others prune their share of the windows
        logging.getLogger("secateurs").setLevel(logging.WARNING)
        args.quiet, args.eval, args.tasks = True, None, None
    output = check_output(args.output, args.overwrite) if args.output else None
    if output is None:
        log.warning("no --output: the pruned model will not be saved")
        if args.resume:
            raise SecateursError("--resume needs the --output of the stopped run")
    progress_dir = output.with_name(output.name + ".resume") if output else None
    if progress_dir and args.overwrite and not args.resume and ranks.main and progress_dir.exists():
        shutil.rmtree(progress_dir)
    streamed = _streamed_folder(args)
    if streamed is not None:
        if output is None:
            raise SecateursError("a streamed prune writes each layer as it goes: it needs --output")
    do_eval = args.eval and args.eval.lower() != "none"
    # fail on a bad source now, not after minutes of work
    if recipe.needs_calibration:
        data.describe_source(calibration.source)
    if do_eval:
        data.describe_source(args.eval)
    if args.tasks:
        args.tasks = _check_tasks(args, streamed is not None)
    if isinstance(recipe.allocation, Table):
        recipe.allocation.check_file()

    log.info("loading %s", args.model)
    t0 = time.perf_counter()
    writing = contextlib.nullcontext()
    if streamed is not None:
        from secateurs.oneshot.streaming import StreamedOutput, open_streamed

        model, tokenizer, shards = open_streamed(streamed, args.dtype)
        model_desc = f"{args.model} (streamed from {streamed})"
        writing = StreamedOutput(
            model, shards, tokenizer, output, overwrite=args.overwrite, write=ranks.main, save_format=args.save_format
        )
    else:
        model, tokenizer, model_desc = load_model(args.model, args.dtype)
    log.info("loaded in %.1f s: %s, %s", time.perf_counter() - t0, type(model).__name__, model.dtype)
    check_recipe(model, recipe)  # N:M widths and the like: before any forward pass
    if output is not None and ranks.main:
        _check_room(model, output, progress_dir)
    if device.type == "cuda" and streamed is None:
        model.to(device)
    if recipe.needs_calibration:
        calibration.windows(tokenizer)

    dense = _evaluate(model, tokenizer, args, "dense ", streamed) if do_eval and not args.no_dense_eval else None
    dense_acc = (
        _zero_shot(model, tokenizer, args, "dense ", streamed) if args.tasks and not args.no_dense_eval else None
    )
    log.info(
        "pruning: %s, %s, calibration %s (%d x %d tokens, seed %d)",
        recipe.label,
        recipe.pattern_name,
        calibration.source,
        calibration.nsamples,
        calibration.seqlen,
        calibration.seed,
    )
    with writing as residence:
        report = prune(
            model,
            recipe,
            calibration,
            tokenizer=tokenizer,
            device=device,
            progress=not args.quiet,
            checkpoint=progress_dir,
            resume=args.resume,
            residence=residence,
            offload_activations=args.offload_activations,
            calibration_batch=args.calibration_batch,
        )
        if ranks.several:
            log.info("pruned on %d processes (%s)", ranks.world, torch.distributed.get_backend())
        log.info(
            "pruned in %.1f s: sparsity %.4f over %d linears",
            report.prune_seconds,
            report.sparsity,
            len(report.linears),
        )
        if streamed is not None:  # the pruned model is read back from the output, layer by layer
            writing.save(report.masks)  # packed: 1 bit per weight in memory too
            pruned = _evaluate(None, None, args, "pruned", writing.folder) if do_eval else None
            pruned_acc = _zero_shot(None, None, args, "pruned", writing.folder) if args.tasks else None
        else:
            pruned = _evaluate(model, tokenizer, args, "pruned") if do_eval else None
            pruned_acc = _zero_shot(model, tokenizer, args, "pruned") if args.tasks else None

        out = {
            "model": model_desc,
            "dtype": str(model.dtype).replace("torch.", ""),
            "streamed": streamed is not None,
            **report.to_dict(),
            "perplexity": {
                "dense": dense.to_dict() if dense else None,
                "pruned": pruned.to_dict() if pruned else None,
            },
            "zero_shot": {
                "dense": dense_acc.to_dict() if dense_acc else None,
                "pruned": pruned_acc.to_dict() if pruned_acc else None,
            }
            if args.tasks
            else None,
            "output": str(output) if output else None,
        }
        if streamed is not None:
            if args.save_format == "sparse-int8":
                out["int8_rounding"] = "nearest"
                if args.int8_rounding == "gptq":
                    log.info("a streamed prune rounds int8 codes to nearest (GPTQ rounding needs the model in memory)")
            writing.save_report(out)
    codes = None
    if output and streamed is None and args.save_format == "sparse-int8":
        out["int8_rounding"] = args.int8_rounding
        if args.int8_rounding == "gptq":  # on every rank: each sums x xᵀ over its windows, then they are added up
            from secateurs.oneshot.quantize import int8_codes

            log.info("int8 codes by GPTQ rounding on the calibration windows")
            windows = calibration.windows(tokenizer)
            codes = int8_codes(model, windows[ranks.share(len(windows))], device, progress=not args.quiet)
    if output and ranks.main:
        if streamed is None:
            model.to(torch.device("cpu"))
            save_pruned(
                model,
                tokenizer,
                output,
                out,
                overwrite=args.overwrite,
                save_format=args.save_format,
                masks=report.mask_tensors(),
                int8_codes=codes,
                progress=not args.quiet,
            )
        log.info("saved to %s", output)
        shutil.rmtree(progress_dir, ignore_errors=True)
    if dense and pruned:
        log.info(
            "perplexity %.3f -> %.3f (%s, %s), %.1f s of pruning",
            dense.perplexity,
            pruned.perplexity,
            recipe.label,
            recipe.pattern_name,
            report.prune_seconds,
        )
    if dense_acc and pruned_acc:
        log.info("zero-shot accuracy, dense vs pruned:\n%s", format_table({"dense": dense_acc, "pruned": pruned_acc}))
    return out


def _int8_folder(args) -> Path:
    """``eval --int8-activations``: the sparse folder with int8 values to measure on the kernel, every option checked
    against it from the weights files' headers alone (nothing loaded)."""
    import torch

    from secateurs.dtypes import resolve_dtype
    from secateurs.format.sparse import is_sparse_folder, open_folder

    if args.low_memory or args.activation_sparsity is not None:
        raise SecateursError(
            "eval --int8-activations measures the whole model on the sparse kernel: not with "
            + ("--low-memory" if args.low_memory else "--activation-sparsity")
        )
    if args.device not in ("auto", "cpu"):
        raise SecateursError(
            f"eval --int8-activations runs on the CPU sparse kernel: use --device cpu, not {args.device}"
        )
    if resolve_dtype(args.dtype) not in ("auto", torch.float32, torch.bfloat16):
        raise SecateursError(f"eval --int8-activations runs float32 or bfloat16 activations, not {args.dtype}")
    folder = Path(args.model).expanduser()
    if not (folder / "config.json").is_file() or not is_sparse_folder(folder):
        raise SecateursError(
            f"eval --int8-activations measures a sparse folder with int8 values (prune --save-format sparse-int8, "
            f"compress --values int8); {args.model} is not a sparse folder"
        )
    values = {entry.get("dtype") for _, header in open_folder(folder).files for entry in header.packed.values()}
    if "int8" not in values:
        held = ", ".join(sorted(v for v in values if isinstance(v, str))) or "no packed"
        raise SecateursError(
            f"eval --int8-activations needs int8 values; {folder} holds {held} values "
            "(compress --values int8 makes an int8 copy)"
        )
    return folder.resolve()


def _eval_int8(args, folder: Path, do_eval: bool) -> dict:
    """The folder on the sparse kernel with int8 activations and an int8 head: what bench and the decoder run."""
    from secateurs.runtime import kernels
    from secateurs.runtime.linear import load_sparse
    from secateurs.runtime.modules import SparseLinear

    dtype = None if args.dtype == "auto" else args.dtype
    model, tokenizer = load_sparse(folder, dtype=dtype, head="int8", int8_activations=True)
    head = model.get_output_embeddings()
    linears = sum(1 for m in model.modules() if isinstance(m, SparseLinear) and m.int8_inputs and m is not head)
    out = {
        "model": str(folder),
        "dtype": str(model.dtype).replace("torch.", ""),
        "int8_activations": {"linears": linears, "head": "int8", "vnni": kernels.vnni_available()},
    }
    if do_eval:
        out.update(_evaluate(model, tokenizer, args, "").to_dict())
    if args.tasks:
        out["zero_shot"] = _zero_shot(model, tokenizer, args, "").to_dict()
    return out


def cmd_eval(args) -> dict:
    from secateurs.models import default_device, load_model

    do_eval = bool(args.eval) and args.eval.lower() != "none"
    if not do_eval and not args.tasks:
        raise SecateursError("eval needs --eval SOURCE (perplexity) or --tasks NAMES (zero-shot accuracy)")
    if args.int8_activations:
        folder = _int8_folder(args)
        if do_eval:
            data.describe_source(args.eval)
        if args.tasks:
            args.tasks = _check_tasks(args, False)
        return _eval_int8(args, folder, do_eval)
    device = default_device(args.device)
    if do_eval:
        data.describe_source(args.eval)
    if args.tasks:
        args.tasks = _check_tasks(args, args.low_memory)
    if args.activation_sparsity is not None:
        from secateurs.runtime.activation import check_sparsity

        check_sparsity(args.activation_sparsity)
    if args.low_memory:
        from secateurs.loading import is_sparse_folder
        from secateurs.models import resolve_folder

        folder = resolve_folder(args.model)
        sparse = os.path.expanduser(args.model)
        if folder is None and os.path.isfile(os.path.join(sparse, "config.json")) and is_sparse_folder(sparse):
            folder = sparse  # a sparse folder (one file or shards): packed weights unpacked layer by layer
        if folder is None or args.activation_sparsity is not None:
            raise SecateursError(
                "eval --low-memory measures a local Hugging Face folder of safetensors shards or a sparse folder, "
                "read one decoder layer at a time (no --activation-sparsity)"
            )
        out = {"model": str(folder), "dtype": args.dtype, "streamed": True}
        if do_eval:
            out.update(_evaluate(None, None, args, "", folder).to_dict())
        if args.tasks:
            out["zero_shot"] = _zero_shot(None, None, args, "", folder).to_dict()
        return out
    model, tokenizer, model_desc = load_model(args.model, args.dtype)
    model.to(device)
    out = {"model": model_desc, "dtype": str(model.dtype).replace("torch.", "")}
    if args.activation_sparsity is not None:
        from secateurs.runtime.activation import sparsify_activations

        summary = sparsify_activations(
            model, args.activation_sparsity, tokenizer, kernel=False, progress=not args.quiet
        )
        out["activation_sparsity"] = {k: v for k, v in summary.items() if k != "thresholds"}
    if do_eval:
        out.update(_evaluate(model, tokenizer, args, "").to_dict())
    if args.tasks:
        out["zero_shot"] = _zero_shot(model, tokenizer, args, "").to_dict()
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    try:
        commands = {"prune": cmd_prune, "eval": cmd_eval}
        result = commands[args.command](args) if args.command in commands else args.run(args)
    except Interrupted as exc:
        print(f"\nsecateurs: interrupted; {exc}", file=sys.stderr)
        return 130
    except SecateursError as exc:
        print(f"secateurs: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("secateurs: interrupted; nothing was saved", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"secateurs: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print("secateurs: error: out of memory", file=sys.stderr)
        return 1
    finally:
        if "torch.distributed" in sys.modules:
            from secateurs.oneshot.distributed import leave

            leave()
    if args.json and os.environ.get("RANK", "0") == "0":
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
