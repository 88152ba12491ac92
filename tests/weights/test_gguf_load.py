"""GGUF loading on tiny random Llama models: logits equal to Hugging Face's, strict checks."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_helpers import hf_llama_to_gguf, llama_cpp_permute, write_gguf  # noqa: E402

from gptlab.errors import GptlabError
from gptlab.weights import load_model
from gptlab.weights.gguf import load_gguf, map_name, read_gguf, read_metadata, unpermute_rows

transformers = pytest.importorskip("transformers")


def tiny_hf(tie: bool, rope_scaling: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-5, tie_word_embeddings=tie)
    if rope_scaling:
        kw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, **rope_scaling}
    else:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mix-up of norms would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


IDS = torch.tensor([[3, 17, 42, 5, 88, 1, 60, 33, 9, 71, 2, 40]])


@pytest.mark.parametrize("tie", [True, False])
def test_f32_gguf_logits_match_hf(tmp_path, tie):
    hf = tiny_hf(tie)
    path = hf_llama_to_gguf(hf, tmp_path / "m.gguf")
    ours = load_gguf(path)
    assert ours.cfg.tie_embeddings == tie and ours.cfg.n_kv_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, atol=1e-5, rtol=1e-5)
    if tie:
        assert ours.lm_head.weight is ours.embed_tokens.weight


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantized_gguf_matches_hf_with_dequantized_weights(tmp_path, qtype):
    """Quantized file vs the HF model holding the reference-dequantized weights."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    hf = tiny_hf(tie=False, seed=1)
    path = hf_llama_to_gguf(hf, tmp_path / "q.gguf", qtype=qtype)
    with torch.no_grad():  # what the file holds, per llama.cpp's own (de)quantizer
        for name, p in hf.named_parameters():
            if p.dim() == 2:
                q = quantize(p.numpy(), GGMLQuantizationType[qtype])
                p.copy_(torch.from_numpy(dequantize(q, GGMLQuantizationType[qtype])))
    ours = load_gguf(path)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, atol=1e-5, rtol=1e-5)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf = tiny_hf(tie=True, rope_scaling=scaling)
    from gptlab.models.attention import rope_frequencies

    freqs = (rope_frequencies(16, 500000.0) / rope_frequencies(16, 500000.0, scaling)).numpy()
    path = hf_llama_to_gguf(hf, tmp_path / "l3.gguf", extra_tensors={"rope_freqs.weight": (freqs, "F32")})
    ours = load_gguf(path)
    assert ours.cfg.rope_scaling["factor"] == 8.0
    ids = torch.randint(0, 96, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_cached_decoding_and_bf16(tmp_path):
    hf = tiny_hf(tie=True)
    path = hf_llama_to_gguf(hf, tmp_path / "m.gguf")
    ours = load_gguf(path, dtype=torch.bfloat16)
    assert ours.embed_tokens.weight.dtype == torch.bfloat16
    ref = hf(IDS).logits.detach()
    with torch.no_grad():
        assert (ours(IDS).float() - ref).abs().max() < 0.1
        cache = ours.new_cache(1, IDS.shape[1])
        ours(IDS[:, :6], cache)
        step = ours(IDS[:, 6:7], cache)[:, -1]
        full = ours(IDS[:, :7])[:, -1]
        torch.testing.assert_close(step.float(), full.float(), atol=0.05, rtol=0.05)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).normal(size=(4 * 16, 8)).astype(np.float32)
    back = unpermute_rows(torch.from_numpy(llama_cpp_permute(w, 4)), 4)
    np.testing.assert_array_equal(back.numpy(), w)
    b = np.arange(32, dtype=np.float32)  # biases (1-D) too
    np.testing.assert_array_equal(unpermute_rows(torch.from_numpy(llama_cpp_permute(b, 2)), 2).numpy(), b)


def test_key_map():
    assert map_name("blk.12.attn_q.weight") == "layers.12.self_attn.q_proj.weight"
    assert map_name("blk.0.ffn_down.weight") == "layers.0.mlp.down_proj.weight"
    assert map_name("blk.3.attn_k.bias") == "layers.3.self_attn.k_proj.bias"
    assert map_name("output.weight") == "lm_head.weight"
    assert map_name("token_embd.weight") == "embed_tokens.weight"
    assert map_name("blk.0.attn_qkv.weight") is None


def test_reader_matches_gguf_reference_reader(tmp_path):
    from gguf import GGUFReader

    hf = tiny_hf(tie=False)
    path = hf_llama_to_gguf(hf, tmp_path / "m.gguf", qtype="Q8_0",
                            extra_kv={"general.name": "tiny", "tokenizer.ggml.tokens": ["a", "b", "<s>"],
                                      "tokenizer.ggml.token_type": [1, 1, 3]})
    ours = read_gguf(path)
    ref = GGUFReader(str(path))
    assert ours.meta == {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.type_name == t.tensor_type.name
        assert info.shape == tuple(int(x) for x in reversed(t.shape))
        assert info.start == t.data_offset and info.nbytes == t.n_bytes
        np.testing.assert_array_equal(ours.raw(t.name), t.data.reshape(-1).view(np.uint8))


def test_load_model_dispatches_gguf(tmp_path):
    hf = tiny_hf(tie=True)
    path = hf_llama_to_gguf(hf, tmp_path / "m.gguf")
    model = load_model(str(path), dtype="fp32")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf(IDS).logits, atol=1e-5, rtol=1e-5)


# ---- bad input: every problem named ----

def _tensors_of(path):
    f = read_gguf(path)
    return f.meta, {n: (f.to_torch(n).numpy(), "F32") for n in f.tensors}


def test_bad_files(tmp_path):
    hf = tiny_hf(tie=True)
    good = hf_llama_to_gguf(hf, tmp_path / "good.gguf")
    meta, tensors = _tensors_of(good)
    kv = {k: v for k, v in meta.items() if k != "general.architecture"}

    extra = dict(tensors, **{"blk.0.attn_qkv.weight": (np.zeros((4, 4), np.float32), "F32")})
    with pytest.raises(GptlabError, match=r"no place in the model: \['blk.0.attn_qkv.weight'\]"):
        load_gguf(write_gguf(tmp_path / "extra.gguf", "llama", kv, extra))

    missing = {k: v for k, v in tensors.items() if k != "blk.1.ffn_up.weight"}
    with pytest.raises(GptlabError, match=r"missing keys \['layers.1.mlp.up_proj.weight'\]"):
        load_gguf(write_gguf(tmp_path / "missing.gguf", "llama", kv, missing))

    wrong = dict(tensors, **{"blk.0.ffn_up.weight": (np.zeros((64, 64), np.float32), "F32")})
    with pytest.raises(GptlabError, match=r"wrong shapes layers.0.mlp.up_proj.weight"):
        load_gguf(write_gguf(tmp_path / "wrong.gguf", "llama", kv, wrong))

    nokey = {k: v for k, v in kv.items() if k != "llama.feed_forward_length"}
    with pytest.raises(GptlabError, match="llama.feed_forward_length is missing"):
        load_gguf(write_gguf(tmp_path / "nokey.gguf", "llama", nokey, tensors))

    with pytest.raises(GptlabError, match="architecture 'bert' is not supported"):
        load_gguf(write_gguf(tmp_path / "bert.gguf", "bert", {}, tensors))

    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(GptlabError, match="truncated"):
        load_gguf(tmp_path / "trunc.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:200])
    with pytest.raises(GptlabError, match="not a readable GGUF file|truncated"):
        read_metadata(tmp_path / "head.gguf")
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GptlabError, match="magic"):
        load_gguf(tmp_path / "x.gguf")
    with pytest.raises(GptlabError, match="not found"):
        load_gguf(tmp_path / "nope.gguf")


def test_unsupported_quant_type(tmp_path):
    hf = tiny_hf(tie=True)
    meta, tensors = _tensors_of(hf_llama_to_gguf(hf, tmp_path / "good.gguf"))
    kv = {k: v for k, v in meta.items() if k != "general.architecture"}
    tensors["token_embd.weight"] = (tensors["token_embd.weight"][0], "Q5_0")
    with pytest.raises(GptlabError, match="Q5_0 that gptlab cannot dequantize"):
        load_gguf(write_gguf(tmp_path / "q5.gguf", "llama", kv, tensors))
