"""Export a gptlab model as a llama.cpp GGUF file (and an Ollama Modelfile beside it).

``export_gguf(model, out, tokenizer, quant)`` writes one ``.gguf`` file with
the ``gguf`` package's ``GGUFWriter``, through the same tables the reader
(``weights/gguf.py``) loads with, read the other way:

    GGUF_ARCHS   family -> general.architecture ("llama", "qwen2" with q/k/v biases, "gpt2")
                 and its tensor table (our names -> llama.cpp's blk.N.* names)
    GGUF_META    config field -> {arch}.KEY (block_count, embedding_length, ...)

What llama.cpp's converter (convert_hf_to_gguf.py) does, done the same way:

- the q/k projection rows of "llama" files are permuted within each head from
  the "rotate half" layout to interleaved pairs (:func:`permute_rows`, the
  exact inverse of the reader's ``unpermute_rows``); "qwen2" files are not permuted;
- Llama 3 RoPE scaling is stored as the ``rope_freqs`` tensor (one divisor per frequency);
- 1-D tensors (norms, biases) and GPT-2's position table stay F32; every other
  tensor gets ``quant`` (gguf.quants.quantize: llama.cpp's own reference
  quantizer), or F16 when its rows are not whole blocks of 32;
- the tokenizer goes in as ``tokenizer.ggml.*`` (``tokenizers/gguf_tokenizer.py``),
  with the chat template and the bos/eos/end-of-turn ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.logs import get_logger
from gptlab.weights.gguf import GGUF_ARCHS, GGUF_META, NON_PARAMETERS, PERMUTED_ARCHS
from gptlab.weights.keymaps import check_weights_match_config, expand_rules

log = get_logger(__name__)

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")


def _types(quant: str):
    """(GGMLQuantizationType, LlamaFileType) of a ``--quant`` name."""
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    table = {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
             "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0), "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1)}
    name = str(quant).strip().lower()  # Q8_0 as llama.cpp and `gptlab fit` spell it = q8_0
    if name not in table:
        raise GptlabError(f"--quant {quant!r} is not supported; choose one of {', '.join(QUANTS)}")
    return table[name]


def gguf_architecture(cfg) -> str:
    """The llama.cpp architecture that computes exactly what ``cfg`` does (GptlabError if none)."""
    if cfg.family == "gpt2":
        if cfg.mlp_act != "gelu_tanh":
            raise GptlabError(f"GGUF export of a GPT-2 with mlp_act={cfg.mlp_act!r} is not supported (llama.cpp's "
                              "gpt2 computes the tanh GELU); export it as a Hugging Face directory (--format hf)")
        return "gpt2"
    if cfg.family != "llama":
        raise GptlabError(f"model family {cfg.family!r} cannot be exported to GGUF (supported: gpt2, llama)")
    unsupported = [what for what, bad in (
        ("mlp_act=gelu_tanh (Gemma)", cfg.mlp_act != "silu"), ("embed_scale (Gemma)", cfg.embed_scale),
        ("norm_unit_offset (Gemma)", cfg.norm_unit_offset),
        ("a sliding window (Mistral)", cfg.sliding_window is not None and cfg.sliding_window < cfg.context_length),
        ("a mixture of experts (the stacked expert tensors are not written yet)", cfg.n_experts > 0),
    ) if bad]
    scaling = cfg.rope_scaling or {}
    if scaling and (scaling.get("low_freq_factor"), scaling.get("high_freq_factor")) != (1.0, 4.0):
        unsupported.append("Llama 3 RoPE scaling with low/high frequency factors other than 1/4")
    if unsupported:
        raise GptlabError(f"GGUF export of this Llama config is not supported: {', '.join(unsupported)}; "
                          "export it as a Hugging Face directory (--format hf) instead")
    return "qwen2" if cfg.qkv_bias else "llama"


def permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter ``permute``: within each head, rows [x0..x(hd/2-1), y0..] -> [x0, y0, x1, y1, ...].

    Works for weights (rows, in) and biases (rows,); ``unpermute_rows`` in weights/gguf.py undoes it.
    """
    rows, rest = w.shape[0], w.shape[1:]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *rest)  # (H, 2, hd/2, ...)
            .transpose(1, 2)  # (H, hd/2, 2, ...)
            .reshape(rows, *rest))


def gguf_tensors(model: nn.Module, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """The model's tensors under llama.cpp's names and layouts, as float32 arrays (PyTorch shape order)."""
    check_weights_match_config(model)
    cfg, own = model.cfg, model.state_dict()
    for rule in expand_rules(GGUF_ARCHS[arch][1], cfg):
        t = own[rule.ours].detach().to("cpu", torch.float32)
        if arch in PERMUTED_ARCHS and (".attn_q." in rule.theirs or ".attn_k." in rule.theirs):
            t = permute_rows(t, cfg.n_heads if ".attn_q." in rule.theirs else cfg.n_kv_heads)
        yield rule.theirs, t.contiguous().numpy()
        if arch == "gpt2" and not cfg.qkv_bias and rule.theirs.endswith("attn_qkv.weight"):
            # llama.cpp's GPT-2 requires the bias; zeros compute exactly what no bias does
            yield rule.theirs.replace(".weight", ".bias"), np.zeros(t.shape[0], np.float32)
    if arch in PERMUTED_ARCHS and cfg.rope_scaling:
        from gptlab.models.attention import rope_frequencies

        base = rope_frequencies(cfg.head_dim, cfg.rope_theta)
        yield "rope_freqs.weight", (base / rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
                                    ).to(torch.float32).numpy()


def _stored_type(name: str, arr: np.ndarray, qtype):
    """The GGML type a tensor is stored as: what llama.cpp's converter would choose for ``qtype``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if arr.ndim <= 1 or name.startswith("position_embd") or name in NON_PARAMETERS:
        return Q.F32
    block = GGML_QUANT_SIZES[qtype][0]
    if arr.shape[-1] % block:
        return Q.F16  # the converter's fallback for rows that are not whole blocks
    return qtype


def _write_metadata(w, cfg, arch: str, file_type, tokenizer) -> None:
    """general.*, {arch}.* (through GGUF_META) and tokenizer.* keys."""
    from gguf import GGML_QUANT_VERSION

    w.add_name(str(cfg.name))
    w.add_file_type(int(file_type))
    w.add_quantization_version(GGML_QUANT_VERSION)
    for f in GGUF_META[arch]:
        value = getattr(cfg, f.ours)
        if f.cast is not int:
            w.add_float32(f"{arch}.{f.key}", float(value))
        else:
            w.add_uint32(f"{arch}.{f.key}", int(value))
    w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    if arch != "gpt2":
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        if cfg.rope_scaling:
            w.add_rope_scaling_orig_ctx_len(int(cfg.rope_scaling["original_max_position_embeddings"]))
    if tokenizer is not None:
        for key, value in tokenizer_metadata(tokenizer, cfg).items():
            _add(w, key, value)


def tokenizer_metadata(tokenizer, cfg) -> dict[str, Any]:
    """``tokenizer.*`` keys for ``tokenizer``, plus the chat template's end-of-turn id (``eot_token_id``)."""
    from gptlab.tokenizers.gguf_tokenizer import gguf_tokenizer_metadata

    meta = gguf_tokenizer_metadata(tokenizer, cfg.vocab_size)
    if tokenizer.chat_template:
        from gptlab.inference.stops import end_of_turn_tokens
        from gptlab.tokenizers.chat_template import ChatTemplate

        try:
            ends = end_of_turn_tokens(ChatTemplate.for_tokenizer(tokenizer), tokenizer)
        except GptlabError:
            ends = []
        if ends:
            meta["tokenizer.ggml.eot_token_id"] = tokenizer.special_tokens[ends[0]]
    return meta


def _add(w, key: str, value: Any) -> None:
    """One metadata value with the GGUF type llama.cpp reads it as (arrays: int32, float32 or strings)."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list):
        w.add_array(key, value)  # the element type follows the first element
    else:
        raise TypeError(f"no GGUF type for {key}={value!r}")


def export_gguf(model: nn.Module, out: str | Path, tokenizer=None, quant: str = "f16") -> dict[str, int]:
    """Write ``model`` (and its tokenizer) as one llama.cpp GGUF file; returns {GGML type: tensor count}.

    Args:
        model: a gptlab GPT2 or Llama model (not a classifier, no LoRA, not quantized).
        out: the ``.gguf`` file to write (atomically: a temporary file renamed into place).
        tokenizer: its gptlab tokenizer (an HFTokenizer); None writes no vocabulary
            (llama.cpp then loads the weights but cannot tokenize).
        quant: f32, f16, bf16, q8_0, q4_0 or q4_1 for the 2-D weights.
    """
    import gguf

    from gptlab.fileio import atomic_save

    qtype, file_type = _types(quant)
    cfg = model.cfg
    arch = gguf_architecture(cfg)
    counts: dict[str, int] = {}

    def write(path: str) -> None:
        w = gguf.GGUFWriter(path, arch)
        _write_metadata(w, cfg, arch, file_type, tokenizer)
        for name, arr in gguf_tensors(model, arch):
            stored = _stored_type(name, arr, qtype)
            counts[stored.name] = counts.get(stored.name, 0) + 1
            data = gguf.quants.quantize(arr, stored)
            w.add_tensor(name, data, raw_dtype=stored if stored not in (gguf.GGMLQuantizationType.F32,
                                                                         gguf.GGMLQuantizationType.F16) else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_save(Path(out), write)
    if counts.get("F16") and qtype.name not in ("F16", "F32"):
        log.info("%d tensors whose rows are not whole %s blocks were stored as F16", counts["F16"], qtype.name)
    return counts


__all__ = ["QUANTS", "export_gguf", "gguf_architecture", "gguf_tensors", "permute_rows", "tokenizer_metadata"]
