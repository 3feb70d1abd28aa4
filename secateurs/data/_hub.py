"""Hugging Face hub text sources (WikiText-2, C4), loaded lazily through ``datasets``.

Everything here fails fast and with one clear line when ``datasets`` is missing or the hub cannot be
reached: before handing over to ``datasets`` (whose HTTP client retries for tens of seconds, or minutes on a
network that drops packets) the hub's host, or the HTTPS proxy in front of it, is probed with a short TCP
connection. When the probe fails the dataset is still looked up in the local ``datasets`` cache in offline
mode, so a machine that downloaded it once keeps working without a network.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
from contextlib import contextmanager

from secateurs.data.bundled import BUNDLED
from secateurs.errors import SecateursError

PROBE_TIMEOUT_S = 4.0

# Hub source name -> one-line description.
HUB: dict[str, str] = {
    "wikitext2": "WikiText-2 raw v1 from the Hugging Face hub (wikitext, wikitext-2-raw-v1)",
    "c4": "C4 English, first train shard / first validation shard (allenai/c4)",
}
ALIASES = {
    "wikitext": "wikitext2",
    "wikitext-2": "wikitext2",
    "wikitext-2-raw-v1": "wikitext2",
    "wikitext2-raw": "wikitext2",
    "allenai/c4": "c4",
    "c4-en": "c4",
}
C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
WIKITEXT_SPLITS = ("train", "validation", "test")


def hub_name(source: str) -> str | None:
    """The canonical hub source name for ``source`` (case-insensitive, a few aliases), or None."""
    key = source.strip().lower()
    if key.startswith("hub:"):
        key = key[4:]
    key = ALIASES.get(key, key)
    return key if key in HUB else None


def resolve_split(name: str, split: str) -> str:
    """Validate ``split`` for a hub source; C4 has no test split, so "test" means its validation shard."""
    split = (split or "").strip().lower()
    if split in ("val", "valid", "dev"):
        split = "validation"
    if name == "c4":
        if split == "test":
            split = "validation"
        if split not in C4_FILES:
            raise SecateursError(f"source 'c4' has no split {split!r}: use train or validation")
        return split
    if split not in WIKITEXT_SPLITS:
        raise SecateursError(f"source 'wikitext2' has no split {split!r}: use train, validation or test")
    return split


def describe(name: str, split: str | None) -> str:
    if name == "wikitext2":
        return "hub:wikitext-2-raw-v1" + (f"/{resolve_split(name, split)}" if split else "")
    if split:
        return f"hub:allenai/c4/{C4_FILES[resolve_split(name, split)]}"
    return "hub:allenai/c4"


def _offline_message(name: str, reason: str) -> str:
    return (
        f"source '{name}' needs the Hugging Face hub (pip install datasets; network access) but {reason}; "
        f"for offline use give a local .txt/.jsonl file or a bundled corpus: {', '.join(BUNDLED)}"
    )


def _import_datasets(name: str):
    try:
        import datasets
    except ImportError:
        raise SecateursError(_offline_message(name, "the 'datasets' package is not installed")) from None
    return datasets


def _env_offline() -> bool:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return False


def _probe_target() -> tuple[str, int]:
    """(host, port) to probe: the HTTPS proxy if one applies to the hub, else the hub endpoint itself."""
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme != "http" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(endpoint.scheme or "https") or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            return parsed.hostname, parsed.port or 8080
    return host, port


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if a TCP connection to the hub (or its proxy) opens within ``timeout`` seconds, else the reason.

    Runs in a daemon thread so that a stalled DNS lookup cannot block the caller past the timeout.
    """
    host, port = _probe_target()
    result: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as exc:
            result.append(f"{host}:{port} is not reachable ({exc.strerror or type(exc).__name__})")

    thread = threading.Thread(target=probe, daemon=True, name="secateurs-hub-probe")
    thread.start()
    thread.join(timeout + 0.5)
    if not result:
        return f"{host}:{port} did not answer within {timeout:g} s"
    return result[0]


@contextmanager
def _forced_offline(datasets):
    """Temporarily switch datasets / huggingface_hub to offline mode (cache only, no HTTP)."""
    patched = []
    modules = [getattr(datasets, "config", None)]
    try:
        import huggingface_hub.constants as hub_constants

        modules.append(hub_constants)
    except ImportError:
        pass
    for module in modules:
        for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if module is not None and hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in reversed(patched):
            setattr(module, attr, value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _load(datasets, name: str, split: str):
    if name == "wikitext2":
        return datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    return datasets.load_dataset("allenai/c4", data_files={split: C4_FILES[split]}, split=split)


def load_documents(name: str, split: str) -> list[str]:
    """The "text" column of a hub dataset split, as a list of strings (one per row / document)."""
    split = resolve_split(name, split)
    datasets = _import_datasets(name)
    if _env_offline():
        reason = "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the local cache"
        offline = True
    else:
        unreachable = hub_reachable()
        offline = unreachable is not None
        reason = f"{unreachable} and the dataset is not in the local cache"
    try:
        if offline:
            with _forced_offline(datasets):
                data = _load(datasets, name, split)
        else:
            data = _load(datasets, name, split)
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise SecateursError(_offline_message(name, f"{reason} [{_first_line(exc)}]")) from None
    except Exception as exc:  # datasets raises many types (DatasetNotFoundError, FileNotFoundError, ...)
        if offline:
            raise SecateursError(_offline_message(name, f"{reason} [{_first_line(exc)}]")) from None
        raise SecateursError(
            f"could not load hub source '{name}' ({describe(name, split)}): {_first_line(exc)}"
        ) from None
    if "text" not in getattr(data, "column_names", ["text"]):
        raise SecateursError(f"hub source '{name}' has no 'text' column (columns: {data.column_names})")
    return list(data["text"])
