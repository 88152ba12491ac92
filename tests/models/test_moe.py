"""The Llama family's mixture of experts: config checks, exact and active sizes (inspect and fit from the
same config), routing against a hand-written reference, the load-balancing loss against transformers'."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gptlab.models import build_model, empty_model, get_preset
from gptlab.models.config import ConfigError
from gptlab.models.llama import LlamaConfig
from gptlab.models.moe import balance_loss


def tiny(**kw) -> LlamaConfig:
    base = dict(vocab_size=64, context_length=32, emb_dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                n_experts=4, experts_per_token=2)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.mark.parametrize("fields, msg", [
    (dict(experts_per_token=0), "experts_per_token=0 must be between 1 and n_experts=4"),
    (dict(experts_per_token=5), "experts_per_token=5 must be between 1 and n_experts=4"),
    (dict(n_experts=-1), "n_experts=-1 must be >= 0"),
    (dict(n_experts=0), "need n_experts > 0"),
    (dict(shared_expert_dim=0), "shared_expert_dim=0 must be >= 1"),
    (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef=-0.1 must be >= 0"),
    (dict(n_experts=2.5), "n_experts=2.5 must be int"),
])
def test_bad_moe_fields_are_refused_by_name(fields, msg):
    with pytest.raises(ConfigError, match=msg):
        tiny(**fields)


def test_mixtral_preset_matches_the_published_sizes():
    c = get_preset("mixtral-8x7b").param_counts()
    assert c["total"] == 46_702_792_704  # transformers' num_parameters() of Mixtral-8x7B
    # active: everything but 6 of 8 experts per layer (32 layers x 3 x 4096 x 14336 each)
    assert c["active"] == c["total"] - 32 * 6 * 3 * 4096 * 14336 == 12_879_925_248
    assert (c["experts"], c["experts_active"], c["experts_shared"]) == (8, 2, 0)


@pytest.mark.parametrize("fields", [dict(), dict(shared_expert_dim=40, qkv_bias=True, norm_topk=False),
                                    dict(tie_embeddings=False, n_experts=3, experts_per_token=1)])
def test_counts_equal_the_built_model_and_active_counts_k_experts(fields):
    cfg = tiny(**fields)
    model = build_model(cfg)
    c = cfg.param_counts()
    assert c["total"] == sum(p.numel() for p in model.parameters())
    one_expert = sum(p.numel() for p in model.layers[0].mlp.experts[0].parameters())
    assert c["active"] == c["total"] - cfg.n_layers * (cfg.n_experts - cfg.experts_per_token) * one_expert
    assert cfg.active_params() == c["active"]
    dense = tiny(n_experts=0, experts_per_token=0).param_counts()
    assert dense["active"] == dense["total"] and dense["experts"] == 0


def _reference_moe(mlp, x: torch.Tensor, norm: bool) -> torch.Tensor:
    """Token by token: softmax router, top k, optional renormalisation, weighted sum (+ gated shared expert)."""
    out = []
    for h in x.reshape(-1, x.shape[-1]):
        p = F.softmax(mlp.gate.weight @ h, dim=-1)
        w, idx = p.topk(mlp.k)
        w = w / w.sum() if norm else w
        y = sum(wj * mlp.experts[int(j)](h[None])[0] for wj, j in zip(w, idx))
        if mlp.shared_expert is not None:
            y = y + torch.sigmoid(mlp.shared_expert_gate(h)) * mlp.shared_expert(h[None])[0]
        out.append(y)
    return torch.stack(out).view(x.shape)


@pytest.mark.parametrize("norm, shared", [(True, None), (False, 24)])
def test_routing_matches_a_token_by_token_reference(norm, shared):
    torch.manual_seed(0)
    model = build_model(tiny(norm_topk=norm, shared_expert_dim=shared, qkv_bias=shared is not None)).eval()
    mlp = model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), _reference_moe(mlp, x, norm), atol=1e-6, rtol=1e-5)
        counts, probs, n = mlp.stats
    assert n == 10 and int(counts.sum()) == 10 * 2  # every token made k assignments
    torch.testing.assert_close(probs.sum(), torch.tensor(10.0))


def test_aux_loss_is_the_coefficient_times_the_balance_loss_and_trains_the_router():
    torch.manual_seed(0)
    model = build_model(tiny(router_aux_loss_coef=0.05))
    assert model.aux_loss() is None  # before any forward call
    model(torch.randint(0, 64, (2, 8)))
    balance = balance_loss([layer.mlp for layer in model.layers])
    assert balance >= 2.0 - 1e-4  # E·sum f·P is at least k (= 2) and equals it when perfectly balanced
    torch.testing.assert_close(model.aux_loss(), 0.05 * balance)
    model.aux_loss().backward()
    assert model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    assert build_model(tiny()).aux_loss() is None  # coefficient 0: no auxiliary loss


def test_balance_loss_and_training_loss_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from gptlab.training.loop import LanguageModeling
    from gptlab.weights import load_model

    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.03)
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "mixtral")
    ours = load_model(tmp_path / "mixtral")
    assert ours.cfg.router_aux_loss_coef == pytest.approx(0.03)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids, labels=ids, output_router_logits=True)
        # the training task's loss: cross-entropy + coef x the balance loss of the same call
        loss = LanguageModeling().loss(ours, (ids[:, :-1], ids[:, 1:]))
        ce = F.cross_entropy(ours(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        torch.testing.assert_close(loss, ce + ours.aux_loss(), atol=1e-6, rtol=1e-6)
        logits = ours(ids)  # transformers' router statistics cover all 9 positions
    balance = balance_loss([layer.mlp for layer in ours.layers])
    torch.testing.assert_close(balance, ref.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(balance, load_balancing_loss_func(ref.router_logits, 4, 2), atol=1e-6, rtol=1e-6)
    ce_all = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(ce_all + ours.aux_loss(), ref.loss, atol=1e-5, rtol=1e-5)


def test_inspect_and_fit_report_the_same_total_and_active(capsys):
    from gptlab.cli import run
    from gptlab.fit.catalog import spec_from_ref
    from gptlab.inspect import summarize

    cfg = get_preset("moe-micro")
    c = cfg.param_counts()
    s = summarize(empty_model(cfg))["parameters"]
    spec = spec_from_ref("moe-micro")
    assert (s["total"], s["active"]) == (spec.params_total, spec.params_active) == (c["total"], c["active"])
    assert c["active"] < c["total"] and (spec.n_experts, spec.n_experts_active) == (4, 2)
    assert run(["inspect", "moe-micro", "--params", "false", "--tree", "false"]) == 0
    out = capsys.readouterr().out
    assert f"total parameters:     {c['total']:,}" in out
    assert f"active per token:     {c['active']:,}" in out and "2 of 4 experts + a shared one" in out
    assert run(["fit", "--model", "moe-micro", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert json.dumps(plan).count(str(c["active"])) >= 1 and json.dumps(plan).count(str(c["total"])) >= 1


def test_fit_counts_a_mixtral_config_json_as_the_loaded_model_does():
    transformers = pytest.importorskip("transformers")
    from gptlab.fit.catalog import spec_from_hf_config
    from gptlab.models.llama import hf_config

    hf = transformers.Qwen2MoeConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, num_experts=6,
                                     num_experts_per_tok=2, moe_intermediate_size=40,
                                     shared_expert_intermediate_size=80).to_dict()
    spec = spec_from_hf_config(hf, "qwen2-moe")  # fit counts from config.json keys
    ours = hf_config(hf, "Qwen2MoeForCausalLM").param_counts()  # what gptlab builds from it
    assert (spec.params_total, spec.params_active) == (ours["total"], ours["active"])


def test_batched_engine_decodes_a_moe_as_generate_does_alone():
    """Routing is per token, so a slot batch (each row at its own position) gives each prompt's solo tokens."""
    from gptlab.inference.engine import Engine, Request
    from gptlab.inference.generation import generate

    torch.manual_seed(0)
    model = build_model(tiny(shared_expert_dim=24, qkv_bias=True, norm_topk=False)).eval()
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3], [40]]
    engine = Engine(model, max_batch=3, prefill_chunk=4)
    handles = [engine.submit(Request(p, max_tokens=6)) for p in prompts]
    list(engine.run())
    for p, h in zip(prompts, handles):
        alone = generate(model, torch.tensor([p]), 6)[0, len(p):].tolist()
        assert h.tokens == alone


def test_configs_transformers_cannot_represent_are_refused_on_export():
    from gptlab.errors import GptlabError
    from gptlab.weights.export import config_to_hf

    with pytest.raises(GptlabError, match="Mixtral always renormalises"):
        config_to_hf(tiny(norm_topk=False))
    with pytest.raises(GptlabError, match="exports as Qwen2-MoE, which needs qkv_bias=True"):
        config_to_hf(tiny(shared_expert_dim=16))
    assert config_to_hf(tiny())["architectures"] == ["MixtralForCausalLM"]
    hf = config_to_hf(tiny(shared_expert_dim=16, qkv_bias=True))
    assert (hf["model_type"], hf["num_experts"], hf["moe_intermediate_size"]) == ("qwen2_moe", 4, 48)


def test_qwen2_moe_with_dense_layers_is_refused_in_one_line():
    from gptlab.errors import GptlabError
    from gptlab.weights.hf import config_from_hf

    hf = dict(architectures=["Qwen2MoeForCausalLM"], vocab_size=64, max_position_embeddings=64, hidden_size=32,
              num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, num_experts=4,
              num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=32,
              decoder_sparse_step=2)
    with pytest.raises(GptlabError, match=r"dense layers \(decoder_sparse_step=2"):
        config_from_hf(hf)
    cfg = config_from_hf({**hf, "decoder_sparse_step": 1})
    assert (cfg.n_experts, cfg.hidden_dim, cfg.shared_expert_dim, cfg.norm_topk) == (4, 24, 32, False)


def test_gguf_names_of_stacked_experts_map_to_our_experts():
    from gptlab.weights.gguf import map_name

    assert map_name("blk.3.ffn_gate_exps.weight") == "layers.3.mlp.experts.{e}.gate_proj.weight"
    assert map_name("blk.0.ffn_gate_inp.weight") == "layers.0.mlp.gate.weight"
    assert map_name("blk.1.ffn_gate_inp_shexp.weight") == "layers.1.mlp.shared_expert_gate.weight"
    assert map_name("blk.1.ffn_down_shexp.weight") == "layers.1.mlp.shared_expert.down_proj.weight"
