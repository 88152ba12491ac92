"""Export a gptlab model as a Hugging Face directory that ``transformers`` loads.

``export_hf(model, out)`` writes ``config.json`` + ``model.safetensors`` (+ the
tokenizer's files). The architecture follows from the config fields:

    GPT2Config                               -> GPT2LMHeadModel
    LlamaConfig, plain                       -> LlamaForCausalLM
      sliding_window set                     -> MistralForCausalLM
      qkv_bias                               -> Qwen2ForCausalLM
      embed_scale + norm_unit_offset + GeGLU -> GemmaForCausalLM

Tensor names come from the same key maps the loader uses (weights/keymaps.py),
read in reverse, so an export loads back into gptlab unchanged.

Only language models export: a classifier from ``gptlab finetune classify``
(its LM head replaced by an n-class head with a bias) has no transformers
equivalent with identical logits (``...ForSequenceClassification`` heads have
no bias), so it is refused with one clear line.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_save, atomic_write_bytes, atomic_write_json
from gptlab.models.config import ModelConfig
from gptlab.weights.keymaps import expand

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# Files a Hugging Face tokenizer may consist of (copied verbatim from a source directory).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")


def _gpt2_hf_config(cfg) -> dict:
    if not cfg.qkv_bias:
        raise GptlabError("GPT-2 without q/k/v bias (qkv_bias=False) has no transformers equivalent; "
                          "export a model trained with qkv_bias=True")
    if cfg.hidden_dim != 4 * cfg.emb_dim:
        n_inner = cfg.hidden_dim
    else:
        n_inner = None
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": n_inner,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": 50256, "eos_token_id": 50256,
    }


def _llama_architecture(cfg) -> str:
    gemma = (cfg.embed_scale, cfg.norm_unit_offset, cfg.mlp_act)
    if gemma == (True, True, "gelu_tanh"):
        if cfg.qkv_bias or cfg.sliding_window or cfg.rope_scaling:
            raise GptlabError("a Gemma-style config with qkv_bias, sliding_window or rope_scaling has no "
                              "transformers equivalent")
        return "GemmaForCausalLM"
    if cfg.embed_scale or cfg.norm_unit_offset:
        raise GptlabError("embed_scale / norm_unit_offset are only exportable together with mlp_act='gelu_tanh' "
                          "(the Gemma architecture)")
    if cfg.qkv_bias and cfg.sliding_window:
        raise GptlabError("qkv_bias together with sliding_window has no transformers equivalent")
    if cfg.sliding_window:
        return "MistralForCausalLM"
    if cfg.qkv_bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def _llama_hf_config(cfg) -> dict:
    arch = _llama_architecture(cfg)
    act = "silu" if cfg.mlp_act == "silu" else "gelu_pytorch_tanh"
    out = {
        "architectures": [arch], "model_type": arch.removesuffix("ForCausalLM").lower(),
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.emb_dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": act, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
    }
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=False, mlp_bias=False)
    if arch == "GemmaForCausalLM":
        out["hidden_activation"] = act
    if arch == "MistralForCausalLM":
        out["sliding_window"] = cfg.sliding_window
    if arch == "Qwen2ForCausalLM":
        out.update(use_sliding_window=False, sliding_window=None)
    if cfg.rope_scaling:
        out["rope_scaling"] = {"rope_type": "llama3", **cfg.rope_scaling}
    return out


def config_to_hf(cfg: ModelConfig) -> dict:
    """The Hugging Face ``config.json`` dict for a gptlab config (GptlabError if not representable)."""
    if cfg.family == "gpt2":
        return _gpt2_hf_config(cfg)
    if cfg.family == "llama":
        return _llama_hf_config(cfg)
    raise GptlabError(f"export of model family {cfg.family!r} is not supported (gpt2 and llama are)")


def _check_weights_match_config(model: nn.Module) -> None:
    """Refuse a model whose tensors are not the ones its config describes (they would export wrongly)."""
    from gptlab.models import empty_model

    cfg = model.cfg
    expected = {k: tuple(v.shape) for k, v in empty_model(cfg).state_dict().items()}  # meta: no memory
    own = model.state_dict()
    for head in ("out_head.weight", "lm_head.weight"):
        if head in own and head in expected and own[head].shape[0] != cfg.vocab_size:
            raise GptlabError(f"the model's output head has {own[head].shape[0]} outputs, not one per token of its "
                              f"{cfg.vocab_size}-token vocabulary: a classifier (gptlab finetune classify) cannot "
                              "be exported as a Hugging Face causal LM; export the model it was fine-tuned from")
    extra = sorted(set(own) - set(expected))
    wrong = [f"{k} {tuple(own[k].shape)} (config: {expected[k]})" for k in expected
             if k in own and tuple(own[k].shape) != expected[k]]
    if extra or wrong:
        what = "; ".join(filter(None, [extra and f"weights the config has no place for: {', '.join(extra[:5])}",
                                       wrong and f"wrong shapes: {', '.join(wrong[:5])}"]))
        raise GptlabError(f"the model does not match its config ({what}); export a plain gptlab model "
                          "(merge LoRA adapters first, do not quantize)")


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names (tied head stored once, as transformers does)."""
    _check_weights_match_config(model)
    own = model.state_dict()
    state = {}
    for rule in expand(model.cfg.family, model.cfg):
        t = own[rule.ours].detach()
        state[rule.theirs] = (t.t() if rule.transpose else t).contiguous().cpu()
    return state


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


def export_command(model: str, out: str = "", format: str = "hf", dtype: str | None = None) -> int:
    """Export a model as a Hugging Face directory that transformers can load.

    Args:
        model: a gptlab run or model directory, a Hugging Face directory or repo id,
            a .gguf file, or pkg:PACKAGE/PATH.
        out: the directory to write (required).
        format: the output format; only "hf" (Hugging Face safetensors) is supported.
        dtype: convert the weights first (fp32, bf16, fp16); default: keep them.
    """
    from gptlab.weights import load_model, resolve

    if format != "hf":
        raise GptlabError(f"--format {format!r} is not supported; use --format hf")
    if not out:
        raise GptlabError("give the output directory with --out DIR")
    src = resolve(model)
    from gptlab.weights.native import refuse_classifier

    refuse_classifier(src, model, "only language models export to Hugging Face format",
                      "or export the model it was fine-tuned from")
    net = load_model(src, dtype=dtype)
    tokenizer = None
    if src.is_dir() and (src / "tokenizer.json").is_file():
        tokenizer = src  # a HF-style tokenizer next to the weights: copy its files verbatim
    else:
        try:
            from gptlab.tokenizers import load_tokenizer

            tokenizer = load_tokenizer(str(src))
        except (ImportError, GptlabError) as e:
            print(f"note: no tokenizer exported ({e})")
    path = export_hf(net, out, tokenizer)
    n = sum(p.numel() for p in net.parameters())
    print(f"wrote {path} ({config_to_hf(net.cfg)['architectures'][0]}, {n:,} parameters)")
    return 0


__all__ = ["config_to_hf", "copy_tokenizer_files", "export_command", "export_hf", "hf_state_dict"]
