"""GGUF mixtures of experts: Mixtral (``llama`` + expert_count) and Qwen2-MoE (``qwen2moe``) files written the
way llama.cpp's converter writes them (experts stacked as ``ffn_*_exps``) load with transformers' logits."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_helpers import hf_moe_dir_to_gguf, write_gguf  # noqa: E402
from test_hf_parity import IDS, hf_greedy, make_hf  # noqa: E402  (tests/weights is on sys.path)

from gptlab.errors import GptlabError  # noqa: E402
from gptlab.inference.generation import generate  # noqa: E402
from gptlab.weights import load_model  # noqa: E402
from gptlab.weights.gguf import read_gguf  # noqa: E402

pytest.importorskip("transformers")


@pytest.mark.parametrize("case, squeeze", [("mixtral-moe", False), ("qwen2-moe-shared", False),
                                           ("qwen2-moe-shared", True), ("qwen2-moe-norm", False)])
def test_moe_gguf_matches_transformers(case, squeeze, tmp_path):
    hf, src = make_hf(case, tmp_path)
    path = hf_moe_dir_to_gguf(src, tmp_path / "moe.gguf", squeeze_shared_gate=squeeze)
    assert "blk.0.ffn_gate_exps.weight" in read_gguf(path).tensors  # stacked, as llama.cpp stores them
    ours = load_model(path)
    c = hf.config
    assert ours.cfg.n_experts == getattr(c, "num_local_experts", None) or getattr(c, "num_experts")
    assert ours.cfg.experts_per_token == c.num_experts_per_tok
    # Mixtral renormalises its top-k weights; qwen2moe only with {arch}.expert_weights_norm = true
    assert ours.cfg.norm_topk == (case != "qwen2-moe-shared")
    assert ours.cfg.param_counts()["total"] == sum(p.numel() for p in hf.parameters())
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(generate(ours, IDS[:, :5], 6), hf_greedy(hf, IDS[:, :5], 6))


def test_gptlab_moe_round_trips_through_gguf(tmp_path):
    """gptlab -> HF directory -> GGUF (converter layout) -> gptlab: identical logits."""
    from gptlab.models import build_model, get_preset
    from gptlab.weights.export import export_hf

    torch.manual_seed(0)
    cfg = get_preset("moe-micro").replace(vocab_size=96, n_layers=2)
    model = build_model(cfg).eval()
    src = export_hf(model, tmp_path / "hf")
    back = load_model(hf_moe_dir_to_gguf(src, tmp_path / "m.gguf"))
    for f in ("n_experts", "experts_per_token", "shared_expert_dim", "hidden_dim", "qkv_bias"):
        assert getattr(back.cfg, f) == getattr(cfg, f), f
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), model(IDS), atol=1e-6, rtol=1e-6)


def test_a_file_with_the_wrong_expert_count_is_refused_by_name(tmp_path):
    from gptlab.weights.gguf import read_metadata

    _, src = make_hf("mixtral-moe", tmp_path)
    good = hf_moe_dir_to_gguf(src, tmp_path / "good.gguf")
    f = read_gguf(good)
    meta = read_metadata(good)
    kv = {k: v for k, v in meta.items() if k.startswith("llama.")}
    kv["llama.expert_count"] = 3  # the file stacks 4
    tensors = {n: (f.to_torch(n).numpy(), "F32") for n in f.tensors}
    bad = write_gguf(tmp_path / "bad.gguf", "llama", kv, tensors)
    with pytest.raises(GptlabError, match=r"blk\.0\.ffn_gate_exps\.weight.*does not stack 3 experts"):
        load_model(bad)
