"""Export a gptlab model as a Hugging Face directory that ``transformers`` loads (``gptlab export``).

``--format gguf`` / ``--format ollama`` go through ``weights/gguf_export.py`` (and
``inference/modelfile.py``); the output checks and the atomic writes are the ones here.

``export_hf(model, out)`` writes ``config.json`` + ``model.safetensors`` (+ the
tokenizer's files). The architecture and config.json come from the family (``Family.hf_export``
in ``models/gpt2.py`` / ``models/llama.py``), chosen by the config fields
(e.g. a Llama config with ``sliding_window`` is a MistralForCausalLM).

``gptlab export`` writes into a temporary directory beside ``--out`` and
renames it into place; it refuses an existing non-empty ``--out`` without
``--overwrite`` and an ``--out`` inside a training run directory.

Tensor names come from the same key maps the loader uses (weights/keymaps.py),
read in reverse, so an export loads back into gptlab unchanged.

Only language models export: a classifier from ``gptlab finetune classify``
(its LM head replaced by an n-class head with a bias) has no transformers
equivalent with identical logits (``...ForSequenceClassification`` heads have
no bias), so it is refused with one clear line.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from gptlab.errors import GptlabError
from gptlab.fileio import DIR_MODE, atomic_save, atomic_write_bytes, atomic_write_json
from gptlab.models.config import FAMILIES, ModelConfig, get_family
from gptlab.refs import RUN_CONFIGS
from gptlab.weights.keymaps import check_weights_match_config, expand

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# Files a Hugging Face tokenizer may consist of (copied verbatim from a source directory).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")


def config_to_hf(cfg: ModelConfig) -> dict:
    """The Hugging Face ``config.json`` dict for a gptlab config (GptlabError if not representable).

    Each family writes its own (``Family.hf_export`` in ``models/<family>.py``).
    """
    family = get_family(cfg.family)
    if family.hf_export is None:
        raise GptlabError(f"export of model family {cfg.family!r} is not supported "
                          f"(supported: {', '.join(n for n, f in FAMILIES.items() if f.hf_export)})")
    return family.hf_export(cfg)[1]


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names (tied head stored once, as transformers does)."""
    check_weights_match_config(model)
    own = model.state_dict()
    state = {}
    for rule in expand(model.cfg.family, model.cfg):
        t = own[rule.ours].detach()
        state[rule.theirs] = (t.t() if rule.transpose else t).contiguous().cpu()
    return state


def _tokenizer_object(tokenizer):
    """The tokenizer itself, also when ``tokenizer`` is a directory whose files are copied (None if unreadable)."""
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from gptlab.tokenizers import load_tokenizer

    try:
        return load_tokenizer(str(tokenizer))
    except GptlabError:
        return None


def _token_ids(hf: dict, vocab_size: int, tokenizer) -> None:
    """bos/eos ids of the exported config: the tokenizer's own (a trained BPE's end-of-text is not GPT-2's
    50256), and never an id outside the vocabulary (transformers warns about those)."""
    if tokenizer is not None:
        eos, bos = tokenizer.eos_id, tokenizer.bos_id
        hf["eos_token_id"], hf["bos_token_id"] = eos, bos if bos is not None else eos
    for key in ("bos_token_id", "eos_token_id"):
        ids = hf.get(key)
        listed = ids if isinstance(ids, list) else [ids]
        if any(i is not None and not 0 <= i < vocab_size for i in listed):
            hf[key] = None


def export_hf(model: nn.Module, out: str | Path, tokenizer=None) -> Path:
    """Write ``model`` as a Hugging Face directory (config.json + model.safetensors [+ tokenizer]).

    Args:
        model: a gptlab GPT2 or Llama model.
        out: the directory to write (created if needed).
        tokenizer: a gptlab tokenizer (its ``save(out)`` writes its files), or a
            directory whose Hugging Face tokenizer files are copied.
    """
    out = Path(out)
    cfg = model.cfg
    hf = config_to_hf(cfg)
    state = hf_state_dict(model)
    dtype = next(iter(state.values())).dtype
    hf["torch_dtype"] = _DTYPE_NAMES.get(dtype, "float32")
    _token_ids(hf, cfg.vocab_size, _tokenizer_object(tokenizer))
    out.mkdir(parents=True, exist_ok=True)
    atomic_save(out / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write_json(out / "config.json", hf)
    if isinstance(tokenizer, (str, Path)):
        copy_tokenizer_files(tokenizer, out)
    elif tokenizer is not None:
        tokenizer.save(out)
        _gpt2_files_for_transformers(out)
    return out


def _gpt2_files_for_transformers(out: Path) -> None:
    """GPT-2's encoder.json / vocab.bpe are byte for byte HF's vocab.json / merges.txt: add those names."""
    enc, bpe = out / "encoder.json", out / "vocab.bpe"
    if not (enc.is_file() and bpe.is_file()) or (out / "vocab.json").exists():
        return
    atomic_write_bytes(out / "vocab.json", enc.read_bytes())
    atomic_write_bytes(out / "merges.txt", bpe.read_bytes())
    if not (out / "tokenizer_config.json").exists():
        eot = "<|endoftext|>"
        atomic_write_json(out / "tokenizer_config.json", {"tokenizer_class": "GPT2Tokenizer", "bos_token": eot,
                                                          "eos_token": eot, "unk_token": eot,
                                                          "add_prefix_space": False})


def copy_tokenizer_files(src: str | Path, out: str | Path) -> list[str]:
    """Copy the Hugging Face tokenizer files found in ``src`` into ``out``; returns their names."""
    src, out = Path(src), Path(out)
    copied = []
    for name in TOKENIZER_FILES:
        f = src / name
        if f.is_file() and f.resolve() != (out / name).resolve():
            atomic_write_bytes(out / name, f.read_bytes())
            copied.append(name)
    return copied


# What makes a directory a training run (its settings file, checkpoints, model): an export must not land in one.
RUN_MARKERS = (*RUN_CONFIGS, "checkpoints", "model/config.json")


def _run_dir_at_or_above(path: Path) -> Path | None:
    """The training run directory that ``path`` is, or lies inside, if any."""
    for d in [path, *path.parents]:
        if any((d / marker).exists() for marker in RUN_MARKERS):
            return d
    return None


def _is_hf_export(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def _is_ollama_export(d: Path) -> bool:
    return (d / "Modelfile").is_file() and any(d.glob("*.gguf"))


def check_out_dir(out: Path, overwrite: bool, earlier=_is_hf_export, what: str = "config.json + *.safetensors") -> None:
    """Refuse an ``--out`` inside a training run, and an existing non-empty one unless ``overwrite``.

    ``earlier(dir)`` says whether a non-empty directory is an earlier export (``what``), the only
    kind ``overwrite`` replaces.
    """
    out = out.expanduser().absolute()
    run = _run_dir_at_or_above(out)
    if run is not None:
        raise GptlabError(f"--out {out} is inside the training run {run}; writing there would mix the export "
                          "with the run's files: give an --out outside it")
    if out.exists() and not out.is_dir():
        raise GptlabError(f"--out {out} exists and is not a directory; give a new directory")
    if out == Path.cwd().absolute() or out in Path.cwd().absolute().parents:
        raise GptlabError(f"--out {out} is the current directory or one above it; give a new directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise GptlabError(f"--out {out} already exists and is not empty; pass --overwrite to replace it, "
                              "or give a new directory")
        if not earlier(out):
            raise GptlabError(f"--out {out} holds files that are not an earlier export (no {what}); "
                              "--overwrite replaces only an export: give a new directory")


def export_atomically(write, out: Path) -> Path:
    """Run ``write(tmp)`` into a fresh directory beside ``out``, then rename it into place.

    A failed or interrupted export leaves ``out`` as it was; an existing ``out``
    is replaced only once the new one is complete.
    """
    import shutil
    import tempfile

    out = out.expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        os.chmod(tmp, DIR_MODE)  # mkdtemp gives 0700; an export is as readable as any directory
        write(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_out_file(out: Path, overwrite: bool) -> None:
    """Refuse a GGUF ``--out`` that is not a .gguf file name, lies inside a training run, or exists (without
    ``overwrite``)."""
    out = out.expanduser().absolute()
    if out.suffix != ".gguf":
        raise GptlabError(f"--out {out} must be a file name ending in .gguf for --format gguf")
    run = _run_dir_at_or_above(out.parent)
    if run is not None:
        raise GptlabError(f"--out {out} is inside the training run {run}; give an --out outside it")
    if out.is_dir():
        raise GptlabError(f"--out {out} is a directory; give a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise GptlabError(f"--out {out} already exists; pass --overwrite to replace it, or give a new file name")


FORMATS = ("hf", "gguf", "ollama")


def _export_tokenizer(src: Path):
    """The tokenizer to export with the model from ``src``: its HF directory, a tokenizer, or None (noted)."""
    if src.is_dir() and (src / "tokenizer.json").is_file():
        return src  # a HF-style tokenizer next to the weights: copy its files verbatim
    try:
        from gptlab.tokenizers import load_tokenizer

        return load_tokenizer(str(src))
    except (ImportError, GptlabError) as e:
        print(f"note: no tokenizer exported ({e})")
        return None


def export_command(model: str, out: str, format: str = "hf", dtype: str | None = None,
                   quant: str | None = None, overwrite: bool = False) -> int:
    """Export a model: a Hugging Face directory, a llama.cpp GGUF file, or a GGUF + Ollama Modelfile.

    Args:
        model: a gptlab run or model directory, a Hugging Face directory or repo id,
            a .gguf file, or pkg:PACKAGE/PATH.
        out: what to write (required; not inside a training run): a directory for hf and
            ollama, a FILE.gguf for gguf.
        format: hf (Hugging Face safetensors, for transformers), gguf (one file for
            llama.cpp), ollama (a directory with the .gguf and a Modelfile for `ollama create`).
        dtype: hf only: convert the weights first (fp32, bf16, fp16); default: keep them.
        quant: gguf and ollama only: f16 (default), bf16, f32, q8_0, q4_0, q4_1.
        overwrite: replace an existing --out (only an earlier export of the same format).
    """
    from gptlab.refs import resolve
    from gptlab.weights import load_model
    from gptlab.weights.native import refuse_classifier

    if format not in FORMATS:
        raise GptlabError(f"--format {format!r} is not supported; use one of {', '.join(FORMATS)}")
    if not out:
        raise GptlabError(f"give the output with --out {'FILE.gguf' if format == 'gguf' else 'DIR'}")
    if format == "hf" and quant is not None:
        raise GptlabError("--quant is for --format gguf or ollama; for hf use --dtype")
    if format != "hf" and dtype is not None:
        raise GptlabError(f"--dtype is for --format hf; for {format} use --quant (f16, bf16, f32, q8_0, ...)")
    if format != "hf":
        from gptlab.weights.gguf_export import _types

        _types(quant or "f16")  # an unknown --quant is refused before anything is loaded
    src = resolve(model)
    refuse_classifier(src, model, f"only language models export to {format} format",
                      "or export the model it was fine-tuned from")
    if format == "gguf":
        check_out_file(Path(out), overwrite)
    else:
        earlier = (_is_ollama_export, "Modelfile + *.gguf") if format == "ollama" else ()
        check_out_dir(Path(out), overwrite, *earlier)
    net = load_model(src, dtype=dtype)
    tokenizer = _export_tokenizer(src)
    n = sum(p.numel() for p in net.parameters())
    if format == "hf":
        path = export_atomically(lambda tmp: export_hf(net, tmp, tokenizer), Path(out))
        print(f"wrote {path} ({config_to_hf(net.cfg)['architectures'][0]}, {n:,} parameters)")
        return 0
    return _export_gguf_command(net, _tokenizer_object(tokenizer), Path(out), format, quant or "f16", n)


def _export_gguf_command(net, tokenizer, out: Path, format: str, quant: str, n: int) -> int:
    from gptlab.weights.gguf_export import export_gguf, gguf_architecture

    if tokenizer is None:
        print("note: the GGUF file has no vocabulary: llama.cpp loads it but cannot tokenize text")
    if format == "gguf":
        counts = export_gguf(net, out, tokenizer, quant)
        path = out
    else:
        from gptlab.fileio import atomic_write_text
        from gptlab.inference.modelfile import modelfile

        name = f"{out.expanduser().name}.gguf"
        text = modelfile(name, tokenizer, net.cfg)  # an untranslatable template is refused before writing
        counts = {}

        def write(tmp: Path) -> None:
            counts.update(export_gguf(net, tmp / name, tokenizer, quant))
            atomic_write_text(tmp / "Modelfile", text)

        path = export_atomically(write, out)
    types = ", ".join(f"{c} {t}" for t, c in sorted(counts.items()))
    print(f"wrote {path} (GGUF {gguf_architecture(net.cfg)}, {n:,} parameters; tensors: {types})")
    if format == "ollama":
        print(f"next: cd {path} && ollama create {path.name} -f Modelfile && ollama run {path.name}")
    return 0


__all__ = ["check_weights_match_config", "config_to_hf", "copy_tokenizer_files", "export_command", "export_hf",
           "hf_state_dict"]
