"""Output folders written atomically: into a hidden temporary folder beside the target, renamed into place when
complete, so an interrupted or failed run never leaves an output that looks finished."""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from secateurs.errors import SecateursError

log = logging.getLogger("secateurs")

REPORT_NAME = "report.json"
# a temporary folder: .NAME.partial-PID-HEX (the writing process's id, so a later run can tell a dead one's)
PARTIAL = re.compile(r"^\..+\.partial-(\d+)-[0-9a-f]{8}$")
# the naming of older versions (tempfile.mkdtemp: no process id); such a folder counts as stale once nothing in it
# has changed for OLD_PARTIAL_AGE seconds: a run that is still writing touches its files far more often
OLD_PARTIAL = re.compile(r"^\..+\.partial-[a-z0-9_]{8}$")
OLD_PARTIAL_AGE = 3600.0
# files only a secateurs output folder holds: --overwrite replaces a folder only when one of them is there
OUTPUT_MARKERS = (REPORT_NAME, "model.sparse.safetensors", "masks.safetensors")


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse a non-empty existing output (unless overwrite) or an unwritable location, before any work.

    Creates nothing: missing parent folders are made when the model is saved.
    """
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise SecateursError(f"output {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise SecateursError(f"output folder {path} exists and is not empty (use --overwrite to replace it)")
        if not is_output_folder(path):
            raise SecateursError(
                f"output folder {path} holds no secateurs output ({', '.join(OUTPUT_MARKERS)}): --overwrite only "
                "replaces a folder that secateurs wrote; choose a new or empty folder"
            )
        if Path.cwd().resolve().is_relative_to(path.resolve()) or path.resolve() == Path.home().resolve():
            raise SecateursError(f"refusing to overwrite {path}: it is the current folder, a parent of it, or home")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise SecateursError(f"cannot create output folder {path}: {base} is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise SecateursError(f"cannot create output folder {path}: {base} is not writable")
    return path


def check_disk(output: Path, needed: int, what: str) -> None:
    """Refuse, before any work, an output whose file system has less room than ``needed`` bytes (``what`` names it)."""
    base = output
    while not base.exists():
        base = base.parent
    free = shutil.disk_usage(base).free
    if free < needed:
        raise SecateursError(
            f"not enough disk for {what}: about {needed / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free in {base}"
        )


def is_output_folder(path: str | Path) -> bool:
    """Whether ``path`` holds what secateurs writes (a report, a sparse checkpoint or masks)."""
    return any((Path(path) / name).is_file() for name in OUTPUT_MARKERS)


class AtomicFolder:
    """``with AtomicFolder(out) as tmp:`` write into tmp; renamed to ``out`` on success, removed on failure."""

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = check_output(path, overwrite)

    def __enter__(self) -> Path:
        self.tmp = self.path.parent / f".{self.path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(self.path.parent)
            self.tmp.mkdir()  # follows the umask, unlike tempfile.mkdtemp's 0700
        except OSError as exc:
            raise SecateursError(f"cannot write in {self.path.parent}: {exc.strerror or exc}") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        follow_umask(self.tmp)
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return False


def file_mode() -> int:
    """The mode a plain ``open()`` gives a new file: 0666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def follow_umask(folder: Path) -> None:
    """Give every file under ``folder`` the mode of :func:`file_mode`: some writers (safetensors) create their
    files 0600, which would leave the weights of a saved model unreadable to the group when the rest of the
    folder is not."""
    mode = file_mode()
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)


def replace_file(path: Path, write) -> None:
    """``write(tmp)`` to a hidden file beside ``path``, give it :func:`file_mode`, rename it to ``path``: a reader
    never sees half a file, and a failure leaves nothing behind."""
    tmp = path.parent / f".{path.name}.partial-{secrets.token_hex(4)}"
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OSError:
        return True
    return True


def remove_stale_partials(parent: Path) -> list[Path]:
    """Remove the temporary folders that killed secateurs runs left in ``parent`` (a run killed by SIGKILL or a
    power cut cannot clean up after itself); those of running processes stay. Returns what was removed."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.is_dir() or entry.is_symlink():
            continue
        match = PARTIAL.match(entry.name)
        if match:
            if _alive(int(match.group(1))):
                continue
        elif not OLD_PARTIAL.match(entry.name) or time.time() - _newest_mtime(entry) < OLD_PARTIAL_AGE:
            continue
        size = folder_bytes(entry)
        shutil.rmtree(entry, ignore_errors=True)
        log.warning("removed %s, left by a run that was killed (%.1f MB)", entry, size / 1e6)
        removed.append(entry)
    return removed


def _newest_mtime(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for f in folder.rglob("*"):
        try:
            times.append(f.lstat().st_mtime)
        except OSError:
            pass
    return max(times)


def folder_bytes(folder: str | Path) -> int:
    """Total bytes of the files under ``folder``."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
