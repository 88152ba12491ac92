"""The Llama family model and config: published sizes, config checks, attention
variants, tying, meta-device building and native save/load."""

from __future__ import annotations

import pytest
import torch

from gptlab.models import build_model, get_preset, list_presets
from gptlab.models.config import ConfigError, ModelConfig
from gptlab.models.llama import Llama, LlamaConfig

# Published parameter counts (model cards / transformers' num_parameters()).
PUBLISHED = {
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "gemma-2b": 2_506_172_416,
    "qwen2.5-0.5b": 494_032_768,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
}
LLAMA_PRESETS = [n for n in ["llama-2-7b", "llama-3-8b", "llama-3.2-1b", "llama-3.2-3b", "mistral-7b",
                             "mistral-small-24b", "gemma-2b", "qwen2.5-0.5b", "smollm2-135m", "smollm2-360m",
                             "smollm2-1.7b", "llama-micro"]]


def tiny(**kw) -> LlamaConfig:
    base = dict(vocab_size=64, context_length=32, emb_dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    assert get_preset(name).param_counts()["total"] == PUBLISHED[name]


@pytest.mark.parametrize("name", LLAMA_PRESETS)
def test_counts_equal_transformers_model_built_from_preset(name):
    """Build the transformers model from the exported config on the meta device and count."""
    transformers = pytest.importorskip("transformers")
    from gptlab.weights.export import config_to_hf

    hf = config_to_hf(get_preset(name))
    cfg = transformers.AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items()
                                                                    if k != "architectures"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert type(model).__name__ == hf["architectures"][0]
    assert model.num_parameters() == get_preset(name).param_counts()["total"]


def test_presets_registered_and_counts_match_module():
    assert set(LLAMA_PRESETS) <= set(list_presets())
    for cfg in (get_preset("llama-micro"), tiny(tie_embeddings=False, qkv_bias=True)):
        model = build_model(cfg)
        assert isinstance(model, Llama)
        assert sum(p.numel() for p in model.parameters()) == cfg.param_counts()["total"]
    c = get_preset("gemma-2b").param_counts()
    assert c["tied"] == c["embedding"] == 256000 * 2048 and c["non_embedding"] == c["total"] - c["embedding"]


def test_config_round_trip_and_family():
    cfg = get_preset("llama-3.2-1b")
    again = ModelConfig.from_dict(cfg.to_dict())
    assert isinstance(again, LlamaConfig) and again == cfg
    assert again.rope_scaling["factor"] == 32.0 and again.n_kv_heads == 8 and again.head_dim == 64


@pytest.mark.parametrize("kw, match", [
    (dict(hidden_dim=None), "needs hidden_dim.*hidden_dim=256 for emb_dim=32"),
    (dict(head_dim=5), "head_dim=5 must be even"),
    (dict(mlp_act="relu"), "mlp_act='relu' must be one of silu, gelu_tanh"),
    (dict(sliding_window=0), "sliding_window=0 must be >= 1"),
    (dict(rope_scaling={"factor": 8.0}), "rope_scaling is missing low_freq_factor"),
    (dict(n_kv_heads=3), "multiple of n_kv_heads=3"),
    (dict(attn_impl="flash"), "attn_impl='flash'"),
])
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kw)


def test_forward_shapes_and_context_limit():
    model = build_model(tiny()).eval()
    ids = torch.randint(0, 64, (3, 7))
    assert model(ids).shape == (3, 7, 64)
    assert model.features(ids).shape == (3, 7, 32)
    with pytest.raises(ValueError, match="exceeds context_length 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_tied_output_head_is_the_embedding():
    model = build_model(tiny())
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = build_model(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_sliding_window_limits_what_a_token_sees():
    torch.manual_seed(0)
    model = build_model(tiny(n_layers=1, sliding_window=3)).eval()
    ids = torch.randint(1, 64, (1, 8))
    changed = ids.clone()
    changed[0, 0] = 0
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert not torch.allclose(a[0, 2], b[0, 2])  # position 2 still sees token 0
    torch.testing.assert_close(a[0, 3:], b[0, 3:])  # positions >= 3 no longer do


def test_math_and_sdpa_attention_agree():
    torch.manual_seed(0)
    a = build_model(tiny(sliding_window=4)).eval()
    b = build_model(tiny(sliding_window=4, attn_impl="math")).eval()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), atol=1e-5, rtol=1e-5)


def test_gemma_fields_change_the_computation():
    torch.manual_seed(0)
    base = build_model(tiny()).eval()
    ids = torch.randint(0, 64, (1, 6))
    for field in ("embed_scale", "norm_unit_offset"):
        other = build_model(tiny(**{field: True})).eval()
        other.load_state_dict(base.state_dict())
        with torch.no_grad():
            assert not torch.allclose(base(ids), other(ids)), field
    fresh = build_model(tiny(norm_unit_offset=True))
    assert torch.count_nonzero(fresh.norm.weight) == 0  # (1 + w) starts at identity


def test_meta_build_then_reset_buffers_matches_normal_build():
    cfg = tiny(rope_theta=5e5, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 16})
    model = build_model(cfg)
    with torch.device("meta"):
        meta = build_model(cfg)
    meta.load_state_dict(model.state_dict(), assign=True)
    meta.tie_weights()
    meta.reset_buffers()
    assert meta.inv_freq.device.type == "cpu"
    torch.testing.assert_close(meta.inv_freq, model.inv_freq)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert torch.equal(meta.eval()(ids), model.eval()(ids))


def test_native_save_load_round_trip(tmp_path):
    from gptlab.weights import load_model
    from gptlab.weights.native import save_model_dir

    torch.manual_seed(0)
    for tied in (True, False):
        model = build_model(tiny(tie_embeddings=tied, qkv_bias=True)).eval()
        save_model_dir(model, tmp_path / str(tied))
        loaded = load_model(tmp_path / str(tied))
        assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
        ids = torch.randint(0, 64, (2, 5))
        with torch.no_grad():
            assert torch.equal(loaded(ids), model(ids))


def test_small_llama_learns():
    """A few AdamW steps on a fixed batch lower the loss: every part gets gradients and trains."""
    torch.manual_seed(0)
    model = build_model(tiny(context_length=64, qkv_bias=True))
    ids = torch.randint(0, 64, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
