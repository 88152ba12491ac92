"""Distillation modes features, relations and their combinations: each loss against a hand computation on a
fixed batch, the layer map, the projections' life (trained, saved with the run, not in the student), the
shared-vocabulary rule, and exact resume."""

import json

import pytest
import torch
import torch.nn.functional as F

from gptlab.cli import run as cli_run
from gptlab.errors import GptlabError
from gptlab.finetune.distill import distill
from gptlab.finetune.distill_losses import (DistillationTask, Projections, auto_layer_map, block_outputs,
                                            parse_layer_map, parse_modes)
from ft_helpers import tiny_gpt2, tiny_llama


def test_mode_syntax():
    assert parse_modes("logits") == {"logits": 1.0}
    assert parse_modes("logits+features") == {"logits": 1.0, "features": 1.0}
    assert parse_modes("logits:0.5,features:0.25") == {"logits": 0.5, "features": 0.25}
    assert parse_modes("sequence+logits:2") == {"sequence": 1.0, "logits": 2.0}
    for bad, msg in [("words", "'words' is not a mode"), ("logits+logits", "names logits twice"),
                     ("logits:x", "weight 'x' of logits is not a number"), ("logits:-1", "must be >= 0"),
                     ("sequence:0.5", "takes no weight"), ("sequence+blackbox", "from one of them"),
                     ("blackbox+logits", "blackbox trains on the teacher's answers alone"),
                     ("reasoning+features", "reasoning trains on the teacher's answers alone")]:
        with pytest.raises(GptlabError, match=msg):
            parse_modes(bad)


def test_layer_map():
    assert auto_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert auto_layer_map(4, 30) == [(0, 7), (1, 14), (2, 22), (3, 29)]  # 22.5 rounds up
    assert auto_layer_map(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert auto_layer_map(4, 2) == [(0, 0), (1, 0), (2, 1), (3, 1)]  # a deeper student shares teacher layers
    assert parse_layer_map("0:2, 1:5", 2, 6) == [(0, 2), (1, 5)]
    with pytest.raises(GptlabError, match="out of range; the student has layers 0-1, the teacher 0-5"):
        parse_layer_map("0:6", 2, 6)
    with pytest.raises(GptlabError, match="is not STUDENT:TEACHER"):
        parse_layer_map("0-2", 2, 6)
    with pytest.raises(GptlabError, match="maps student layer 0 twice"):
        parse_layer_map("0:1,0:2", 2, 6)


def _by_hand_blocks(m, x):
    """Each block's output, computed without the hooks: embedding + positions, then the blocks in order."""
    h = m.tok_emb(x) + m.pos_emb(torch.arange(x.shape[1]))
    out = []
    for i, block in enumerate(m.blocks):
        h = block(h, None, i)
        out.append(h)
    return out


def _batch():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randint(0, 20, (2, 7), generator=g), torch.randint(0, 20, (2, 7), generator=g)
    y[1, 4:] = -100
    return x, y


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_and_relation_losses_match_a_hand_computation(kind):
    teacher = tiny_gpt2(20, seed=1, emb_dim=48, n_layers=4)
    student = tiny_gpt2(20, seed=2, emb_dim=16, n_layers=2)
    proj = Projections(2, 16, 48)
    x, y = _batch()
    layer_map = auto_layer_map(2, 4)  # [(0, 1), (1, 3)]
    task = DistillationTask(teacher, alpha=0.4, temperature=2.0, terms={"logits": 0.5, "features": 2.0, "relations": 3.0},
                            layer_map=layer_map, projections=proj, feature_loss=kind)
    parts = task.parts(student, (x, y))

    keep = (y != -100)
    sh, th = _by_hand_blocks(student, x), [h.detach() for h in _by_hand_blocks(teacher, x)]
    feats, rels = [], []
    for k, (i, j) in enumerate(layer_map):
        p = sh[i] @ proj.maps[k].weight.T  # (B, T, 48)
        num, n = 0.0, 0
        rel_num, rel_n = 0.0, 0
        for b in range(2):
            for t in range(7):
                if not keep[b, t]:
                    continue
                if kind == "mse":
                    num += ((p[b, t] - th[j][b, t]) ** 2).sum() / 48
                else:
                    num += 1 - (p[b, t] @ th[j][b, t]) / (p[b, t].norm() * th[j][b, t].norm())
                n += 1
                for u in range(7):
                    if keep[b, u]:
                        gs = sh[i][b, t] @ sh[i][b, u] / (sh[i][b, t].norm() * sh[i][b, u].norm())
                        gt = th[j][b, t] @ th[j][b, u] / (th[j][b, t].norm() * th[j][b, u].norm())
                        rel_num, rel_n = rel_num + (gs - gt) ** 2, rel_n + 1
        feats.append(num / n)
        rels.append(rel_num / rel_n)
    ref_f, ref_r = sum(feats) / 2, sum(rels) / 2
    s_logits, t_logits = student(x), teacher(x)
    ref_ce = F.cross_entropy(s_logits.flatten(0, 1)[keep.flatten()], y.flatten()[keep.flatten()])
    ref_kl = F.kl_div(F.log_softmax(s_logits / 2, -1).flatten(0, 1)[keep.flatten()],
                      F.softmax(t_logits / 2, -1).flatten(0, 1)[keep.flatten()], reduction="batchmean")
    assert torch.allclose(parts["features"], ref_f, atol=1e-5) and torch.allclose(parts["relations"], ref_r, atol=1e-5)
    assert torch.allclose(parts["ce"], ref_ce, atol=1e-5) and torch.allclose(parts["kl"], ref_kl, atol=1e-6)
    ref_total = 0.6 * ref_ce + 0.4 * (0.5 * 4 * ref_kl + 2.0 * ref_f + 3.0 * ref_r)
    assert torch.allclose(parts["total"], ref_total, atol=1e-5)
    parts["total"].backward()  # the projection and the student learn; the teacher is frozen
    assert proj.maps[0].weight.grad is not None and proj.maps[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(b._forward_hooks for b in list(student.blocks) + list(teacher.blocks))  # hooks removed
    r = task.evaluate(student, [(x, y)])
    assert set(r) == {"loss", "perplexity", "kl", "features", "relations", "distill_loss"}


def test_features_across_families_and_a_student_equal_to_its_teacher():
    """Blocks are reached through get_blocks (Llama names them layers); a student identical to the teacher
    with identity projections has zero feature and relation distance."""
    teacher = tiny_llama(20, seed=1)
    x, y = _batch()
    with block_outputs(teacher, [0, 1]) as got:
        teacher(x)
    assert set(got) == {0, 1} and got[1].shape == (2, 7, 48)
    twin = tiny_llama(20, seed=1)
    task = DistillationTask(teacher, terms={"features": 1.0, "relations": 1.0}, layer_map=[(0, 0), (1, 1)],
                            projections=Projections(2, 48, 48))
    parts = task.parts(twin, (x, y))
    assert parts["features"].abs() < 1e-10 and parts["relations"].abs() < 1e-10
    with pytest.raises(GptlabError, match="needs a layer map"):
        DistillationTask(teacher, terms={"relations": 1.0})


def _corpus(tmp_path, sms_path, n=6000):
    (tmp_path / "c.txt").write_text(sms_path.read_text(encoding="utf-8")[:n])
    return str(tmp_path / "c.txt")


def test_features_run_saves_projections_beside_the_student(tmp_path, base_dir, sms_path):
    from safetensors.torch import load_file

    r = distill(str(base_dir), "gpt2-nano", _corpus(tmp_path, sms_path), tmp_path / "run", mode="logits+features:0.5",
                layer_map="0:0,1:1", feature_loss="cosine", context_length=32, max_steps=2, batch_size=4,
                eval_every=2, eval_iters=1, precision="fp32", device="cpu", progress=False)
    assert r.step == 2 and "val_features" in r.records[-1] and "val_kl" in r.records[-1]
    run = tmp_path / "run"
    student = load_file(str(run / "model" / "model.safetensors"))
    assert not any("maps" in k for k in student)  # the exported student carries no projection
    proj = load_file(str(run / "feature_projections.safetensors"))
    assert sorted(proj) == ["maps.0.weight", "maps.1.weight"] and proj["maps.0.weight"].shape == (48, 64)
    ck = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    state = torch.load(ck / "state.pt", weights_only=False)
    assert torch.equal(state["aux"]["maps.1.weight"], proj["maps.1.weight"])
    settings = json.loads((run / "distill_config.json").read_text())["settings"]
    assert (settings["mode"], settings["layer_map"], settings["feature_loss"]) == ("logits+features:0.5", "0:0,1:1",
                                                                                  "cosine")


def test_sequence_plus_logits(tmp_path, base_dir, sms_path):
    """The teacher writes the text, and the student also matches its distributions on it."""
    r = distill(str(base_dir), "gpt2-nano", _corpus(tmp_path, sms_path), tmp_path / "run", mode="sequence+logits:2",
                context_length=32, max_steps=1, batch_size=2, eval_iters=1, sequences=3, gen_tokens=30,
                precision="fp32", device="cpu", progress=False)
    assert r.step == 1 and "val_kl" in r.records[-1] and (tmp_path / "run" / "teacher_tokens.npy").is_file()


def test_dense_modes_need_one_vocabulary(tmp_path, base_dir, sms_path, capsys):
    from gptlab.tokenizers import CharTokenizer
    from gptlab.weights.native import save_model_dir

    other = CharTokenizer.from_text("abcdefgh ")
    save_model_dir(tiny_gpt2(other.vocab_size), tmp_path / "other", other)
    for mode in ("features", "relations", "logits+features"):
        assert cli_run(["distill", "--teacher", str(base_dir), "--student", str(tmp_path / "other"), "--mode", mode,
                        "--data", _corpus(tmp_path, sms_path, 2000), "--out", str(tmp_path / "r")]) == 1
        err = capsys.readouterr().err.strip()
        assert "must share one tokenizer" in err and len(err.splitlines()) == 1
    assert cli_run(["distill", "--teacher", "http://127.0.0.1:9/v1", "--student", "gpt2-nano", "--mode", "features",
                    "--data", "x", "--out", str(tmp_path / "r")]) == 1
    assert "an endpoint gives only text" in capsys.readouterr().err
    assert cli_run(["distill", "--teacher", str(base_dir), "--student", "gpt2-nano", "--mode", "features",
                    "--feature-loss", "l1", "--data", "x", "--out", str(tmp_path / "r")]) == 1
    assert "--feature-loss l1 must be one of mse, cosine" in capsys.readouterr().err


def test_sequence_mode_across_vocabularies(tmp_path, base_dir, sms_path, monkeypatch):
    """Sequence-level distillation needs only the teacher's text: a student with another tokenizer (the same
    characters, other ids) trains on that text re-encoded, each generation ended by its own end-of-text."""
    import numpy as np
    from gptlab.tokenizers import CharTokenizer, load_tokenizer
    from gptlab.weights.native import save_model_dir

    t_tok = load_tokenizer(str(base_dir))
    other = CharTokenizer(sorted(set(sms_path.read_text(encoding="utf-8") + "#"), reverse=True))
    save_model_dir(tiny_gpt2(other.vocab_size, seed=4), tmp_path / "other", other)
    written = t_tok.encode("hello world", allowed_special="none") + [t_tok.eos_id] + \
        t_tok.encode("good day", allowed_special="none") + [t_tok.eos_id]
    monkeypatch.setattr("gptlab.finetune.distill.teacher_corpus", lambda *a, **k: np.asarray(written))
    r = distill(str(base_dir), str(tmp_path / "other"), _corpus(tmp_path, sms_path), tmp_path / "run", mode="sequence",
                context_length=8, max_steps=1, batch_size=2, eval_iters=1, sequences=2, precision="fp32",
                device="cpu", progress=False)
    assert r.step == 1
    expected = other.encode("hello world") + [other.eos_id] + other.encode("good day") + [other.eos_id]
    assert np.load(tmp_path / "run" / "teacher_tokens.npy").tolist() == expected != written


# ---- resume ---------------------------------------------------------------------------------------

def _latest(run):
    from safetensors.torch import load_file

    ck = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(ck / "model.safetensors")), torch.load(ck / "state.pt", weights_only=False)


def _logged(run):
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def interrupted_then_resumed(tmp_path, monkeypatch, first, **kw):
    """Run ``first(out)`` to the end and again with Ctrl-C during step 4 of 6, then --resume the second; return
    both run directories."""
    from gptlab.training import loop

    first(tmp_path / "full", **kw)
    real_lr_at = loop.lr_at

    def ctrl_c_in_step_4(step, **schedule):
        if step == 3:
            raise KeyboardInterrupt
        return real_lr_at(step, **schedule)

    monkeypatch.setattr(loop, "lr_at", ctrl_c_in_step_4)
    part = first(tmp_path / "part", **kw)
    monkeypatch.undo()
    assert part.stopped_because == "interrupted" and part.step == 3
    return tmp_path / "full", tmp_path / "part"


def assert_same_runs(full, part):
    (a, sa), (b, sb) = _latest(full), _latest(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sa.get("aux", {}).keys() == sb.get("aux", {}).keys()
    assert all(torch.equal(sa["aux"][k], sb["aux"][k]) for k in sa.get("aux", {}))
    assert _logged(full) == _logged(part) and [x["step"] for x in _logged(part)] == [2, 4, 6]


@pytest.mark.parametrize("mode", ["features", "relations", "logits:0.5+features:0.5+relations"])
def test_interrupted_run_resumes_exactly(tmp_path, base_dir, sms_path, monkeypatch, mode):
    """Ctrl-C during step 4 of 6, then --resume: bitwise the uninterrupted run, projections included."""
    data = _corpus(tmp_path, sms_path)

    def first(out, **kw):
        return distill(str(base_dir), "gpt2-nano", data, out, **kw)

    full, part = interrupted_then_resumed(tmp_path, monkeypatch, first, mode=mode, context_length=32, max_steps=6,
                                          batch_size=4, eval_every=2, eval_iters=1, precision="fp32", device="cpu",
                                          progress=False)
    r = distill("", "", None, None, resume=part, device="cpu", progress=False)
    assert r.step == 6 and r.stopped_because == "max_steps"
    assert_same_runs(full, part)
    if "features" in mode:
        assert _latest(part)[1]["aux"]["maps.0.weight"].shape == (48, 64)
