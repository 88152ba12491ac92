"""Chapter 5 as a learner runs it: loss of the untrained model, training on The Verdict,
sampling, saving and reloading, and loading GPT-2 weights."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

from gptlab.book import (GPT_CONFIG_124M, GPTModel, calc_loss_batch, calc_loss_loader, create_dataloader_v1,
                         download_and_load_gpt2, evaluate_model, generate, load_weights_into_gpt, plot_losses,
                         text_to_token_ids, token_ids_to_text, train_model_simple)
from gptlab.errors import GptlabError

# The chapter-5 batch: "every effort moves" / "I really like" -> " effort moves you" / " really like chocolate".
INPUTS = torch.tensor([[16833, 3626, 6100], [40, 1107, 588]])
TARGETS = torch.tensor([[3626, 6100, 345], [1107, 588, 11311]])


def test_token_id_helpers(tokenizer):
    ids = text_to_token_ids("every effort moves", tokenizer)
    assert ids.tolist() == [[16833, 3626, 6100]]
    assert text_to_token_ids("I really like", tokenizer).tolist() == [[40, 1107, 588]]
    assert token_ids_to_text(TARGETS[:1], tokenizer) == " effort moves you"
    assert token_ids_to_text(TARGETS[1:], tokenizer) == " really like chocolate"
    assert text_to_token_ids("<|endoftext|>", tokenizer).tolist() == [[50256]]


def test_untrained_loss_and_perplexity_are_the_course_figures():
    torch.manual_seed(123)
    model = GPTModel(GPT_CONFIG_124M)
    model.eval()
    with torch.no_grad():
        loss = calc_loss_batch(INPUTS, TARGETS, model, "cpu")
    assert f"{loss.item():.4f}" == "10.7940"
    # The course prints tensor(48725.8203); float32 matmul order may move the last bit of the loss.
    assert torch.exp(loss).item() == pytest.approx(48725.8203, rel=1e-5)


@pytest.mark.slow
def test_untrained_loader_losses_are_the_course_figures(tokenizer, verdict):
    split = int(0.90 * len(verdict))
    torch.manual_seed(123)
    train_loader = create_dataloader_v1(verdict[:split], batch_size=2, max_length=256, stride=256,
                                        drop_last=True, shuffle=True, tokenizer=tokenizer)
    val_loader = create_dataloader_v1(verdict[split:], batch_size=2, max_length=256, stride=256,
                                      drop_last=False, shuffle=False, tokenizer=tokenizer)
    assert (len(train_loader), len(val_loader)) == (9, 1)
    torch.manual_seed(123)
    model = GPTModel(GPT_CONFIG_124M).eval()
    with torch.no_grad():
        assert calc_loss_loader(train_loader, model, "cpu") == pytest.approx(10.98758347829183, abs=1e-5)
        assert calc_loss_loader(val_loader, model, "cpu") == pytest.approx(10.98110580444336, abs=1e-5)


def _loaders(tokenizer, text, ctx, batch_size):
    split = int(0.90 * len(text))
    torch.manual_seed(123)
    train = create_dataloader_v1(text[:split], batch_size=batch_size, max_length=ctx, stride=ctx, drop_last=True,
                                 shuffle=True, tokenizer=tokenizer)
    val = create_dataloader_v1(text[split:], batch_size=batch_size, max_length=ctx, stride=ctx, drop_last=False,
                               shuffle=False, tokenizer=tokenizer)
    return train, val


def test_training_on_the_verdict_lowers_the_loss(tokenizer, verdict, tiny_cfg, capsys):
    # The course's flow at a CPU-test scale: the first 4,000 characters of The Verdict
    # (the 50,257-way output layer is most of the cost), 16-token windows.
    cfg = dict(tiny_cfg, context_length=16)
    train_loader, val_loader = _loaders(tokenizer, verdict[:4000], 16, batch_size=4)
    n_train = len(tokenizer.encode(verdict[:3600]))
    assert len(train_loader) == len(range(0, n_train - 16, 16)) // 4 == 14
    torch.manual_seed(123)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1)
    before = evaluate_model(model, train_loader, val_loader, "cpu", eval_iter=2)
    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, optimizer, "cpu", num_epochs=2, eval_freq=5, eval_iter=2,
        start_context="Every effort moves you", tokenizer=tokenizer)
    # 28 steps, evaluated at steps 0, 5, ..., 25.
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == 6
    assert tokens_seen == [(s + 1) * 4 * 16 for s in range(0, 28, 5)]
    assert train_losses[-1] < before[0] - 2.0  # from ~10.8 to well below
    assert val_losses[-1] < before[1] - 1.0
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"Ep 1 \(Step 000000\): Train loss \d+\.\d{3}, Val loss \d+\.\d{3}", out[0])
    assert out[-1].startswith("Every effort moves you")  # the end-of-epoch sample
    assert model.training  # left in training mode, like the course


def test_save_and_reload_model_and_optimizer(tokenizer, verdict, tiny_cfg, tmp_path):
    train_loader, _ = _loaders(tokenizer, verdict[:2000], 16, batch_size=2)
    batches = [b for _, b in zip(range(3), train_loader)]
    cfg = dict(tiny_cfg, drop_rate=0.0, context_length=16)

    def step(model, optimizer, batch):
        optimizer.zero_grad()
        loss = calc_loss_batch(*batch, model, "cpu")
        loss.backward()
        optimizer.step()
        return loss.item()

    torch.manual_seed(123)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    for b in batches[:2]:
        step(model, optimizer, b)
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
               tmp_path / "model_and_optimizer.pth")

    checkpoint = torch.load(tmp_path / "model_and_optimizer.pth", weights_only=True)
    model2 = GPTModel(cfg)
    model2.load_state_dict(checkpoint["model_state_dict"])
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=5e-4, weight_decay=0.1)
    optimizer2.load_state_dict(checkpoint["optimizer_state_dict"])
    assert optimizer2.param_groups[0]["lr"] == 4e-4  # restored, not the new value
    # The resumed run continues exactly where the first one would have.
    assert step(model2, optimizer2, batches[2]) == step(model, optimizer, batches[2])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


class _FixedLogits(torch.nn.Module):
    """A stand-in model whose next-token logits are the course's 9-word example."""

    LOGITS = torch.tensor([4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79])

    def forward(self, idx):
        return self.LOGITS.expand(idx.shape[0], idx.shape[1], -1)


def test_sampling_reproduces_the_course_counts():
    # vocab: closer every effort forward inches moves pizza toward you
    model, idx = _FixedLogits(), torch.tensor([[0]])
    torch.manual_seed(123)
    counts = Counter(generate(model, idx, 1, 4, temperature=1.0)[0, -1].item() for _ in range(1000))
    assert [counts[i] for i in range(9)] == [73, 0, 0, 582, 2, 0, 0, 343, 0]
    assert generate(model, idx, 3, 4)[0].tolist() == [0, 3, 3, 3]  # greedy: "forward"
    torch.manual_seed(123)
    top3 = Counter(generate(model, idx, 1, 4, temperature=1.0, top_k=3)[0, -1].item() for _ in range(1000))
    assert set(top3) <= {0, 3, 7}  # only the three largest logits survive
    # Softmax over the top 3 is [0.0615, 0.5775, 0.3610] (the course's numbers).
    assert abs(top3[3] / 1000 - 0.5775) < 0.05 and abs(top3[0] / 1000 - 0.0615) < 0.03
    # A very low temperature concentrates the mass on the argmax.
    assert set(generate(model, idx, 5, 4, temperature=0.01)[0, 1:].tolist()) == {3}


def test_generate_with_top_k_and_eos_on_a_model(tiny_cfg, tokenizer):
    torch.manual_seed(123)
    model = GPTModel(tiny_cfg).eval()
    idx = text_to_token_ids("Every effort moves you", tokenizer)
    torch.manual_seed(123)
    out = generate(model, idx, max_new_tokens=8, context_size=tiny_cfg["context_length"], top_k=25, temperature=1.4)
    assert out.shape == (1, 4 + 8) and torch.equal(out[:, :4], idx)
    torch.manual_seed(123)
    assert torch.equal(out, generate(model, idx, 8, tiny_cfg["context_length"], temperature=1.4, top_k=25))
    greedy = generate(model, idx, 4, tiny_cfg["context_length"])
    first = greedy[0, 4].item()
    stopped = generate(model, idx, 4, tiny_cfg["context_length"], eos_id=first)
    assert torch.equal(stopped, idx)  # the stop token is not appended
    assert torch.equal(generate(model, idx, 4, tiny_cfg["context_length"], temperature=1.0, top_k=1), greedy)
    with pytest.raises(GptlabError, match="temperature=-1"):
        generate(model, idx, 3, 8, temperature=-1)
    with pytest.raises(GptlabError, match="top_k=0"):
        generate(model, idx, 3, 8, top_k=0)


def test_plot_losses_writes_the_figure(tmp_path):
    fig = plot_losses([0.5, 1.0, 1.5], [512, 1024, 1536], [9.0, 7.0, 6.0], [9.5, 8.0, 7.5],
                      save_path=tmp_path / "loss-plot.pdf")
    assert (tmp_path / "loss-plot.pdf").read_bytes()[:4] == b"%PDF"
    ax1, ax2 = fig.axes
    assert ax1.get_xlabel() == "Epochs" and ax2.get_xlabel() == "Tokens seen"
    assert [line.get_label() for line in ax1.get_lines()] == ["Training loss", "Validation loss"]
    with pytest.raises(GptlabError, match="equally long"):
        plot_losses([1], [1, 2], [1], [1])


def _tiny_hf_gpt2(path, n_layer=2):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=120, n_positions=24, n_embd=32, n_layer=n_layer, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(7)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # make the norms and biases non-trivial so every tensor is checked
        for n, p in hf.named_parameters():
            if "ln_" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path, safe_serialization=True)
    return hf


def test_download_and_load_gpt2_from_local_safetensors_matches_hf(tmp_path):
    hf = _tiny_hf_gpt2(tmp_path / "124M")
    settings, params = download_and_load_gpt2("124M", tmp_path)
    assert settings == {"n_vocab": 120, "n_ctx": 24, "n_embd": 32, "n_head": 4, "n_layer": 2}
    assert params["blocks"][0]["attn"]["c_attn"]["w"].shape == (32, 96)
    assert params["wte"].shape == (120, 32) and params["g"].shape == (32,)
    cfg = {"vocab_size": settings["n_vocab"], "context_length": settings["n_ctx"], "emb_dim": settings["n_embd"],
           "n_heads": settings["n_head"], "n_layers": settings["n_layer"], "drop_rate": 0.0, "qkv_bias": True}
    gpt = GPTModel(cfg)
    load_weights_into_gpt(gpt, params)
    gpt.eval()
    ids = torch.randint(0, 120, (2, 24))
    with torch.no_grad():
        assert torch.allclose(gpt(ids), hf(ids).logits, atol=1e-4)


def test_gpt2_weights_errors_are_explained(tmp_path, monkeypatch):
    _tiny_hf_gpt2(tmp_path)  # files directly in models_dir also work
    settings, params = download_and_load_gpt2("124M", tmp_path)
    base = {"vocab_size": 120, "context_length": 24, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0}
    with pytest.raises(GptlabError, match="qkv_bias=True"):
        load_weights_into_gpt(GPTModel(dict(base, qkv_bias=False)), params)
    with pytest.raises(GptlabError, match="Shape mismatch.*context_length=1024"):
        load_weights_into_gpt(GPTModel(dict(base, qkv_bias=True, context_length=16)), params)
    with pytest.raises(GptlabError, match="3 blocks but the model has 2|2 blocks but the model has 3"):
        load_weights_into_gpt(GPTModel(dict(base, qkv_bias=True, n_layers=3)), params)
    with pytest.raises(GptlabError, match="model_size '125M' is not one of 124M, 355M, 774M, 1558M"):
        download_and_load_gpt2("125M", tmp_path)
    # A config that claims more layers than the file holds: the missing keys are named.
    (tmp_path / "config.json").write_text(json.dumps(dict(json.loads((tmp_path / "config.json").read_text()),
                                                          n_layer=3)))
    with pytest.raises(GptlabError, match=r"missing \['h\.2\.attn\.c_attn\.bias'"):
        download_and_load_gpt2("124M", tmp_path)


def test_offline_download_says_where_to_put_the_files(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GptlabError, match=r"repo 'gpt2-medium'.*place config.json and model.safetensors .*355M"):
        download_and_load_gpt2("355M", tmp_path / "models")


@pytest.mark.slow
def test_first_training_step_gives_the_course_losses(tokenizer, verdict):
    """The course's first printed line: "Ep 1 (Step 000000): Train loss 9.781, Val loss 9.933"."""
    split = int(0.90 * len(verdict))
    torch.manual_seed(123)
    train_loader = create_dataloader_v1(verdict[:split], batch_size=2, max_length=256, stride=256,
                                        drop_last=True, shuffle=True, tokenizer=tokenizer)
    val_loader = create_dataloader_v1(verdict[split:], batch_size=2, max_length=256, stride=256,
                                      drop_last=False, shuffle=False, tokenizer=tokenizer)
    torch.manual_seed(123)
    model = GPTModel(GPT_CONFIG_124M)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
    # train_model_simple's first step, then its first evaluation (same order of random draws).
    model.train()
    input_batch, target_batch = next(iter(train_loader))
    optimizer.zero_grad()
    calc_loss_batch(input_batch, target_batch, model, "cpu").backward()
    optimizer.step()
    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, "cpu", eval_iter=5)
    assert f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}" == "Train loss 9.781, Val loss 9.933"


def test_hub_downloads_are_checksum_verified(tmp_path, monkeypatch):
    """A Hub cache blob is named by its sha256; a corrupt download is refused, a good one loads."""
    import hashlib
    import shutil

    import huggingface_hub

    src = tmp_path / "src"
    _tiny_hf_gpt2(src)
    models_dir = tmp_path / "models"
    snap = models_dir / "hf-cache" / "models--gpt2" / "snapshots" / "abc"
    blobs = models_dir / "hf-cache" / "models--gpt2" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir(parents=True)
    data = (src / "model.safetensors").read_bytes()
    good = blobs / hashlib.sha256(data).hexdigest()
    good.write_bytes(data)
    shutil.copy(src / "config.json", blobs / "0123abcd")  # git-stored files are named by git hash
    (snap / "config.json").symlink_to(blobs / "0123abcd")
    (snap / "model.safetensors").symlink_to(good)
    calls = []

    def fake_download(repo_id, filename, cache_dir):
        calls.append((repo_id, filename))
        return str(snap / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    settings, params = download_and_load_gpt2("124M", models_dir)
    assert calls == [("gpt2", "config.json"), ("gpt2", "model.safetensors")]
    assert settings["n_layer"] == 2 and params["wte"].shape == (120, 32)
    assert json.loads((models_dir / "hf-cache" / "gptlab-verified.json").read_text()) == [good.name]

    bad_name = "f" * 64  # content does not hash to its name
    (blobs / bad_name).write_bytes(data[:-1] + b"\x00")
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(blobs / bad_name)
    with pytest.raises(GptlabError, match="checksum mismatch .*corrupt; delete"):
        download_and_load_gpt2("124M", models_dir)
