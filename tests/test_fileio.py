"""Atomic writes keep the umask's file mode, whatever the writer does to the temp file."""

import os
import stat

import torch
from safetensors.torch import save_file

from gptlab.fileio import atomic_save, atomic_write_json


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_safetensors_written_with_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_save(tmp_path / "model.safetensors", lambda p: save_file({"w": torch.zeros(2)}, p))
        atomic_write_json(tmp_path / "config.json", {"a": 1})
    finally:
        os.umask(old)
    # safetensors alone would leave 0600; every gptlab file gets what open() gives under umask 022
    assert _mode(tmp_path / "model.safetensors") == _mode(tmp_path / "config.json") == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
