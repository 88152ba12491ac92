"""Appendix E as a learner runs it: LoRA on the spam classifier, against PEFT as the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gptlab.book import GPT_CONFIG_124M, GPTModel, LinearWithLoRA, LoRALayer, replace_linear_with_lora
from gptlab.errors import GptlabError


def test_trainable_parameter_counts_of_the_course():
    cfg = dict(GPT_CONFIG_124M, context_length=1024, qkv_bias=True)
    with torch.device("meta"):
        model = GPTModel(cfg)
        model.out_head = nn.Linear(768, 2)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 124_441_346
        for p in model.parameters():
            p.requires_grad = False
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0
        replace_linear_with_lora(model, rank=16, alpha=16)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2_666_528
    assert isinstance(model.trf_blocks[0].att.W_query, LinearWithLoRA)
    assert isinstance(model.trf_blocks[0].ff.layers[2], LinearWithLoRA) and isinstance(model.out_head, LinearWithLoRA)


def test_lora_starts_as_the_identity_update_and_adds_alpha_xab():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    wrapped = LinearWithLoRA(linear, rank=2, alpha=3.0)
    x = torch.randn(5, 6)
    assert torch.equal(wrapped(x), linear(x))  # B = 0
    with torch.no_grad():
        wrapped.lora.B.normal_()
    expected = linear(x) + 3.0 * (x @ wrapped.lora.A @ wrapped.lora.B)
    assert torch.allclose(wrapped(x), expected, atol=1e-6)
    assert LoRALayer(6, 4, 2, 1.0).A.shape == (6, 2)


def test_matches_peft_with_lora_alpha_equal_alpha_times_rank():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    ours = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    ours.load_state_dict(base.state_dict())
    rank, alpha = 4, 2.0
    replace_linear_with_lora(ours, rank, alpha)
    ref = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=alpha * rank, target_modules=["0", "2"],
                                                    lora_dropout=0.0))
    with torch.no_grad():
        for i in (0, 2):
            ours[i].lora.B.normal_()
            layer = ref.base_model.model[i]
            layer.lora_A["default"].weight.copy_(ours[i].lora.A.T)  # peft stores (rank, in)
            layer.lora_B["default"].weight.copy_(ours[i].lora.B.T)  # and (out, rank)
    x = torch.randn(4, 8)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_only_the_adapters_train(tiny_cfg):
    torch.manual_seed(123)
    model = GPTModel(dict(tiny_cfg, vocab_size=100))
    for p in model.parameters():
        p.requires_grad = False
    replace_linear_with_lora(model, rank=2, alpha=2)
    before = {n: p.clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 100, (2, 8))
    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora." in n for n in changed)
    with pytest.raises(GptlabError, match="rank=0"):
        replace_linear_with_lora(model, rank=0, alpha=1)
