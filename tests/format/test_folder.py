"""The atomic output folder: files written into it follow the umask, whatever mode their writer gave them."""

from __future__ import annotations

import os
import stat

import torch
from safetensors.torch import save_file

from secateurs.format.folder import AtomicFolder


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with AtomicFolder(tmp_path / "out") as tmp:
            save_file({"w": torch.ones(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
            (tmp / "sub").mkdir()
            (tmp / "sub" / "report.json").write_text("{}")
        for name in ("model.safetensors", "sub/report.json"):
            assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name
        os.umask(0o077)
        with AtomicFolder(tmp_path / "private") as tmp:
            (tmp / "report.json").write_text("{}")
        assert stat.S_IMODE((tmp_path / "private" / "report.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_killed_run_leaves_a_partial_folder_the_next_run_removes(tmp_path, caplog):
    """SIGKILL during a save (nothing can clean up), then a second save into the same parent removes what the
    dead process left; a partial folder of a live process stays."""
    import signal
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from secateurs.format.folder import AtomicFolder\n"
        "with AtomicFolder(sys.argv[1]) as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'x' * 100000)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert len(left) == 1 and not (tmp_path / "out").exists()  # nothing that looks finished
    alive = tmp_path / f".other.partial-{os.getpid()}-0123abcd"  # a run still writing
    alive.mkdir()
    with caplog.at_level("WARNING", logger="secateurs"), AtomicFolder(tmp_path / "next") as tmp:
        (tmp / "report.json").write_text("{}")
    assert not left[0].exists() and alive.exists() and (tmp_path / "next" / "report.json").is_file()
    assert "left by a run that was killed" in caplog.text


def test_old_style_partial_folders_are_removed_once_untouched_for_an_hour(tmp_path, caplog):
    """Folders of older versions carry no process id: one untouched for an hour is stale, a fresh one may be a
    run still writing and stays; names that merely look alike are never touched."""
    import time

    from secateurs.format.folder import OLD_PARTIAL_AGE

    old = tmp_path / ".out.partial-ab_c9xyz"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"x" * 1000)
    past = time.time() - OLD_PARTIAL_AGE - 60
    for p in (old / "model.safetensors", old):
        os.utime(p, (past, past))
    fresh = tmp_path / ".other.partial-q1w2e3r4"
    fresh.mkdir()
    (fresh / "model.safetensors").write_bytes(b"x")
    lookalike = tmp_path / ".notes.partial-2024"  # not our naming
    lookalike.mkdir()
    os.utime(lookalike, (past, past))
    with caplog.at_level("WARNING", logger="secateurs"), AtomicFolder(tmp_path / "next") as tmp:
        (tmp / "report.json").write_text("{}")
    assert not old.exists() and fresh.exists() and lookalike.exists()
    assert "left by a run that was killed" in caplog.text
