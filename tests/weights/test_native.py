"""gptlab's own directory format: the checkpoint kind in config.json, typed classifier/LoRA facts, one reader."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.models import build_model
from gptlab.models.base import ClassifierInfo, LoraConfig
from gptlab.models.gpt2 import GPT2Config
from gptlab.weights import load_model
from gptlab.weights.native import CheckpointInfo, load_native, read_info, save_model_dir

INFO = {"labels": ["ham", "spam"], "max_length": 16, "pad_id": 0, "base_model": "x", "trainable": "last-1"}


def _tiny():
    torch.manual_seed(0)
    return build_model(GPT2Config(vocab_size=40, context_length=16, emb_dim=16, n_layers=1, n_heads=2))


def _classifier():
    from gptlab.finetune.surgery import replace_output_head

    model = _tiny()
    replace_output_head(model, 2)
    model.classifier = ClassifierInfo.from_dict(INFO)
    return model


def test_kind_is_declared_and_classifier_facts_are_typed(tmp_path):
    save_model_dir(_tiny(), tmp_path / "lm")
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["kind"] == "lm"
    assert read_info(tmp_path / "lm") == CheckpointInfo("lm")

    save_model_dir(_classifier(), tmp_path / "clf")
    meta = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert meta["kind"] == "classifier" and meta["classifier"] == INFO
    model = load_native(tmp_path / "clf")
    assert model.classifier == ClassifierInfo(**INFO) and model.get_head().out_features == 2
    with pytest.raises(GptlabError, match="is a classifier"):
        load_model(tmp_path / "clf")


def test_old_directories_without_kind_are_recognised_as_before(tmp_path):
    save_model_dir(_classifier(), tmp_path / "clf")
    cfg = tmp_path / "clf" / "config.json"
    meta = json.loads(cfg.read_text())
    del meta["kind"]
    cfg.write_text(json.dumps(meta))
    assert read_info(tmp_path / "clf").kind == "classifier"  # by its "classifier" entry
    del meta["classifier"]
    cfg.write_text(json.dumps(meta))
    info = read_info(tmp_path / "clf")
    assert info.kind == "classifier" and info.classifier is None  # by its head (2 rows and a bias)


def test_lora_settings_travel_typed(tmp_path):
    from gptlab.finetune.lora import add_lora, merge_lora

    model = _tiny()
    add_lora(model, LoraConfig(rank=2, alpha=4.0))
    assert model.lora == LoraConfig(rank=2, alpha=4.0)
    save_model_dir(model, tmp_path / "ck")
    assert read_info(tmp_path / "ck").lora == LoraConfig(rank=2, alpha=4.0)
    merge_lora(model)
    assert model.lora is None


def test_an_unknown_kind_is_one_clear_error(tmp_path):
    save_model_dir(_tiny(), tmp_path / "m")
    cfg = tmp_path / "m" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "kind": "vision"}))
    with pytest.raises(GptlabError, match="kind 'vision'; known kinds: lm, classifier"):
        load_model(tmp_path / "m")


def test_nothing_is_registered_at_import_time():
    """refs is the ground floor; importing gptlab.weights adds no tokenizer resolver."""
    code = ("import sys, gptlab.refs; assert not any(m.startswith(('gptlab.weights', 'gptlab.tokenizers')) "
            "for m in sys.modules), sorted(sys.modules)\n"
            "from gptlab.tokenizers import loading; n = len(loading.RESOLVERS); import gptlab.weights; "
            "assert len(loading.RESOLVERS) == n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_api_refuses_bad_arguments_in_one_line(tmp_path):
    """load_model's arguments are checked before anything loads (was AssertionError / RuntimeError tracebacks)."""
    import torch

    from gptlab.models import build_model
    from gptlab.models.gpt2 import GPT2Config

    out = save_model_dir(build_model(GPT2Config(vocab_size=20, context_length=8, emb_dim=8, n_layers=1, n_heads=2)),
                         tmp_path / "m")
    if not torch.cuda.is_available():
        with pytest.raises(GptlabError, match="no CUDA GPU is available here"):
            load_model(out, device="cuda")
    with pytest.raises(GptlabError, match="device='tpu' is not a device"):
        load_model(out, device="tpu")
    for bad in (None, "", 3):
        with pytest.raises(GptlabError, match="model reference must be a non-empty path or name"):
            load_model(bad)


def test_a_run_without_a_model_yet_is_named_as_a_run(tmp_path):
    """A run interrupted before its first save said 'has no config.json: not a gptlab model directory'."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train_config.yaml").write_text("settings: {}\n")
    with pytest.raises(GptlabError, match="is a training run with no model saved yet"):
        load_model(run_dir)
