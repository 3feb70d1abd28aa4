"""Text sources: resolving a name or path to a bundled corpus, a local file or a hub dataset, and reading it.

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
same name in the working directory: write ``./bible`` for such a file. Every user error raises
``SecateursError`` with a one-line message. Nothing is cached on disk.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
from pathlib import Path

from secateurs.data import _hub
from secateurs.data.bundled import BUNDLED, bundled_name, read_bundled
from secateurs.errors import SecateursError

HUB: dict[str, str] = dict(_hub.HUB)

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
COMPRESSED_SUFFIXES = (".gz", ".xz")


# ----------------------------------------------------------------------------------------- resolution
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


def resolve_source(source: str) -> tuple[str, str | Path]:
    """("bundled", name) | ("hub", name) | ("file", absolute Path); raises for unknown / missing sources."""
    if not isinstance(source, (str, Path)):
        raise SecateursError(f"text source must be a string (a name or a path), got {type(source).__name__}")
    text = str(source)
    if not text.strip():
        raise SecateursError(f"empty text source name; {_names_hint()}")
    if isinstance(source, str):
        if (name := bundled_name(text)) is not None:
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


def check_nonempty(text: str, source: str) -> str:
    """``text``, or a one-line error naming ``source`` when it is blank."""
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
    kind, name = resolve_source(source)
    if kind == "bundled":
        text = read_bundled(name)
    elif kind == "hub":
        text = "\n\n".join(_hub.load_documents(name, split))
    else:
        text = "\n\n".join(_file_documents(name))
    return check_nonempty(text, str(source))


def source_kind(source: str) -> str:
    """``"bundled"``, ``"file"`` or ``"hub"``: what kind of source ``source`` names."""
    return resolve_source(source)[0]


def describe_source(source: str, split: str | None = None) -> str:
    """A short string naming what ``source`` resolved to, for reports and JSON.

    ``bundled:bible``; ``file:/abs/path.txt (sha256 0123456789ab)``; ``hub:wikitext-2-raw-v1/test`` (the split
    is included when given); ``hub:allenai/c4/en/c4-validation.00000-of-00008.json.gz``.
    """
    kind, name = resolve_source(source)
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
