"""Tiny random models for the fine-tuning tests."""

import torch


def tiny_gpt2(vocab_size, context_length=96, seed=0, **kw):
    from gptlab.models import build_model
    from gptlab.models.gpt2 import GPT2Config

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, context_length=context_length, emb_dim=kw.pop("emb_dim", 48),
                     n_layers=kw.pop("n_layers", 2), n_heads=2, drop_rate=0.0, **kw)
    return build_model(cfg)


def tiny_llama(vocab_size, context_length=96, seed=0, **kw):
    from gptlab.models import build_model
    from gptlab.models.llama import LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=kw.pop("emb_dim", 48),
                      n_layers=kw.pop("n_layers", 2), n_heads=4, n_kv_heads=2, hidden_dim=96, **kw)
    return build_model(cfg)
