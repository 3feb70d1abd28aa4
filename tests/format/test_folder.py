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
