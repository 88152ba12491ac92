"""inspect: counts, memory, FLOPs, reading and editing a single weight."""

import pytest
import torch

from gptlab.cli import run
from gptlab.errors import GptlabError
from gptlab.inspect import get_weight, set_weight, summarize
from gptlab.models import build_model
from gptlab.models.gpt2 import GPT2Config


def test_summary_counts_and_memory():
    torch.manual_seed(0)
    m = build_model(GPT2Config(vocab_size=100, context_length=8, emb_dim=16, n_layers=1, n_heads=2))
    s = summarize(m)
    n = sum(p.numel() for p in m.parameters())
    assert s["parameters"]["total"] == s["parameters"]["actual"] == n
    assert s["memory_bytes"]["fp32"] == 4 * n and s["memory_bytes"]["bf16"] == 2 * n
    assert s["flops_per_token_training"] == 3 * s["flops_per_token_forward"] > 2 * n


def test_edit_one_weight_like_the_course():
    m = build_model(GPT2Config(vocab_size=100, context_length=8, emb_dim=16, n_layers=1, n_heads=2))
    set_weight(m, "blocks.0.norm1.weight", 0.1, index=0)
    assert get_weight(m, "blocks.0.norm1.weight")[0].item() == pytest.approx(0.1)
    assert m.blocks[0].norm1.weight[1].item() == 1.0
    with pytest.raises(GptlabError, match="no weight named"):
        get_weight(m, "h.0.ln_1.weight")
    with pytest.raises(GptlabError, match="has shape"):
        set_weight(m, "blocks.0.norm1.weight", torch.ones(3))


def test_inspect_cli_on_a_preset(capsys):
    assert run(["inspect", "gpt2-124m", "--tree", "false", "--params", "false"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "non-embedding:        85,056,000" in out


def test_flops_use_the_sliding_window(capsys):
    from gptlab.models.llama import LlamaConfig

    # Mistral-like: a token attends to the last W=16 keys, not the whole 64-token context.
    cfg = LlamaConfig(vocab_size=100, context_length=64, emb_dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      hidden_dim=64, sliding_window=16, tie_embeddings=False)
    full = cfg.replace(sliding_window=None)
    c = cfg.param_counts()
    matmul = 2 * (c["total"] - c["embedding"] + 100 * 32)
    assert cfg.attended_tokens() == 16 and full.attended_tokens() == 64
    assert cfg.flops_per_token() == matmul + 4 * 2 * 16 * 4 * 8  # 4 · L · min(T, W) · H · hd
    assert full.flops_per_token() == matmul + 4 * 2 * 64 * 4 * 8
    assert cfg.flops_per_token(8) == full.flops_per_token(8)  # shorter than the window: no difference
    assert summarize(build_model(cfg))["flops_per_token_forward"] == cfg.flops_per_token()
    assert run(["inspect", "mistral-7b", "--tree", "false", "--params", "false"]) == 0
    out = capsys.readouterr().out  # 31.66G if every token attended to all 32768 keys
    assert "FLOPs per token: forward 16.63G" in out and "(sliding window 4096)" in out
