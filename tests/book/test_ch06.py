"""Chapter 6 as a learner runs it: prepare the SMS spam CSVs, pad, fine-tune a classifier head."""

from __future__ import annotations

from paths import SHARED  # noqa: E402

import csv
import re

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from gptlab.book import (GPTModel, SpamDataset, calc_accuracy_loader, calc_loss_batch, calc_loss_loader,
                         classify_review, create_balanced_dataset, load_sms_spam, prepare_spam_csvs, random_split,
                         train_classifier_simple)
from gptlab.errors import GptlabError


@pytest.fixture(scope="module")
def spam_csvs(tmp_path_factory):
    from pathlib import Path

    tsv = Path(SHARED + "/SMSSpamCollection.tsv")
    if not tsv.exists():
        pytest.skip("SMSSpamCollection.tsv not available")
    return prepare_spam_csvs(tsv, tmp_path_factory.mktemp("spam"))


def test_course_data_preparation_counts(data_dir, spam_csvs):
    rows = load_sms_spam(data_dir / "SMSSpamCollection.tsv")
    # pandas' default quoting merges a few lines: the course's 5,572 rows, 4,825 ham / 747 spam.
    assert len(rows) == 5572
    assert sum(lab == "ham" for lab, _ in rows) == 4825 and sum(lab == "spam" for lab, _ in rows) == 747
    balanced = create_balanced_dataset(rows)
    assert len(balanced) == 1494 and sum(lab for lab, _ in balanced) == 747
    train, val, test = random_split(balanced, 0.7, 0.1)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    with open(spam_csvs["train"], newline="", encoding="utf-8") as f:
        written = list(csv.reader(f))
    assert written[0] == ["Label", "Text"] and [(int(a), b) for a, b in written[1:]] == train


def test_spam_dataset_and_loaders(spam_csvs, tokenizer):
    train_dataset = SpamDataset(spam_csvs["train"], tokenizer, max_length=None)
    assert train_dataset.max_length == 120  # the course's longest training message
    val_dataset = SpamDataset(spam_csvs["validation"], tokenizer, max_length=train_dataset.max_length)
    test_dataset = SpamDataset(spam_csvs["test"], tokenizer, max_length=train_dataset.max_length)
    x, y = train_dataset[0]
    assert x.shape == (120,) and y.dtype == torch.long and y.item() in (0, 1)
    n_text = len(tokenizer.encode(train_dataset.data[0][1]))
    assert x[:n_text].tolist() == tokenizer.encode(train_dataset.data[0][1])
    assert set(x[n_text:].tolist()) <= {50256}  # padded with <|endoftext|>
    torch.manual_seed(123)
    train_loader = DataLoader(train_dataset, batch_size=8, shuffle=True, drop_last=True)
    val_loader = DataLoader(val_dataset, batch_size=8, drop_last=False)
    test_loader = DataLoader(test_dataset, batch_size=8, drop_last=False)
    assert (len(train_loader), len(val_loader), len(test_loader)) == (130, 19, 38)
    xb, yb = next(iter(train_loader))
    assert xb.shape == (8, 120) and yb.shape == (8,)
    short = SpamDataset(spam_csvs["test"], tokenizer, max_length=10)
    assert all(len(ids) == 10 for ids in short.encoded_texts)


def _classifier(cfg):
    torch.manual_seed(123)
    model = GPTModel(cfg)
    for p in model.parameters():  # the course's freezing policy
        p.requires_grad = False
    torch.manual_seed(123)
    model.out_head = torch.nn.Linear(cfg["emb_dim"], 2)
    for module in (model.trf_blocks[-1], model.final_norm):
        for p in module.parameters():
            p.requires_grad = True
    return model


def test_fine_tune_a_classifier(spam_csvs, tokenizer, tiny_cfg, capsys):
    cfg = dict(tiny_cfg, context_length=128, drop_rate=0.0)
    train = SpamDataset(spam_csvs["train"], tokenizer)
    val = SpamDataset(spam_csvs["validation"], tokenizer, max_length=train.max_length)
    torch.manual_seed(123)
    train_loader = DataLoader(Subset(train, range(48)), batch_size=8, shuffle=True, drop_last=True)
    val_loader = DataLoader(Subset(val, range(16)), batch_size=8)
    model = _classifier(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in model.trf_blocks[-1].parameters()) + 2 * 32 + 32 * 2 + 2
    with torch.no_grad():
        loss_before = calc_loss_loader(train_loader, model, "cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.1)
    frozen_before = model.tok_emb.weight.clone()
    train_losses, val_losses, train_accs, val_accs, examples_seen = train_classifier_simple(
        model, train_loader, val_loader, optimizer, "cpu", num_epochs=8, eval_freq=6, eval_iter=6)
    assert examples_seen == 8 * 6 * 8
    assert len(train_accs) == len(val_accs) == 8 and len(train_losses) == 8
    assert torch.equal(model.tok_emb.weight, frozen_before)  # frozen layers did not move
    with torch.no_grad():
        assert calc_loss_loader(train_loader, model, "cpu") < loss_before - 0.2
    assert calc_accuracy_loader(train_loader, model, "cpu") >= 0.8  # it fits its small training set
    out = capsys.readouterr().out
    assert re.search(r"Training accuracy: \d+\.\d\d% \| Validation accuracy: \d+\.\d\d%", out)


def test_accuracy_and_classify_review_agree_with_the_logits(spam_csvs, tokenizer, tiny_cfg):
    cfg = dict(tiny_cfg, context_length=128)
    model = _classifier(cfg).eval()
    data = SpamDataset(spam_csvs["test"], tokenizer, max_length=40)
    loader = DataLoader(data, batch_size=8)
    with torch.no_grad():
        preds = torch.cat([model(x)[:, -1].argmax(-1) for x, _ in loader])
    labels = torch.tensor([lab for lab, _ in data.data])
    assert calc_accuracy_loader(loader, model, "cpu") == pytest.approx((preds == labels).float().mean().item())
    assert calc_accuracy_loader(loader, model, "cpu", num_batches=2) == pytest.approx(
        (preds[:16] == labels[:16]).float().mean().item())
    text = "You are a winner you have been specially selected to receive $1000 cash or a $2000 award."
    for i in range(3):
        expected = "spam" if preds[i].item() == 1 else "not spam"
        assert classify_review(data.data[i][1], model, tokenizer, "cpu", max_length=40) == expected
    with torch.no_grad():  # force the decision through the head's bias
        model.out_head.bias.copy_(torch.tensor([0.0, 1e4]))
    assert classify_review(text, model, tokenizer, "cpu", max_length=120) == "spam"
    with torch.no_grad():
        model.out_head.bias.copy_(torch.tensor([1e4, 0.0]))
    assert classify_review(text, model, tokenizer, "cpu") == "not spam"
    # The classification loss uses only the last position's logits.
    x, y = next(iter(loader))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x)[:, -1, :], y)
        assert torch.allclose(calc_loss_batch(x, y, model, "cpu"), expected)


def test_bad_spam_inputs_are_explained(tmp_path, tokenizer):
    with pytest.raises(GptlabError, match="cannot read the spam data"):
        load_sms_spam(tmp_path / "nope.tsv")
    (tmp_path / "bad.tsv").write_text("maybe\thello\n")
    with pytest.raises(GptlabError, match="row 1 is not 'ham\\|spam<TAB>text'"):
        load_sms_spam(tmp_path / "bad.tsv")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(GptlabError, match="needs the columns Label,Text"):
        SpamDataset(tmp_path / "x.csv", tokenizer)
    with pytest.raises(GptlabError, match="sum to <= 1"):
        random_split([1, 2, 3], 0.8, 0.5)
    with pytest.raises(GptlabError, match="cannot balance"):
        create_balanced_dataset([("spam", "a"), ("spam", "b"), ("ham", "c")])
