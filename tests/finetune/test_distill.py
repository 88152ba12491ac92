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


@pytest.mark.slow
def test_distilled_student_beats_the_same_student_without_teacher(tmp_path, char_tok, sms_path):
    """A teacher trained on the whole corpus; students see only a small slice, same steps, same seed."""
    from gptlab.training import TrainConfig, fit, window_batches
    from gptlab.weights.native import save_model_dir

    text = sms_path.read_text(encoding="utf-8")
    ids = torch.tensor(char_tok.encode(text, allowed_special="none"))
    teacher = tiny_gpt2(char_tok.vocab_size, context_length=64, emb_dim=96, n_layers=3, seed=0)
    fit(teacher, window_batches(ids[:200_000], 64, 64, 16, seed=0), None,
        TrainConfig(max_steps=300, lr=3e-3, eval_every=300, eval_iters=1, precision="fp32", device="cpu"),
        tmp_path / "teacher", progress=False)
    save_model_dir(teacher, tmp_path / "teacher_model", char_tok)
    (tmp_path / "small.txt").write_text(text[200_000:212_000] + text[-20_000:])  # 12k train chars, 20k val
    losses = {}
    for alpha in (0.0, 0.7):
        r = distill(str(tmp_path / "teacher_model"), "gpt2-nano", str(tmp_path / "small.txt"), tmp_path / f"a{alpha}",
                    alpha=alpha, temperature=2.0, context_length=64, max_steps=150, batch_size=16, lr=3e-3,
                    eval_every=50, eval_iters=10, val_ratio=20_000 / 32_000, precision="fp32", device="cpu",
                    progress=False)
        losses[alpha] = r.best_val_loss
    print(f"student val loss without teacher {losses[0.0]:.3f}, distilled {losses[0.7]:.3f}")
    assert losses[0.7] < losses[0.0] - 0.02, losses
