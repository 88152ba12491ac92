"""Knowledge distillation: the loss formula, tokenizer checks, and a small case where the teacher helps."""

import pytest
import torch
import torch.nn.functional as F

from gptlab.cli import run as cli_run
from gptlab.errors import GptlabError
from gptlab.finetune.distill import DistillationTask, check_same_tokenizer, distill, distillation_loss
from ft_helpers import tiny_gpt2


def test_loss_matches_the_formula():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    y[1, 3:] = -100
    total, ce, kl = distillation_loss(s, t, y, alpha=0.3, temperature=2.5)
    keep = (y != -100).flatten()
    ref_ce = F.cross_entropy(s.flatten(0, 1)[keep], y.flatten()[keep])
    # torch's kl_div(input=log q, target=p) is sum p (log p - log q)
    ref_kl = F.kl_div(F.log_softmax(s / 2.5, -1).flatten(0, 1)[keep], F.softmax(t / 2.5, -1).flatten(0, 1)[keep],
                      reduction="batchmean")
    assert torch.allclose(ce, ref_ce, atol=1e-6) and torch.allclose(kl, ref_kl, atol=1e-6)
    assert torch.allclose(total, 0.7 * ref_ce + 0.3 * 2.5 ** 2 * ref_kl, atol=1e-6)
    same = distillation_loss(s, s, y, alpha=1.0, temperature=3.0)
    assert same[2].abs() < 1e-6 and same[0].abs() < 1e-5  # a student equal to its teacher: KL 0
    assert torch.allclose(distillation_loss(s, t, y, alpha=0.0)[0], ref_ce, atol=1e-6)  # alpha 0 = plain CE


def test_task_and_bad_settings():
    teacher, student = tiny_gpt2(20, seed=1), tiny_gpt2(20, seed=2, emb_dim=16, n_layers=1)
    task = DistillationTask(teacher, alpha=0.5, temperature=2.0)
    x, y = torch.randint(0, 20, (2, 8)), torch.randint(0, 20, (2, 8))
    r = task.evaluate(student, [(x, y)])
    assert set(r) == {"loss", "perplexity", "kl", "distill_loss"} and r["kl"] > 0
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(GptlabError, match="alpha=2"):
        DistillationTask(teacher, alpha=2)
    with pytest.raises(GptlabError, match="teacher vocabulary 30 != student vocabulary 20"):
        distillation_loss(torch.zeros(1, 2, 20), torch.zeros(1, 2, 30), torch.zeros(1, 2, dtype=torch.long))


def test_alpha_zero_trains_on_the_cross_entropy_without_running_the_teacher():
    teacher, student = tiny_gpt2(20, seed=1), tiny_gpt2(20, seed=2, emb_dim=16, n_layers=1)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    x, y = torch.randint(0, 20, (2, 8)), torch.randint(0, 20, (2, 8))
    y[0, 5:] = -100
    loss = DistillationTask(teacher, alpha=0.0, terms={"logits": 1.0}).loss(student, (x, y))
    assert not calls  # the teacher is not run for a term that weighs nothing
    ref = F.cross_entropy(student(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    assert torch.allclose(loss, ref, atol=1e-6) and loss.requires_grad
    assert torch.allclose(loss, DistillationTask(teacher, alpha=0.0).parts(student, (x, y))["total"], atol=1e-6)


def test_tokenizers_must_match(char_tok):
    from gptlab.tokenizers import CharTokenizer

    check_same_tokenizer(char_tok, char_tok)
    with pytest.raises(GptlabError, match="must share one tokenizer.*vocab sizes"):
        check_same_tokenizer(char_tok, CharTokenizer.from_text("abc"))
    with pytest.raises(GptlabError, match="encodes to different ids"):
        check_same_tokenizer(CharTokenizer(list("abc")), CharTokenizer(list("bac")))


def test_student_from_other_tokenizer_is_refused(tmp_path, base_dir, capsys):
    from gptlab.tokenizers import CharTokenizer
    from gptlab.weights.native import save_model_dir

    other = CharTokenizer.from_text("abcdefgh ")
    save_model_dir(tiny_gpt2(other.vocab_size), tmp_path / "other", other)
    (tmp_path / "c.txt").write_text("abc " * 500)
    assert cli_run(["distill", "--teacher", str(base_dir), "--student", str(tmp_path / "other"),
                    "--data", str(tmp_path / "c.txt"), "--out", str(tmp_path / "r")]) == 1
    assert "must share one tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["logits", "sequence"])
def test_short_runs_both_modes(tmp_path, base_dir, sms_path, mode):
    (tmp_path / "c.txt").write_text(sms_path.read_text(encoding="utf-8")[:6000])
    r = distill(str(base_dir), "gpt2-nano", str(tmp_path / "c.txt"), tmp_path / "run", mode=mode, context_length=32,
                max_steps=3, batch_size=4, eval_every=3, eval_iters=1, sequences=4, gen_tokens=40,
                precision="fp32", device="cpu", progress=False)
    assert r.step == 3 and r.best_val_loss is not None
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    rec = r.records[-1]
    assert ("val_kl" in rec) == (mode == "logits")  # sequence mode trains on teacher text with the plain loss
    with pytest.raises(GptlabError, match="mode='words'"):
        distill(str(base_dir), "gpt2-nano", str(tmp_path / "c.txt"), tmp_path / "r2", mode="words")


@pytest.mark.slow
def test_distilled_student_beats_the_same_student_without_teacher(tmp_path):
    """The corpus is sampled from the teacher, so the teacher is the true distribution; two identical
    students see the same 8k tokens for the same steps, one also with the teacher's full distributions."""
    from gptlab.inference.generation import generate
    from gptlab.tokenizers import CharTokenizer
    from gptlab.weights.native import save_model_dir

    tok = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz .,"))
    teacher = tiny_gpt2(tok.vocab_size, context_length=64, emb_dim=64, n_layers=2, seed=3, tie_embeddings=False)
    with torch.no_grad():
        teacher.out_head.weight.mul_(15.0)  # peaked but not deterministic next-token distributions
        # Never end-of-text: feature 0 is a constant 1 after the final norm; only the EOT row reads it, at -100.
        teacher.final_norm.weight[0], teacher.final_norm.bias[0] = 0.0, 1.0
        teacher.out_head.weight[:, 0] = 0.0
        teacher.out_head.weight[-1] = 0.0
        teacher.out_head.weight[-1, 0] = -100.0
    save_model_dir(teacher, tmp_path / "teacher", tok)
    starts = torch.randint(0, tok.vocab_size - 1, (200, 1), generator=torch.Generator().manual_seed(0))
    rows = generate(teacher, starts, 64, temperature=1.0, seed=0)  # (200, 65): one training window per row
    (tmp_path / "corpus.txt").write_text("".join(tok.decode(r) for r in rows.tolist()))
    losses = {}
    for alpha in (0.0, 0.8):  # 125 rows train, 75 rows validation; windows aligned with the rows
        r = distill(str(tmp_path / "teacher"), "gpt2-nano", str(tmp_path / "corpus.txt"), tmp_path / f"a{alpha}",
                    alpha=alpha, temperature=1.0, context_length=64, stride=65, max_steps=120, batch_size=16,
                    lr=3e-3, eval_every=40, eval_iters=10, val_ratio=0.375, precision="fp32", device="cpu",
                    progress=False)
        losses[alpha] = r.best_val_loss
    print(f"student val loss without teacher {losses[0.0]:.3f}, distilled {losses[0.8]:.3f}")
    assert losses[0.8] < losses[0.0] - 0.05, losses


# ---- resume ---------------------------------------------------------------------------------------

def _latest_weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
                         / "model.safetensors"))


def _logged(run):
    import json

    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["logits", "sequence"])
def test_interrupted_run_resumes_exactly(tmp_path, base_dir, sms_path, monkeypatch, mode):
    """Ctrl-C during step 4 of 6, then --resume: bitwise the uninterrupted run (the cosine schedule spans
    max_steps, so the interrupted run must be the same 6-step run). Sequence mode reuses the teacher's saved text."""
    from gptlab.training import loop

    (tmp_path / "c.txt").write_text(sms_path.read_text(encoding="utf-8")[:6000])
    kw = dict(mode=mode, context_length=32, max_steps=6, batch_size=4, eval_every=2, eval_iters=1, sequences=4,
              gen_tokens=40, precision="fp32", device="cpu", progress=False)
    distill(str(base_dir), "gpt2-nano", str(tmp_path / "c.txt"), tmp_path / "full", **kw)
    real_lr_at = loop.lr_at

    def ctrl_c_in_step_4(step, **schedule):
        if step == 3:
            raise KeyboardInterrupt
        return real_lr_at(step, **schedule)

    monkeypatch.setattr(loop, "lr_at", ctrl_c_in_step_4)
    part = distill(str(base_dir), "gpt2-nano", str(tmp_path / "c.txt"), tmp_path / "part", **kw)
    monkeypatch.undo()
    assert part.stopped_because == "interrupted" and part.step == 3
    if mode == "sequence":  # a new sample from the teacher would differ: resume must not regenerate it
        monkeypatch.setattr("gptlab.finetune.distill.teacher_corpus", lambda *a, **k: pytest.fail("regenerated"))
    r = distill("", "", None, tmp_path / "unused", resume=tmp_path / "part", device="cpu", progress=False)
    assert r.step == 6 and r.stopped_because == "max_steps" and not (tmp_path / "unused").exists()
    a, b = _latest_weights(tmp_path / "full"), _latest_weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _logged(tmp_path / "full") == _logged(tmp_path / "part")
    assert [x["step"] for x in _logged(tmp_path / "part")] == [2, 4, 6]
    # A finished run continues to a new max_steps; what it logged so far is kept.
    more = distill("", "", None, None, resume=tmp_path / "full", max_steps=8, device="cpu", progress=False)
    assert more.step == 8 and _logged(tmp_path / "full")[:3] == _logged(tmp_path / "part")
    assert (tmp_path / "full" / "checkpoints" / "latest").read_text().strip() == "step-000008"


def test_resume_errors(tmp_path, base_dir, sms_path, capsys):
    with pytest.raises(GptlabError, match="no such directory; give the --out directory of an earlier distillation"):
        distill("", "", None, tmp_path / "x", resume=tmp_path / "nope")
    with pytest.raises(GptlabError, match=r"is not a distillation run \(no distill_config.json\)"):
        distill("", "", None, tmp_path / "x", resume=base_dir)
    (tmp_path / "c.txt").write_text(sms_path.read_text(encoding="utf-8")[:3000])
    distill(str(base_dir), "gpt2-nano", str(tmp_path / "c.txt"), tmp_path / "run", context_length=32, max_steps=1,
            batch_size=4, eval_iters=1, precision="fp32", device="cpu", progress=False)
    with pytest.raises(GptlabError, match=r"--alpha 0.9 differs from the 0.5 that .*\(only --max-steps may change\)"):
        distill("", "", None, tmp_path / "x", resume=tmp_path / "run", alpha=0.9)
    # The run is at step 1: resuming to step 1 (the recorded limit) would train nothing; refused before loading.
    with pytest.raises(GptlabError, match=f"^{tmp_path / 'run'} is already at step 1; give a larger --max-steps "
                                          "to continue$"):
        distill("", "", None, tmp_path / "x", resume=tmp_path / "run", max_steps=1)
    assert cli_run(["distill", "--resume", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.strip().endswith("already at step 1; give a larger --max-steps to continue")
    for bad in ("0", "-3"):
        assert cli_run(["distill", "--teacher", str(base_dir), "--student", "gpt2-nano", "--max-steps", bad,
                        "--out", str(tmp_path / "new")]) == 1
        assert f"error: --max-steps {bad} must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert cli_run(["distill", "--resume", str(base_dir)]) == 1
    err = capsys.readouterr().err
    assert "not a distillation run" in err and len(err.strip().splitlines()) == 1


def test_local_paths_are_recorded_absolute(tmp_path, base_dir, sms_path, monkeypatch):
    """--teacher/--data typed relative are recorded absolute for --resume; a --student preset stays a name."""
    import json
    import shutil

    shutil.copytree(base_dir, tmp_path / "teacher")
    (tmp_path / "c.txt").write_text(sms_path.read_text(encoding="utf-8")[:3000])
    monkeypatch.chdir(tmp_path)
    distill("teacher", "gpt2-nano", "c.txt", "run", context_length=32, max_steps=1, batch_size=4, eval_iters=1,
            precision="fp32", device="cpu", progress=False)
    s = json.loads((tmp_path / "run" / "distill_config.json").read_text())["settings"]
    assert (s["teacher"], s["student"], s["data"]) == (str(tmp_path / "teacher"), "gpt2-nano", str(tmp_path / "c.txt"))
