"""Zero-shot accuracy of a model folder that need not fit in memory: lm-eval's requests answered one decoder layer
at a time.

lm-eval hands a model every request of the tasks at once. :class:`StreamedLM` is lm-eval's ``HFLM`` over the
model's skeleton (:func:`~secateurs.oneshot.streaming.open_streamed`: everything but the decoder layers read in),
so each request is tokenised, truncated on the left, ordered and batched by HFLM's own code, exactly as for the
same model in memory. Before HFLM's scoring loop runs, the padded batches it will ask the model for are planned
(the same ordering, grouping, batch size and truncation) and cut into chunks whose hidden states fit a memory
budget. When the loop asks for the first batch of a chunk, the whole chunk goes through the decoder layers one at
a time, each read from the shards once per chunk (:func:`~secateurs.oneshot.capture.through_layers`, as the
streamed perplexity runs); every batch's logits then come from the model's own forward with the layers replaced
by those hidden states (:class:`~secateurs.oneshot.capture.Replay`: final norm and head), and HFLM scores the
continuations as it does in memory. A batch asked for that was not planned is an error, never a wrong figure.

Only log-likelihood requests (log-likelihood and multiple-choice tasks) are answered so: tasks that need rolling
log-likelihoods or generation are refused before any model work.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from secateurs.errors import SecateursError
from secateurs.evaluate.zeroshot import (
    ZeroShotResult,
    _check_options,
    _copy,
    _quiet_hflm,
    check_streamable,
    load_tasks,
    parse_tasks,
    run_tasks,
)
from secateurs.models import find_layers

MIN_HIDDEN_BYTES = 64 << 20  # the default budget's floor


def default_hidden_bytes(device: torch.device) -> int:
    """A quarter of the memory free now on ``device`` (at least 64 MiB): the default budget of hidden states."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return max(int(free // 4), MIN_HIDDEN_BYTES)


def check_options(limit, num_fewshot, batch_size, hidden_bytes: int | None = None) -> None:
    """:func:`zero_shot_streamed`'s options, checked before any work: a fixed batch size (``"auto"`` measures the
    whole model in memory) and a positive ``hidden_bytes``, besides what ``zero_shot`` checks."""
    _check_options(limit, num_fewshot, batch_size)
    if batch_size == "auto":
        raise SecateursError("a streamed model needs a fixed batch size: auto measures the model in memory")
    bad = isinstance(hidden_bytes, bool) or not isinstance(hidden_bytes, int) or hidden_bytes < 1
    if hidden_bytes is not None and bad:
        raise SecateursError(f"hidden_bytes must be a positive number of bytes, got {hidden_bytes!r}")


@functools.lru_cache(maxsize=1)
def streamed_lm_class():
    """:class:`StreamedLM`, built on first use (lm-eval is an optional dependency)."""
    from lm_eval.models.huggingface import Collator, pad_and_concat  # what HFLM itself uses

    from secateurs.oneshot.capture import OnDevice, Replay, through_layers

    class StreamedLM(_quiet_hflm()):
        """lm-eval's ``HFLM`` for a streamed model: ``model`` is the skeleton from ``open_streamed``, ``residence``
        the :class:`~secateurs.oneshot.streaming.Streamed` that reads its layers. ``hidden_bytes``: the most bytes of
        hidden states held at once (default :func:`default_hidden_bytes`); more means fewer reads of the layers."""

        def __init__(
            self,
            model,
            tokenizer,
            residence,
            *,
            device: torch.device,
            batch_size: int,
            hidden_bytes: int | None = None,
            progress: bool = True,
        ):
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, progress=progress)
            if self.backend != "causal":
                raise SecateursError(
                    f"a streamed model is scored as a causal LM; lm-eval takes this one as {self.backend}"
                )
            self._device = torch.device(device)
            self.residence, self.hidden_bytes, self.progress = residence, hidden_bytes, progress
            self.layers_name, self.layers = find_layers(model)
            self._plan: list[torch.Tensor] = []  # the batches HFLM's loop will ask for, in order
            self._chunks: list[list[int]] = []  # batch numbers run through the layers together
            self._hidden: dict[int, torch.Tensor] = {}  # batch number -> the last layer's output, until served
            self._served = 0
            self._head = contextlib.ExitStack()
            self._replay = None

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise SecateursError(
                "a streamed model scores log-likelihood and multiple-choice tasks only (not rolling log-likelihood "
                "ones, such as perplexity tasks): load the model in memory for these"
            )

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise SecateursError(
                "a streamed model scores log-likelihood and multiple-choice tasks only (not generation ones): load "
                "the model in memory for these"
            )

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            self._plan = self._batches(requests)
            self._chunks = self._split(self._plan)
            self._served = 0
            try:
                out = super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            finally:
                self._head.close()
                self._hidden, self._replay = {}, None
            if self._served != len(self._plan):
                raise SecateursError(f"lm-eval used {self._served} of the {len(self._plan)} batches planned")
            return out

        def _batches(self, requests) -> list[torch.Tensor]:
            """The padded batches of token ids ``HFLM._loglikelihood_tokens`` calls the model with, in order: its
            ordering (longest first), its grouping of requests sharing context + continuation[:-1] (scored once),
            its batch size, its truncation of the context on the left and its right padding with zeros."""

            def longest_first(req):
                tokens = req[1] + req[2]
                return -len(tokens), tuple(tokens)

            grouped = "contexts" if self.logits_cache else None
            order = Collator(requests, sort_fn=longest_first, group_by=grouped, group_fn=lambda r: r[-2] + r[-1][:-1])
            plan = []
            for chunk in order.get_batched(n=self.batch_size):
                rows = []
                for _, context, continuation in chunk:
                    # HFLM's own checks, made before any layer is read
                    assert len(context) > 0 and 0 < len(continuation) <= self.max_length
                    ids = (context + continuation)[-(self.max_length + 1) :][:-1]
                    rows.append(torch.tensor(ids, dtype=torch.long))
                plan.append(pad_and_concat(max(len(r) for r in rows), rows, padding_side="right"))
            return plan

        def _split(self, plan: list[torch.Tensor]) -> list[list[int]]:
            """Consecutive batches, as many per chunk as the budget of hidden states holds (at least one)."""
            config = self.model.config
            width = getattr(config, "hidden_size", None) or self.model.get_input_embeddings().weight.shape[-1]
            per_token = width * self.residence.dtype.itemsize
            budget = self.hidden_bytes or default_hidden_bytes(self._device)
            chunks, size = [], 0
            for number, batch in enumerate(plan):
                need = batch.numel() * per_token
                if not chunks or size + need > budget:
                    chunks.append([])
                    size = 0
                chunks[-1].append(number)
                size += need
            return chunks

        def _run_chunk(self, number: int) -> None:
            """Run the chunk starting at batch ``number`` through the layers; its batches then go through the head."""
            self._head.close()  # the last chunk's head: layers back to their own forward, tensors home
            where = next(i for i, chunk in enumerate(self._chunks) if chunk[0] == number)
            chunk = self._chunks[where]
            several = len(self._chunks) > 1
            desc = "zero-shot, layer by layer" + (f" (chunk {where + 1}/{len(self._chunks)})" if several else "")
            hidden, tuple_output = through_layers(
                self.model, self.residence, [self._plan[i] for i in chunk], self._device, self.progress, desc
            )
            self._hidden = dict(zip(chunk, hidden, strict=True))
            self._head = contextlib.ExitStack()
            self._head.enter_context(OnDevice(self.model, self.layers_name, self._device))
            self._replay = self._head.enter_context(Replay(self.layers, tuple_output))

        @torch.no_grad()
        def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
            number = self._served
            if attn_mask is not None or labels is not None or number >= len(self._plan):
                raise SecateursError("lm-eval asked a streamed model for more than the batches it planned")
            if not torch.equal(inps.cpu(), self._plan[number]):
                raise SecateursError(
                    f"lm-eval asked a streamed model for batch {number} with other tokens than planned (this lm-eval "
                    "orders or batches its requests differently from the version secateurs follows)"
                )
            if number not in self._hidden:
                self._run_chunk(number)
            self._replay.output = self._hidden.pop(number)
            self._served += 1
            return self.model(input_ids=inps.to(self._device), use_cache=False).logits

    return StreamedLM


def zero_shot_streamed(
    folder: str | Path,
    tasks,
    *,
    limit: int | float | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = "auto",
    progress: bool = True,
    log_samples: bool = False,
    seed: int = 1234,
    hidden_bytes: int | None = None,
) -> ZeroShotResult:
    """:func:`~secateurs.evaluate.zeroshot.zero_shot` of a model folder that need not fit in memory (safetensors
    shards, a sparse folder or a .gguf file): every request of the tasks is answered with the decoder layers read
    one at a time (see the module docstring), the same log-likelihoods and accuracies as in memory. Log-likelihood
    and multiple-choice tasks only; the others are refused before the model is read.

    ``batch_size``: requests per forward pass, as in memory (``"auto"`` is not available: it measures the whole
    model). ``hidden_bytes``: the most bytes of hidden states held at once (default: a quarter of the free memory
    of ``device``); the layers are read once per chunk of requests that fits it. The other arguments are
    :func:`~secateurs.evaluate.zeroshot.zero_shot`'s and :func:`~secateurs.api.evaluate_streamed`'s.
    """
    from secateurs.models import default_device
    from secateurs.oneshot.streaming import Streamed, open_streamed

    names = parse_tasks(tasks)
    check_options(limit, num_fewshot, batch_size, hidden_bytes)
    loaded = load_tasks(names)
    check_streamable(loaded)
    model, tokenizer, shards = open_streamed(folder, dtype)
    residence = Streamed(model, shards, None, write=False)
    target = default_device(device)

    def make_lm():
        return streamed_lm_class()(
            model,
            _copy(tokenizer),  # lm-eval sets a pad token on the tokenizer it is given
            residence,
            device=target,
            batch_size=batch_size,
            hidden_bytes=hidden_bytes,
            progress=progress,
        )

    return run_tasks(
        make_lm,
        names,
        loaded,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        progress=progress,
        log_samples=log_samples,
        seed=seed,
        streamed=True,
    )
