"""LoRA: starts at the base model, merged == unmerged, only adapters train, peft loads our adapters."""

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.finetune.lora import (LoraConfig, LoRALinear, add_lora, load_adapter, lora_modules, merge_lora,
                                  merged_copy, save_adapter)
from gptlab.finetune.surgery import apply_freezing
from ft_helpers import tiny_gpt2, tiny_llama


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_starts_at_base_and_merge_equals_unmerged(make):
    model = make(50).eval()
    x = torch.randint(0, 50, (2, 9))
    base = model(x)
    names = add_lora(model, LoraConfig(rank=4, alpha=8))
    assert len(names) == (4 if make is tiny_gpt2 else 7) * 2  # every linear layer of both blocks
    assert torch.allclose(model(x), base, atol=1e-6)  # B = 0: no change yet
    _randomize_lora(model)
    unmerged = model(x)
    assert not torch.allclose(unmerged, base, atol=1e-3)
    merged = merged_copy(model)
    assert not lora_modules(merged) and lora_modules(model)  # the copy is merged, the original is not
    assert torch.allclose(merged(x), unmerged, atol=1e-5)
    merge_lora(model)
    assert type(model.get_submodule(names[0])) is torch.nn.Linear
    assert torch.allclose(model(x), unmerged, atol=1e-5)


def test_only_adapters_train_and_targets():
    model = tiny_llama(50)
    add_lora(model, LoraConfig(rank=2, targets=["q_proj", "v_proj"]))
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_modules(model)}) == ["q_proj", "v_proj"]
    counts = apply_freezing(model, "lora")
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert isinstance(model.layers[0].self_attn.q_proj, LoRALinear)
    assert "layers.0.self_attn.q_proj.weight" in model.state_dict()  # base keys unchanged
    with pytest.raises(GptlabError, match="no linear layer matches"):
        add_lora(tiny_llama(50), LoraConfig(targets=["c_attn"]))
    with pytest.raises(GptlabError, match="rank=0"):
        add_lora(tiny_llama(50), LoraConfig(rank=0))
    with pytest.raises(GptlabError, match="already has LoRA"):
        add_lora(model, LoraConfig())
    with pytest.raises(GptlabError, match="no LoRA adapters to save"):
        save_adapter(tiny_llama(50), "/tmp/unused")


def test_adapter_roundtrip(tmp_path):
    model = tiny_llama(50)
    add_lora(model, LoraConfig(rank=3, alpha=6, targets=["q_proj", "down_proj"]))
    _randomize_lora(model)
    save_adapter(model, tmp_path / "ad", base_model="tiny")
    fresh = tiny_llama(50)
    load_adapter(fresh, tmp_path / "ad")
    x = torch.randint(0, 50, (1, 7))
    assert torch.allclose(fresh(x), model(x), atol=1e-6)
    with pytest.raises(GptlabError, match="not a LoRA adapter directory"):
        load_adapter(tiny_llama(50), tmp_path)


transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HF = {
    "llama": ("LlamaForCausalLM", "LlamaConfig",
              dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                   bos_token_id=None, eos_token_id=None, pad_token_id=None)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             dict(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=None,
                  eos_token_id=None)),
}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_loads_our_adapter_with_the_same_logits(tmp_path, family):
    from gptlab.weights import load_model

    cls_name, cfg_name, kw = HF[family]
    cfg = getattr(transformers, cfg_name)(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(cfg).eval()
    hf.save_pretrained(tmp_path / "base")
    ours = load_model(tmp_path / "base").float()
    add_lora(ours, LoraConfig(rank=4, alpha=8))
    _randomize_lora(ours, seed=1)
    save_adapter(ours, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    merged = merged_copy(ours).eval()
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        base = hf(x).logits
        ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(x).logits
        assert not torch.allclose(ref, base, atol=1e-3)  # the adapter changes the output...
        assert torch.allclose(merged(x), ref, atol=1e-4)  # ...exactly as our merged model does
