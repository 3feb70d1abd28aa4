"""Write a pruned model as a normal Hugging Face folder plus ``report.json``, atomically.

Everything goes to a hidden temporary folder beside the target, renamed into place only when complete, so
an interrupted or failed run never leaves an output that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from secateurs.errors import SecateursError

REPORT_NAME = "report.json"


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse a non-empty existing output (unless overwrite) or an unwritable parent, before any work."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise SecateursError(f"output {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SecateursError(f"output folder {path} exists and is not empty (use --overwrite to replace it)")
    parent = path.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SecateursError(f"cannot create output folder {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SecateursError(f"output folder {parent} is not writable")
    return path


class AtomicFolder:
    """``with AtomicFolder(out) as tmp: write into tmp`` -> renamed to ``out`` on success, removed on failure."""

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = check_output(path, overwrite)

    def __enter__(self) -> Path:
        parent = self.path.resolve().parent
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=parent))
        except OSError as exc:
            raise SecateursError(f"cannot write in {parent}: {exc.strerror}") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return False


def save_pruned(model, tokenizer, folder: str | Path, report: dict | None = None, overwrite: bool = False) -> Path:
    """Save model (safetensors), tokenizer and report into ``folder`` atomically."""
    with AtomicFolder(folder, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return Path(folder)
