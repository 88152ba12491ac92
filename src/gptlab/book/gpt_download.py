"""``download_and_load_gpt2``: OpenAI's GPT-2 weights in the course's ``params`` layout.

The course downloads OpenAI's TensorFlow checkpoint; here the same weights come
from Hugging Face's ``model.safetensors`` (no TensorFlow needed) and are
rearranged into the nested dict the course's ``load_weights_into_gpt`` reads:

    params["wte"], params["wpe"]                       (V, d), (n_ctx, d)
    params["blocks"][i]["attn"]["c_attn"]["w"|"b"]     (d, 3d), (3d,)
    params["blocks"][i]["attn"]["c_proj"]["w"|"b"]     (d, d), (d,)
    params["blocks"][i]["mlp"]["c_fc"]["w"|"b"]        (d, 4d), (4d,)
    params["blocks"][i]["mlp"]["c_proj"]["w"|"b"]      (4d, d), (d,)
    params["blocks"][i]["ln_1"|"ln_2"]["g"|"b"]        (d,)
    params["g"], params["b"]                           (d,)  final layer norm

Hugging Face's GPT-2 ``Conv1D`` stores weights as (in, out), the same
orientation as OpenAI's TensorFlow files, so no transpose happens here.
Full strength: ``gptlab.load_model("gpt2")`` / ``gptlab download gpt2``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from gptlab.errors import GptlabError

#: The course's size names -> Hugging Face repo ids of the same weights.
HF_REPOS = {"124M": "gpt2", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}
FILES = ("config.json", "model.safetensors")

# HF key (after dropping a leading "transformer.") -> path in the course's params.
_TOP = {"wte.weight": ("wte",), "wpe.weight": ("wpe",), "ln_f.weight": ("g",), "ln_f.bias": ("b",)}
_BLOCK = {
    "ln_1.weight": ("ln_1", "g"), "ln_1.bias": ("ln_1", "b"),
    "attn.c_attn.weight": ("attn", "c_attn", "w"), "attn.c_attn.bias": ("attn", "c_attn", "b"),
    "attn.c_proj.weight": ("attn", "c_proj", "w"), "attn.c_proj.bias": ("attn", "c_proj", "b"),
    "ln_2.weight": ("ln_2", "g"), "ln_2.bias": ("ln_2", "b"),
    "mlp.c_fc.weight": ("mlp", "c_fc", "w"), "mlp.c_fc.bias": ("mlp", "c_fc", "b"),
    "mlp.c_proj.weight": ("mlp", "c_proj", "w"), "mlp.c_proj.bias": ("mlp", "c_proj", "b"),
}
# Keys a GPT-2 checkpoint may hold that carry no weights we need: the causal-mask
# buffers of old transformers versions and the output head (tied to wte).
_IGNORED = re.compile(r"^(h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight)$")
_BLOCK_KEY = re.compile(r"^h\.(\d+)\.(.+)$")


def _local_files(models_dir: Path, model_size: str) -> Path | None:
    for d in (models_dir / model_size, models_dir):
        if all((d / f).is_file() for f in FILES):
            return d
    return None


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
VERIFIED = "gptlab-verified.json"  # blobs whose sha256 was checked once, under the cache dir


def verify_blob(path: str | os.PathLike, cache_dir: Path) -> None:
    """Check a Hub download against its sha256.

    The Hub cache stores a large (LFS) file as ``blobs/<sha256 of the content>``
    with a symlink to it, so the expected checksum is the blob's own name. Each
    blob is hashed once; verified names are recorded in ``cache_dir/gptlab-verified.json``.
    Small git-stored files (config.json) are named by their git hash and are skipped.
    """
    blob = Path(path).resolve()
    if not _SHA256.match(blob.name):
        return
    record = cache_dir / VERIFIED
    try:
        done = set(json.loads(record.read_text()))
    except (OSError, json.JSONDecodeError, TypeError):
        done = set()
    if blob.name in done:
        return
    h = hashlib.sha256()
    with open(blob, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != blob.name:
        raise GptlabError(f"checksum mismatch for {path} (sha256 {h.hexdigest()[:12]}..., expected "
                          f"{blob.name[:12]}...): the download is corrupt; delete {blob} and run again")
    from gptlab.fileio import atomic_write_json

    atomic_write_json(record, sorted(done | {blob.name}))


def _hub_files(model_size: str, models_dir: Path) -> Path:
    """Download (or reuse the cached) config.json + model.safetensors of the HF repo, checksum-verified."""
    repo = HF_REPOS[model_size]
    cache = models_dir / "hf-cache"
    try:
        from huggingface_hub import hf_hub_download

        paths = [hf_hub_download(repo_id=repo, filename=f, cache_dir=str(cache)) for f in FILES]
    except Exception as e:  # offline, DNS failure, HTTP error, disk full ...
        raise GptlabError(
            f"could not download GPT-2 {model_size} from Hugging Face repo {repo!r} ({type(e).__name__}); "
            f"offline, place {' and '.join(FILES)} from https://huggingface.co/{repo} in "
            f"{models_dir / model_size}"
        ) from None
    for p in paths:
        verify_blob(p, cache)
    return Path(paths[1]).parent


def settings_from_hf_config(cfg: dict) -> dict:
    """The course's ``settings`` (OpenAI hparams names) from an HF GPT-2 config.json."""
    try:
        return {"n_vocab": cfg["vocab_size"], "n_ctx": cfg.get("n_ctx", cfg["n_positions"]),
                "n_embd": cfg["n_embd"], "n_head": cfg["n_head"], "n_layer": cfg["n_layer"]}
    except KeyError as e:
        raise GptlabError(f"config.json lacks {e.args[0]!r}; is this a GPT-2 checkpoint?") from None


def params_from_state_dict(state: dict[str, np.ndarray], n_layer: int) -> dict:
    """Arrange HF GPT-2 tensors (numpy) into the course's nested ``params`` dict, strictly.

    Every expected key must be present and every present key must be known or
    ignorable; the error names the offending keys.
    """
    params: dict = {"blocks": [{} for _ in range(n_layer)]}
    seen, unexpected = set(), []

    def put(root: dict, path: tuple[str, ...], value: np.ndarray) -> None:
        for p in path[:-1]:
            root = root.setdefault(p, {})
        root[path[-1]] = value

    for key, value in state.items():
        k = key.removeprefix("transformer.")
        if _IGNORED.match(k):
            continue
        m = _BLOCK_KEY.match(k)
        if k in _TOP:
            put(params, _TOP[k], value)
        elif m and m.group(2) in _BLOCK and int(m.group(1)) < n_layer:
            put(params["blocks"][int(m.group(1))], _BLOCK[m.group(2)], value)
        else:
            unexpected.append(key)
            continue
        seen.add(k)
    expected = set(_TOP) | {f"h.{i}.{s}" for i in range(n_layer) for s in _BLOCK}
    missing = sorted(expected - seen)
    if missing or unexpected:
        raise GptlabError(f"not a GPT-2 checkpoint with {n_layer} layers: missing {missing[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    return params


def download_and_load_gpt2(model_size: str, models_dir: str | os.PathLike) -> tuple[dict, dict]:
    """GPT-2 ``(settings, params)`` in the course's format, from Hugging Face safetensors.

    ``model_size`` is one of "124M", "355M", "774M", "1558M". Files are looked for
    in ``models_dir/model_size/`` and then ``models_dir/`` (a folder holding
    ``config.json`` + ``model.safetensors``, e.g. from ``save_pretrained``);
    otherwise they are downloaded from the Hub (repos gpt2, gpt2-medium,
    gpt2-large, gpt2-xl) into a cache under ``models_dir``.
    Full strength: ``gptlab.load_model("gpt2")``.
    """
    if model_size not in HF_REPOS:
        raise GptlabError(f"model_size {model_size!r} is not one of {', '.join(HF_REPOS)}")
    models_dir = Path(models_dir)
    folder = _local_files(models_dir, model_size) or _hub_files(model_size, models_dir)
    from safetensors.numpy import load_file

    try:
        settings = settings_from_hf_config(json.loads((folder / "config.json").read_text()))
        state = load_file(str(folder / "model.safetensors"))
    except (OSError, json.JSONDecodeError) as e:
        raise GptlabError(f"could not read GPT-2 files in {folder}: {e}; delete them and download again") from None
    except Exception as e:  # safetensors' own header / dtype errors
        raise GptlabError(f"{folder / 'model.safetensors'} is not a readable safetensors file ({e}); "
                          "delete it and download again") from None
    params = params_from_state_dict({k: v.astype(np.float32) for k, v in state.items()}, settings["n_layer"])
    return settings, params
