"""Parity with Hugging Face transformers: tiny random checkpoints saved with
``save_pretrained`` load into gptlab with the same logits, greedy tokens and
cached decoding; bad directories give clear errors."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gptlab.errors import GptlabError  # noqa: E402
from gptlab.inference.generation import generate  # noqa: E402
from gptlab.weights import load_model  # noqa: E402

V = 96
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def _common(**kw):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
    base.update(kw)
    return base


# name -> (transformers class name, config class name, config kwargs)
CASES = {
    "llama-gqa-rope3-untied": ("LlamaForCausalLM", "LlamaConfig",
                               _common(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=False)),
    "llama-tied": ("LlamaForCausalLM", "LlamaConfig", _common(tie_word_embeddings=True, num_key_value_heads=4)),
    "mistral-window": ("MistralForCausalLM", "MistralConfig", _common(sliding_window=5, tie_word_embeddings=False)),
    "qwen2-bias": ("Qwen2ForCausalLM", "Qwen2Config", _common(tie_word_embeddings=True, rope_theta=1e6)),
    "gemma": ("GemmaForCausalLM", "GemmaConfig",
              _common(head_dim=32, num_key_value_heads=1, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)),
    # mixtures of experts: top-2 of 4 renormalised (Mixtral); top-3 of 6 not renormalised + a gated shared expert
    "mixtral-moe": ("MixtralForCausalLM", "MixtralConfig",
                    _common(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                            router_aux_loss_coef=0.02)),
    "qwen2-moe-shared": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                         _common(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=40,
                                 shared_expert_intermediate_size=72, norm_topk_prob=False, tie_word_embeddings=True)),
    "qwen2-moe-norm": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                       _common(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               shared_expert_intermediate_size=48, norm_topk_prob=True, tie_word_embeddings=False)),
}


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (norm scales and biases too), so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)


def make_hf(case: str, tmp_path, **save_kw):
    cls_name, cfg_name, kw = CASES[case]
    cfg = getattr(transformers, cfg_name)(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(cfg).eval()
    _randomize(hf)
    out = tmp_path / case
    hf.save_pretrained(out, **save_kw)
    return hf, out


def make_hf_gpt2(tmp_path, activation_function="gelu_new", **save_kw):
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  activation_function=activation_function)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    _randomize(hf)
    out = tmp_path / "gpt2"
    hf.save_pretrained(out, **save_kw)
    return hf, out


def hf_greedy(hf, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Reference greedy decoding: full recomputation with the transformers model each step."""
    out = ids
    for _ in range(n):
        nxt = hf(out).logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
    return out


IDS = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


def _check_parity(hf, ours):
    with torch.no_grad():
        ref = hf(IDS).logits
        got = ours(IDS)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ref_tokens = hf_greedy(hf, IDS[:, :5], 8)
    assert torch.equal(generate(ours, IDS[:, :5], 8), ref_tokens)


@pytest.mark.parametrize("case", list(CASES))
def test_llama_family_logits_and_greedy_match_transformers(case, tmp_path):
    hf, path = make_hf(case, tmp_path)
    ours = load_model(path)
    assert ours.cfg.family == "llama"
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    assert ours.cfg.param_counts()["total"] == sum(p.numel() for p in hf.parameters())
    _check_parity(hf, ours)


@pytest.mark.parametrize("case", list(CASES))
def test_cached_decoding_equals_full_recomputation(case, tmp_path):
    _, path = make_hf(case, tmp_path)
    model = load_model(path)
    with torch.no_grad():
        full = model(IDS)
        cache = model.new_cache(IDS.shape[0], IDS.shape[1])
        steps = [model(IDS[:, :4], cache)]  # prefill 4 tokens, then one at a time
        steps += [model(IDS[:, t:t + 1], cache) for t in range(4, IDS.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_config_fields_follow_architecture(tmp_path):
    _, mistral = make_hf("mistral-window", tmp_path)
    _, gemma = make_hf("gemma", tmp_path)
    _, llama = make_hf("llama-gqa-rope3-untied", tmp_path)
    m, g, l = load_model(mistral).cfg, load_model(gemma).cfg, load_model(llama).cfg
    assert m.sliding_window == 5 and not m.embed_scale
    assert g.embed_scale and g.norm_unit_offset and g.mlp_act == "gelu_tanh" and g.head_dim == 32
    assert l.rope_theta == 500000.0 and l.rope_scaling["factor"] == 8.0 and l.n_kv_heads == 2
    assert not l.tie_embeddings and g.tie_embeddings


def test_gpt2_logits_and_greedy_match_transformers(tmp_path):
    hf, path = make_hf_gpt2(tmp_path)
    ours = load_model(path)
    assert type(ours).__name__ == "GPT2"
    _check_parity(hf, ours)


def test_gpt2_with_the_exact_gelu_matches_transformers_both_ways(tmp_path):
    """activation_function="gelu" (nanoGPT's nn.GELU()) loads as mlp_act="gelu" and exports back to it."""
    from gptlab.weights.export import export_hf
    from gptlab.weights.gguf_export import gguf_architecture

    hf, path = make_hf_gpt2(tmp_path, activation_function="gelu")
    ours = load_model(path)
    assert ours.cfg.mlp_act == "gelu"
    _check_parity(hf, ours)
    tanh = load_model(make_hf_gpt2(tmp_path / "tanh")[1])
    with torch.no_grad():  # the two GELUs' logits differ by more than the parity tolerance (1e-5)
        assert (tanh(IDS) - ours(IDS)).abs().max() > 2e-5
    export_hf(ours, tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["activation_function"] == "gelu"
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, hf(IDS).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(GptlabError, match="mlp_act='gelu' is not supported.*--format hf"):
        gguf_architecture(ours.cfg)


def test_gpt2_checkpoint_without_transformer_prefix(tmp_path):
    """The original ``gpt2`` repo stores keys as ``h.0...``/``wte.weight`` (saved from GPT2Model)."""
    from safetensors.torch import load_file, save_file

    hf, path = make_hf_gpt2(tmp_path)
    state = load_file(str(path / "model.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in state.items()}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)  # the old causal-mask buffer, ignored
    save_file(bare, str(path / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(load_model(path)(IDS), hf(IDS).logits, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint(tmp_path):
    hf, path = make_hf("llama-gqa-rope3-untied", tmp_path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        torch.testing.assert_close(load_model(path)(IDS), hf(IDS).logits, atol=1e-5, rtol=1e-5)


def test_dtype_conversion_on_load(tmp_path):
    _, path = make_hf("qwen2-bias", tmp_path)
    model = load_model(path, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(IDS).dtype == torch.bfloat16
    assert load_model(path).embed_tokens.weight.dtype == torch.float32  # stored dtype kept by default
    m = load_model(path)
    assert m.lm_head.weight is m.embed_tokens.weight


def test_v5_rope_parameters_layout(tmp_path):
    """transformers 5 writes ``rope_parameters``; older files ``rope_theta`` + ``rope_scaling``: both read."""
    from gptlab.weights.hf import config_from_hf

    old = {"architectures": ["LlamaForCausalLM"], **_common(rope_theta=5e5, rope_scaling=dict(LLAMA3_ROPE))}
    new = {"architectures": ["LlamaForCausalLM"],
           **_common(rope_parameters={**LLAMA3_ROPE, "rope_theta": 5e5})}
    a, b = config_from_hf(old), config_from_hf(new)
    assert a.rope_theta == b.rope_theta == 5e5
    assert a.rope_scaling == b.rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}


# ---- bad input ----

def test_missing_config_json(tmp_path):
    _, path = make_hf("llama-tied", tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(GptlabError, match="no config.json"):
        load_model(path)


def test_unknown_architecture(tmp_path):
    _, path = make_hf("llama-tied", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GptlabError, match="unsupported architecture BertForMaskedLM.*LlamaForCausalLM"):
        load_model(path)


def test_wrong_shapes_are_named(tmp_path):
    _, path = make_hf("llama-gqa-rope3-untied", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 80  # weights have 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GptlabError, match=r"wrong shapes: model\.layers\.0\.mlp\.gate_proj\.weight is \(96, 64\), "
                                          r"expected \(80, 64\); .*down_proj"):
        load_model(path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = make_hf("llama-gqa-rope3-untied", tmp_path)
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    state["model.layers.0.mystery.weight"] = torch.zeros(3)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(GptlabError, match=r"missing keys: model\.layers\.1\.self_attn\.k_proj\.weight; "
                                          r"unexpected keys: model\.layers\.0\.mystery\.weight"):
        load_model(path)


def test_truncated_safetensors(tmp_path):
    _, path = make_hf("llama-tied", tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(GptlabError, match="corrupt or truncated.*re-download"):
        load_model(path)


def test_no_weights_file(tmp_path):
    _, path = make_hf("llama-tied", tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(GptlabError, match="no model.safetensors.*pytorch_model.bin.*convert them to safetensors"):
        load_model(path)


def test_missing_shard(tmp_path):
    _, path = make_hf("llama-gqa-rope3-untied", tmp_path, max_shard_size="40KB")
    sorted(path.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(GptlabError, match="shard file.*missing"):
        load_model(path)


def test_unsupported_options_are_refused(tmp_path):
    from gptlab.weights.hf import config_from_hf

    base = {"architectures": ["LlamaForCausalLM"], **_common()}
    with pytest.raises(GptlabError, match="RoPE scaling type 'yarn' is not supported"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(GptlabError, match="mlp_bias=true is not supported"):
        config_from_hf({**base, "mlp_bias": True})
    with pytest.raises(GptlabError, match="has no 'hidden_size'"):
        config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "vocab_size": 10, "n_positions": 8, "n_embd": 8, "n_layer": 1,
            "n_head": 2}
    with pytest.raises(GptlabError, match="activation_function='relu' is not supported"):
        config_from_hf({**gpt2, "activation_function": "relu"})


def test_tied_checkpoint_that_also_stores_lm_head(tmp_path):
    """Some tied repos store lm_head.weight anyway: it is the embedding, so it is accepted and ignored."""
    from safetensors.torch import load_file, save_file

    hf, path = make_hf("qwen2-bias", tmp_path)
    state = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(path / "model.safetensors"))
    model = load_model(path)
    assert model.lm_head.weight is model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf(IDS).logits, atol=1e-5, rtol=1e-5)
