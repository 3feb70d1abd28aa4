"""Zero-shot (or few-shot) accuracy of a model you hold, through lm-eval.

Task names are lm-eval registry names (``boolq``, ``piqa``, ``arc_easy``, ``hellaswag``, ``winogrande`` ...;
their data comes from the Hugging Face hub), the tasks shipped with secateurs (``bible_next_sentence``, read
from the package, no network: see :mod:`secateurs.evaluate.tasks`), or a path to an lm-eval task YAML file.
The model and tokenizer objects are handed to lm-eval's ``HFLM`` as they are: nothing is downloaded or
reloaded, so a pruned model is scored exactly as it sits in memory. A model folder too big to load is scored one
decoder layer at a time by :func:`secateurs.oneshot.streamed_zeroshot.zero_shot_streamed` (log-likelihood and
multiple-choice tasks), with the same requests and the same figures.

lm-eval is an optional dependency (``pip install 'secateurs[eval]'``). Hub tasks fail at once with one clear
line when the hub cannot be reached (the same short probe as the hub text sources) and the data is not in the
local ``datasets`` cache, instead of retrying for minutes.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import importlib.metadata
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from secateurs.errors import SecateursError
from secateurs.evaluate import tasks as local_tasks

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'secateurs[eval]'"
LIST_HINT = "run `lm-eval ls tasks` for lm-eval's task names"


# ------------------------------------------------------------------------------------------------ results
@dataclass
class TaskResult:
    """One task's (or group's) metrics as lm-eval reports them."""

    task: str
    metrics: dict[str, float]  # e.g. {"acc": 0.61, "acc_norm": 0.58}; lm-eval's "metric,filter" when filtered
    stderr: dict[str, float | None]  # standard error of each metric, None where lm-eval gives none
    examples: int | None = None  # examples scored (None for a group)
    available: int | None = None  # examples in the evaluated split
    num_fewshot: int | None = None
    version: str | None = None  # the task's version in its config
    local: bool = False  # shipped with secateurs (no hub data)
    samples: list[dict] | None = None  # per example: doc_id, target, responses (with ``log_samples``)

    @property
    def main_metric(self) -> str | None:
        """``acc`` when the task has it, else its first metric."""
        if "acc" in self.metrics:
            return "acc"
        return next(iter(self.metrics), None)


@dataclass
class ZeroShotResult:
    """Per-task accuracy and the settings that produced it."""

    tasks: dict[str, TaskResult]
    lm_eval_version: str
    num_fewshot: int
    limit: int | float | None
    batch_size: int | str
    seconds: float
    device: str = ""
    max_length: int | None = None  # tokens: lm-eval cuts contexts on the left to fit
    streamed: bool = False  # the model was read one decoder layer at a time (zero_shot_streamed)

    @property
    def protocol(self) -> str:
        shots = "zero-shot" if self.num_fewshot == 0 else f"{self.num_fewshot}-shot"
        limit = "all examples" if self.limit is None else f"first {self.limit} examples per task"
        streamed = "; model streamed one decoder layer at a time" if self.streamed else ""
        return (
            f"lm-eval {self.lm_eval_version}, {shots}, {limit}; multiple choice: acc = argmax of the summed "
            f"log-probability of each choice after the context, acc_norm = the same divided by the choice's "
            f"length in characters{streamed}"
        )

    def accuracy(self, task: str) -> float | None:
        """The main metric of ``task`` (``acc`` where it exists)."""
        result = self.tasks[task]
        metric = result.main_metric
        return result.metrics[metric] if metric else None

    def to_dict(self) -> dict:
        out = asdict(self)
        for task in out["tasks"].values():
            if task["samples"] is None:
                del task["samples"]
        out["protocol"] = self.protocol
        return out

    def table(self) -> str:
        """A readable table of every task's metrics."""
        return format_table({"value": self})


def format_table(results: dict[str, ZeroShotResult | None]) -> str:
    """One row per task and metric, one column per labelled result (e.g. dense / pruned): value ± stderr."""
    shown = {label: result for label, result in results.items() if result is not None}
    if not shown:
        return ""
    rows = [["task", "n", "metric", *shown]]
    names = list(dict.fromkeys(name for result in shown.values() for name in result.tasks))
    for name in names:
        entries = [result.tasks.get(name) for result in shown.values()]
        metrics = list(dict.fromkeys(m for entry in entries if entry for m in entry.metrics))
        examples = next((e.examples for e in entries if e and e.examples is not None), None)
        for metric in metrics:
            cells = []
            for entry in entries:
                value = entry.metrics.get(metric) if entry else None
                error = entry.stderr.get(metric) if entry else None
                cells.append(_cell(value, error))
            rows.append([name, "" if examples is None else str(examples), metric, *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def _cell(value, error) -> str:
    if not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    text = f"{value:.4f}"
    if isinstance(error, (int, float)) and math.isfinite(error):
        text += f" ± {error:.4f}"
    return text


# ------------------------------------------------------------------------------------------------ task names
def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """Task names from ``"boolq,piqa"`` or a list; stripped, duplicates dropped, order kept."""
    if spec is None:
        return []
    parts = spec.split(",") if isinstance(spec, str) else [str(p) for p in spec]
    names = list(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if not names and parts:
        raise SecateursError(f"no task names in {spec!r}: give comma-separated names, e.g. bible_next_sentence")
    return names


def _lm_eval():
    """The ``lm_eval`` module, or one clear error telling how to install it."""
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError as exc:
        raise SecateursError(f"zero-shot tasks need lm-eval, which is not installed ({exc}): {INSTALL_HINT}") from None
    return lm_eval


def lm_eval_version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return getattr(_lm_eval(), "__version__", "unknown")


@functools.lru_cache(maxsize=2)
def _task_manager(with_registry: bool):
    """lm-eval's TaskManager over the local tasks, plus lm-eval's own registry when asked (a few seconds)."""
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval():
        return TaskManager(include_path=str(local_tasks.FOLDER), include_defaults=with_registry)


def _is_yaml(name: str) -> bool:
    return Path(name).suffix.lower() in (".yaml", ".yml")


def _unknown(name: str, known: Iterable[str]) -> SecateursError:
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.75)
    did_you_mean = f" (did you mean {', '.join(close)}?)" if close else ""
    return SecateursError(
        f"unknown zero-shot task {name!r}{did_you_mean}: local tasks: {', '.join(local_tasks.LOCAL_TASKS)}; "
        f"{LIST_HINT}; or give the path to an lm-eval task .yaml file"
    )


def _resolve(names: list[str]):
    """(TaskManager, names needing the hub) after checking every name exists; no data is read."""
    if not names:
        raise SecateursError(f"no zero-shot tasks given: local tasks: {', '.join(local_tasks.LOCAL_TASKS)}")
    _lm_eval()
    remote = [n for n in names if n not in local_tasks.LOCAL_TASKS]
    for name in remote:
        if _is_yaml(name) and not Path(name).is_file():
            raise SecateursError(f"task file not found: {Path(name).resolve()}")
    registry_names = [n for n in remote if not _is_yaml(n)]
    manager = _task_manager(bool(registry_names))
    for name in registry_names:
        if name not in manager.task_index:
            raise _unknown(name, {*manager.all_tasks, *local_tasks.LOCAL_TASKS})
    return manager, remote


@contextlib.contextmanager
def _quiet_lm_eval(progress: bool = True):
    """lm-eval's info and warning lines off (they describe its own CLI's options); its progress bars optional."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    patched = []
    if not progress:
        import lm_eval.api.task
        from tqdm import tqdm

        patched.append((lm_eval.api.task, "tqdm", lm_eval.api.task.tqdm))
        lm_eval.api.task.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        logger.setLevel(level)
        for module, attr, value in patched:
            setattr(module, attr, value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_tasks(names: Sequence[str]) -> dict:
    """lm-eval's loaded tasks (``{"tasks": ..., "groups": ..., "group_map": ...}``) for ``names``.

    The data of hub tasks is fetched here: when the hub cannot be reached (or ``HF_HUB_OFFLINE`` is set) it is
    read from the local ``datasets`` cache only, and a task missing there fails at once with one clear line.
    """
    names = parse_tasks(names)
    manager, remote = _resolve(names)
    if not remote:
        with _quiet_lm_eval():
            return manager.load(names)

    import datasets

    from secateurs.data import _hub

    if _hub._env_offline():
        reason = "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    else:
        reason = _hub.hub_reachable()
    offline = reason is not None
    guard = _hub._forced_offline(datasets) if offline else contextlib.nullcontext()
    try:
        with guard, _quiet_lm_eval():
            return manager.load(names)
    except SecateursError:
        raise
    except Exception as exc:  # datasets / huggingface_hub raise many types (ConnectionError, DatasetNotFoundError ...)
        which = ", ".join(remote)
        if offline:
            raise SecateursError(
                f"zero-shot task(s) {which} need data from the Hugging Face hub but {reason} and it is not in the "
                f"local datasets cache [{_first_line(exc)}]; offline, use a local task: "
                f"{', '.join(local_tasks.LOCAL_TASKS)}"
            ) from None
        raise SecateursError(f"could not load zero-shot task(s) {which}: {_first_line(exc)}") from None


# what a streamed model scores: requests answered by log-likelihoods of continuations, all known in advance
STREAMED_OUTPUT_TYPES = ("loglikelihood", "multiple_choice")


def check_streamable(loaded: dict) -> None:
    """Refuse tasks a streamed model cannot score (rolling log-likelihood, generation), naming them."""
    refused = {
        name: task.OUTPUT_TYPE
        for name, task in loaded["tasks"].items()
        if task.OUTPUT_TYPE not in STREAMED_OUTPUT_TYPES
    }
    if refused:
        which = ", ".join(f"{name} ({kind})" for name, kind in refused.items())
        raise SecateursError(
            f"a streamed model scores only log-likelihood and multiple-choice tasks, not {which}: load the model "
            "in memory (without --low-memory) for these"
        )


def check_tasks(names: str | Sequence[str], streamed: bool = False) -> list[str]:
    """The parsed names, after checking now (before any long work) that each task exists and its data loads, and
    with ``streamed`` that a streamed model can score it (:func:`check_streamable`)."""
    names = parse_tasks(names)
    loaded = load_tasks(names)
    if streamed:
        check_streamable(loaded)
    return names


# ------------------------------------------------------------------------------------------------ task facts
@dataclass
class TaskFacts:
    """What the task-difficulty view needs to know of a task besides its scores."""

    task: str
    chance: float  # expected accuracy of a uniform guess among the choices (0 when unknown)
    choices: int | None  # choices per example when every example has the same number, else None
    difficulty: float | None  # the ``metadata: difficulty`` of the task's YAML (1 = easiest), None if undeclared
    note: str = ""  # how ``chance`` was found

    def to_dict(self) -> dict:
        return asdict(self)


def _evaluated_docs(task, limit) -> list:
    """The documents lm-eval scores for ``task`` under ``limit`` (its eval split, first N or a fraction)."""
    docs = list(task.eval_docs)
    if isinstance(limit, float):
        return docs[: int(math.ceil(len(docs) * limit))]
    return docs if limit is None else docs[:limit]


def facts_of(name: str, task, limit: int | float | None = None) -> TaskFacts:
    """Chance, number of choices and declared difficulty of one loaded lm-eval task.

    ``chance`` is the ``metadata: chance`` of the task's YAML when declared, else the mean of 1/len(choices) over
    the documents scored (the first ``limit``); a task that is not multiple choice gets 0, with a note.
    """
    metadata = dict(getattr(task.config, "metadata", None) or {})
    difficulty = metadata.get("difficulty")
    declared = isinstance(difficulty, (int, float)) and not isinstance(difficulty, bool)
    difficulty = float(difficulty) if declared else None
    if task.OUTPUT_TYPE != "multiple_choice":
        return TaskFacts(name, 0.0, None, difficulty, f"{task.OUTPUT_TYPE} task: chance taken as 0")
    try:
        counts = [len(task.doc_to_choice(doc)) for doc in _evaluated_docs(task, limit)]
    except Exception as exc:  # a task whose documents cannot be listed: chance unknown
        counts, error = [], _first_line(exc)
    else:
        error = "no documents"
    choices = counts[0] if counts and len(set(counts)) == 1 else None
    declared = metadata.get("chance")
    if isinstance(declared, (int, float)) and not isinstance(declared, bool):
        return TaskFacts(name, float(declared), choices, difficulty, "declared in the task's metadata")
    if counts and min(counts) > 0:
        chance = sum(1 / n for n in counts) / len(counts)
        return TaskFacts(name, chance, choices, difficulty, f"1/choices, mean over {len(counts)} documents")
    return TaskFacts(name, 0.0, None, difficulty, f"choices unknown ({error}): chance taken as 0")


def task_facts(names: str | Sequence[str], limit: int | float | None = None) -> dict[str, TaskFacts]:
    """:class:`TaskFacts` of every task named (groups give their subtasks), after checking that each loads.

    Raises the one-line :class:`SecateursError` of :func:`load_tasks` for an unknown task or unreachable data.
    """
    loaded = load_tasks(names)
    return {name: facts_of(name, task, limit) for name, task in loaded["tasks"].items()}


# ------------------------------------------------------------------------------------------------ evaluation
def _check_options(limit, num_fewshot, batch_size) -> None:
    if limit is not None:
        is_count = isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1
        is_fraction = isinstance(limit, float) and 0 < limit < 1
        if not (is_count or is_fraction):
            raise SecateursError(f"limit must be a positive number of examples (or a fraction < 1), got {limit!r}")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise SecateursError(f"num_fewshot must be a non-negative integer, got {num_fewshot!r}")
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise SecateursError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")


def _plain(value):
    """JSON-friendly copy of lm-eval's per-sample responses (tuples, numpy scalars)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def _task_results(raw: dict, log_samples: bool) -> dict[str, TaskResult]:
    out = {}
    for name, row in raw["results"].items():
        metrics, stderr = {}, {}
        for key, value in row.items():
            if "," not in key:
                continue  # alias, name, sample_len
            metric, filter_name = key.split(",", 1)
            is_stderr = metric.endswith("_stderr")
            metric = metric.removesuffix("_stderr")
            label = metric if filter_name == "none" else f"{metric},{filter_name}"
            if is_stderr:
                stderr[label] = value if isinstance(value, (int, float)) else None
            else:
                metrics[label] = value
        counts = raw.get("n-samples", {}).get(name, {})
        version = raw.get("versions", {}).get(name)
        samples = None
        if log_samples and name in raw.get("samples", {}):
            samples = [
                {"doc_id": s["doc_id"], "target": _plain(s["target"]), "responses": _plain(s["filtered_resps"])}
                for s in raw["samples"][name]
            ]
        out[name] = TaskResult(
            task=name,
            metrics=metrics,
            stderr={m: stderr.get(m) for m in metrics},
            examples=counts.get("effective"),
            available=counts.get("original"),
            num_fewshot=raw.get("n-shot", {}).get(name),
            version=None if version is None else str(version),
            local=name in local_tasks.LOCAL_TASKS,
            samples=samples,
        )
    return out


def zero_shot(
    model,
    tokenizer,
    tasks: str | Sequence[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int = 0,
    batch_size: int | str = 8,
    device=None,
    progress: bool = True,
    log_samples: bool = False,
    seed: int = 1234,
) -> ZeroShotResult:
    """Accuracy of ``model`` on lm-eval ``tasks`` (names, see the module docstring), scored in memory.

    ``limit``: only the first N examples of each task (or a fraction < 1). ``num_fewshot``: examples from the
    task's few-shot split put before each context (0 = zero-shot). ``batch_size``: requests per forward pass
    (``"auto"`` lets lm-eval find the largest that fits). ``device``: move the model there first (default:
    where it is). ``log_samples`` keeps each example's target and responses (log-likelihoods) in the result.
    ``seed`` seeds the few-shot sampling.
    """
    names = parse_tasks(tasks)
    _check_options(limit, num_fewshot, batch_size)
    loaded = load_tasks(names)
    if device is not None:
        from secateurs.models import default_device

        model.to(default_device(device))
    was_training = model.training
    try:
        return run_tasks(
            # a copy: lm-eval sets a pad token on the tokenizer it is given
            lambda: _quiet_hflm()(
                pretrained=model, tokenizer=_copy(tokenizer), batch_size=batch_size, progress=progress
            ),
            names,
            loaded,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            progress=progress,
            log_samples=log_samples,
            seed=seed,
        )
    finally:
        model.train(was_training)


def run_tasks(
    make_lm: Callable[[], object],
    names: list[str],
    loaded: dict,
    *,
    limit: int | float | None,
    num_fewshot: int,
    batch_size: int | str,
    progress: bool,
    log_samples: bool,
    seed: int,
    streamed: bool = False,
) -> ZeroShotResult:
    """Score the ``loaded`` tasks (:func:`load_tasks` of ``names``) with the lm-eval model ``make_lm()`` builds
    (an ``HFLM``, or one that answers the same requests), lm-eval's refusals turned into one-line errors."""
    import lm_eval.evaluator

    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") != 0 or num_fewshot == 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        task.set_fewshot_seed(seed=seed)
    lm = None
    t0 = time.perf_counter()
    try:
        with _quiet_lm_eval(progress):
            lm = make_lm()
            raw = lm_eval.evaluator.evaluate(
                lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=1000, log_samples=log_samples
            )
    except ValueError as exc:  # lm-eval's refusals: unsafe-code tasks, multimodal tasks for a text model ...
        raise SecateursError(f"lm-eval cannot run {', '.join(names)}: {_first_line(exc)}") from None
    except AssertionError:  # lm-eval's own checks; the one users meet is a choice longer than the model's context
        positions = f"{lm.max_length} " if lm is not None else ""
        raise SecateursError(
            f"lm-eval stopped on {', '.join(names)} (an internal check failed; the usual cause is an answer "
            f"choice longer than the model's {positions}positions: lm-eval cuts contexts, never choices)"
        ) from None
    seconds = time.perf_counter() - t0
    return ZeroShotResult(
        tasks=_task_results(raw, log_samples),
        lm_eval_version=lm_eval_version(),
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        seconds=seconds,
        device=str(lm.device),
        max_length=lm.max_length,
        streamed=streamed,
    )


def _copy(tokenizer):
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # a tokenizer that cannot be copied is used as it is
        return tokenizer


@functools.lru_cache(maxsize=1)
def _quiet_hflm():
    from lm_eval.models.huggingface import HFLM

    class Quiet(HFLM):
        """lm-eval's HF model wrapper whose progress bars follow ``progress``."""

        def __init__(self, *args, progress: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self._disable_tqdm = not progress

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self._disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or self._disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or self._disable_tqdm)

    return Quiet
