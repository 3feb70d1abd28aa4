"""What int8 values (and an int8 LM head) cost in perplexity and save in bytes, against the fp32 sparse model.

Protocol (printed with the figures): for each pruned folder given (``secateurs prune ... --save-format sparse``)
or, without folders, SmolLM2-135M-Instruct pruned here with Wanda at each ``--sparsities`` (32 x 512 bundled
Shakespeare calibration tokens, seed 0): the sparse fp32 model, the same with int8 values (one float32 scale per
row, symmetric round-to-nearest; ``save_sparse(values="int8")``), and that with the LM head int8 too
(``int8_head``; a tied embedding shares its codes); and int8 values whose codes are chosen by GPTQ rounding on
calibration text (``gptq``: ``secateurs.oneshot.quantize.int8_codes`` on ``--gptq-windows`` x 512 tokens of bundled
Shakespeare, seed 0; what ``prune --save-format sparse-int8`` does by default), alone and with the int8 head
(``gptq_head``). Perplexity on the first 40 non-overlapping 512-token windows
of the bundled Bible (the ``prune`` protocol), computed on the dequantised weights with dense matmuls: the sparse
kernel computes the same products (tested to fp32 summation order). The last column, ``gptq_head_a8``, is the one
computed on the sparse kernel itself: the GPTQ int8 folder loaded with ``load_sparse(folder, head="int8",
int8_activations=True)`` (what ``secateurs eval DIR --int8-activations`` measures), so every int8 linear and the int8
head also quantise their inputs to int8, one scale per 64 (AVX-512 VNNI integer dot products where the CPU has them,
else the float kernel on the same quantised inputs; the record says which), in float32 otherwise. Bytes: the packed
decoder linears as stored, and what one decode step reads (``secateurs.runtime.timing.step_bytes`` of the model on
the kernel).

    python benchmarks/int8_smollm2.py                              # prune Wanda 50% and 70% here
    python benchmarks/int8_smollm2.py --folders out/w50 out/w70    # fp32 sparse folders pruned before
                                                                   # (prune --save-format sparse)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import secateurs
from secateurs.checkpoint import load_pruned, save_sparse
from secateurs.data.windows import calibration_windows
from secateurs.format.bits import quantize_rows, stored_bits
from secateurs.format.sparse import is_sparse_folder, open_folder
from secateurs.measure import versions
from secateurs.oneshot.quantize import int8_codes
from secateurs.runtime import kernels, timing
from secateurs.runtime.linear import int8_head, load_sparse


def dequantised_head(model) -> None:
    """The LM head (and a tied embedding) replaced by its int8 round trip, in place."""
    head = model.get_output_embeddings()
    W = head.weight.detach()
    q, scales = quantize_rows(W, stored_bits(W))
    head.weight.data.copy_((q.float() * scales[:, None]).to(W.dtype))  # tied embedding follows: same tensor


def pruned_folder(path: str) -> tuple[str, Path]:
    """(label, folder) of a ``--folders`` entry: a sparse folder with float values (the fp32 column is read from it),
    labelled by its recipe (``wanda 50%``) when its report.json has one, else by its name."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file() or not is_sparse_folder(folder):
        raise SystemExit(f"{folder}: not a sparse folder (prune --save-format sparse)")
    values = {entry.get("dtype") for _, header in open_folder(folder).files for entry in header.packed.values()}
    if "int8" in values:
        raise SystemExit(f"{folder} holds int8 values: give the fp32 sparse folder it was made from")
    try:
        recipe = json.loads((folder / "report.json").read_text())["recipe"]
        return f"{recipe['method']} {recipe['sparsity']:.0%}", folder
    except (OSError, ValueError, KeyError, TypeError):
        return folder.name, folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--folders", nargs="*", default=None, help="fp32 sparse folders of pruned models (else prune here)"
    )
    parser.add_argument("--sparsities", default="0.5,0.7")
    parser.add_argument("--eval", default="bible")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--gptq-windows", type=int, default=32, help="calibration windows of GPTQ rounding")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    ppl = dict(seqlen=512, max_windows=args.windows, progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = []
        if args.folders:
            sources = [pruned_folder(f) for f in args.folders]
        else:
            for s in (float(v) for v in args.sparsities.split(",")):
                model, tokenizer, _ = secateurs.load_model("smollm2-135m", "float32")
                secateurs.prune(
                    model, secateurs.Recipe(method="wanda", sparsity=s), tokenizer=tokenizer, progress=False
                )
                save_sparse(model, tokenizer, Path(tmp) / f"wanda{s:g}", progress=False)
                sources.append((f"wanda {s:.0%}", Path(tmp) / f"wanda{s:g}"))
        for label, folder in sources:
            row = {"model": label}
            model, tokenizer = load_pruned(folder)
            row["fp32"] = secateurs.evaluate(model, tokenizer, args.eval, **ppl).perplexity
            int8 = Path(tmp) / f"{folder.name}-int8"
            f32 = save_sparse(model, tokenizer, Path(tmp) / f"{folder.name}-f32", progress=False)
            i8 = save_sparse(model, tokenizer, int8, progress=False, values="int8")
            row["linear_mb"] = {"dense": f32["linear_dense_bytes"] / 1e6, "fp32": f32["linear_checkpoint_bytes"] / 1e6}
            row["linear_mb"]["int8"] = i8["linear_checkpoint_bytes"] / 1e6
            del model
            model, tokenizer = load_pruned(int8)
            row["int8"] = secateurs.evaluate(model, tokenizer, args.eval, **ppl).perplexity
            dequantised_head(model)
            row["int8_head"] = secateurs.evaluate(model, tokenizer, args.eval, **ppl).perplexity
            del model
            model, tokenizer = load_pruned(folder)
            windows = calibration_windows("shakespeare", tokenizer, args.gptq_windows, 512, 0)
            codes = int8_codes(model, windows, progress=False)
            gptq = Path(tmp) / f"{folder.name}-gptq"
            save_sparse(model, tokenizer, gptq, progress=False, values="int8", int8_codes=codes)
            del model
            model, tokenizer = load_pruned(gptq)
            row["gptq"] = secateurs.evaluate(model, tokenizer, args.eval, **ppl).perplexity
            dequantised_head(model)
            row["gptq_head"] = secateurs.evaluate(model, tokenizer, args.eval, **ppl).perplexity
            del model
            model, tokenizer = load_sparse(gptq, head="int8", int8_activations=True)  # on the kernel
            row["gptq_head_a8"] = secateurs.evaluate(model, tokenizer, args.eval, **ppl).perplexity
            del model
            steps = {}
            for name, path in (("fp32", Path(tmp) / f"{folder.name}-f32"), ("int8", int8)):
                steps[name] = timing.step_bytes(load_sparse(path)[0]) / 1e6
            fast, _ = load_sparse(int8)
            int8_head(fast)
            steps["int8_head"] = timing.step_bytes(fast) / 1e6
            row["step_mb"] = steps
            rows.append(row)
            print(
                f"{label:12s} ppl fp32 {row['fp32']:.3f} | "
                f"int8 {row['int8']:.3f} ({row['int8'] / row['fp32'] - 1:+.2%}) | "
                f"int8 + head {row['int8_head']:.3f} ({row['int8_head'] / row['fp32'] - 1:+.2%}) | "
                f"GPTQ int8 {row['gptq']:.3f} ({row['gptq'] / row['fp32'] - 1:+.2%}) | "
                f"GPTQ int8 + head {row['gptq_head']:.3f} ({row['gptq_head'] / row['fp32'] - 1:+.2%}) | "
                f"+ int8 activations {row['gptq_head_a8']:.3f} ({row['gptq_head_a8'] / row['fp32'] - 1:+.2%}); linears "
                f"{row['linear_mb']['dense']:.0f} MB dense, {row['linear_mb']['fp32']:.0f} fp32 sparse, "
                f"{row['linear_mb']['int8']:.0f} int8; per decode step {steps['fp32']:.0f} / {steps['int8']:.0f} / "
                f"{steps['int8_head']:.0f} MB"
            )
    how = "VNNI" if kernels.vnni_available() else "the float kernel (no AVX-512 VNNI)"
    print(
        f"protocol: perplexity on {args.eval}, first {args.windows} x 512-token windows, dequantised weights; "
        f"+ int8 activations: GPTQ int8 with the int8 head on the sparse kernel ({kernels.isa()}), inputs quantised "
        f"to int8 per 64, by {how}; torch {torch.__version__}"
    )
    if args.json:
        kernel = {"isa": kernels.isa(), "vnni": kernels.vnni_available(), "threads": kernels.num_threads()}
        record = {"rows": rows, "gptq_head_a8_kernel": kernel, "versions": versions()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
