"""Chapter 6 of the course: fine-tuning for classification (SMS spam).

Data preparation (balance the classes, split 70/10/20, write CSVs), the
padded ``SpamDataset``, accuracy, the classification training loop and
``classify_review``. The model side is the learner's: replace
``model.out_head`` with ``nn.Linear(emb_dim, 2)``, freeze everything but the
last block, the final norm and the head; the loss is computed on the last
token's logits (:func:`gptlab.book.calc_loss_batch` does so when targets are
class labels).

The course reads the TSV with pandas; this module reproduces the same rows
and the same random draws with the standard ``csv`` module and NumPy's
``RandomState`` (pandas' ``sample(..., random_state=123)`` is
``RandomState(123).permutation(n)[:k]``), so no pandas is needed.

Full strength: ``gptlab finetune classify`` / ``gptlab classify``
(``gptlab.finetune``), which run on the one training loop.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from gptlab.book.ch05 import calc_loss_batch, evaluate_model
from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_text

LABELS = {"ham": 0, "spam": 1}


def load_sms_spam(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The SMS Spam Collection TSV as ``[(label, text), ...]``, parsed the way the course's pandas call does.

    Like ``pd.read_csv(path, sep="\\t", header=None)``, a message starting with a
    double quote is read as a quoted field, which merges a few lines: 5,572 rows
    (4,825 ham, 747 spam) from the 5,574-line file — the counts the course prints.
    """
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = [r for r in csv.reader(f, delimiter="\t") if r]
    except OSError as e:
        raise GptlabError(f"cannot read the spam data {path}: {e.strerror}; give the path of SMSSpamCollection(.tsv)") from None
    bad = [i for i, r in enumerate(rows) if len(r) != 2 or r[0] not in LABELS]
    if bad:
        raise GptlabError(f"{path}: row {bad[0] + 1} is not 'ham|spam<TAB>text'; is this the SMS Spam Collection?")
    return [(r[0], r[1]) for r in rows]


def create_balanced_dataset(rows: list[tuple[str, str]], seed: int = 123) -> list[tuple[int, str]]:
    """Undersample "ham" to the number of "spam" messages; labels become 0 (ham) / 1 (spam).

    Order as in the course: the sampled ham messages (in sampled order), then all spam.
    """
    ham = [r for r in rows if r[0] == "ham"]
    spam = [r for r in rows if r[0] == "spam"]
    if not spam or len(ham) < len(spam):
        raise GptlabError(f"cannot balance {len(ham)} ham and {len(spam)} spam messages; need at least as many ham as spam")
    picks = np.random.RandomState(seed).permutation(len(ham))[: len(spam)]
    return [(LABELS[lab], text) for lab, text in [ham[i] for i in picks] + spam]


def random_split(rows: list, train_frac: float, validation_frac: float, seed: int = 123) -> tuple[list, list, list]:
    """Shuffle (seeded as the course) and cut into train / validation / test lists."""
    if not (0 < train_frac and 0 <= validation_frac and train_frac + validation_frac <= 1):
        raise GptlabError(f"train_frac={train_frac} and validation_frac={validation_frac} must be >= 0 and sum to <= 1")
    order = np.random.RandomState(seed).permutation(len(rows))
    shuffled = [rows[i] for i in order]
    train_end = int(len(rows) * train_frac)
    validation_end = train_end + int(len(rows) * validation_frac)
    return shuffled[:train_end], shuffled[train_end:validation_end], shuffled[validation_end:]


def write_csv(rows: list[tuple[int, str]], path: str | os.PathLike) -> None:
    """Write ``(label, text)`` rows as a CSV with the header ``Label,Text`` (the course's files)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["Label", "Text"])
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def prepare_spam_csvs(tsv_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Balance, split 70/10/20 and write train.csv, validation.csv, test.csv into ``out_dir``."""
    train, val, test = random_split(create_balanced_dataset(load_sms_spam(tsv_path)), 0.7, 0.1)
    out = {}
    for name, rows in (("train", train), ("validation", val), ("test", test)):
        out[name] = Path(out_dir) / f"{name}.csv"
        write_csv(rows, out[name])
    return out


class SpamDataset(Dataset):
    """Token ids of each message, truncated/padded to one length, with its 0/1 label.

    ``max_length=None`` uses the longest encoded message (the course's training
    set gives 120); the validation and test sets are built with the training
    set's ``max_length``. Items are ``(ids (max_length,), label ())`` tensors.
    Full strength: ``gptlab finetune classify`` reads the TSV directly.
    """

    def __init__(self, csv_file: str | os.PathLike, tokenizer, max_length: int | None = None,
                 pad_token_id: int = 50256):
        try:
            with open(csv_file, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or not {"Label", "Text"} <= set(reader.fieldnames):
                    raise GptlabError(f"{csv_file} needs the columns Label,Text (write it with write_csv)")
                self.data = [(int(r["Label"]), r["Text"]) for r in reader]
        except OSError as e:
            raise GptlabError(f"cannot read {csv_file}: {e.strerror}; build the CSVs with prepare_spam_csvs") from None
        except ValueError:
            raise GptlabError(f"{csv_file}: a Label is not an integer; labels must be 0 (ham) or 1 (spam)") from None
        self.encoded_texts = [tokenizer.encode(text) for _, text in self.data]
        if max_length is None:
            self.max_length = self._longest_encoded_length()
        else:
            if max_length < 1:
                raise GptlabError(f"max_length={max_length} must be >= 1")
            self.max_length = max_length
            self.encoded_texts = [ids[:max_length] for ids in self.encoded_texts]
        self.encoded_texts = [ids + [pad_token_id] * (self.max_length - len(ids)) for ids in self.encoded_texts]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.encoded_texts[index], dtype=torch.long),
                torch.tensor(self.data[index][0], dtype=torch.long))

    def __len__(self) -> int:
        return len(self.data)

    def _longest_encoded_length(self) -> int:
        return max((len(ids) for ids in self.encoded_texts), default=0)


def calc_accuracy_loader(data_loader, model, device, num_batches: int | None = None) -> float:
    """Share of correct argmax predictions on the last token over ``num_batches`` batches (default: all).

    Full strength: the accuracy ``gptlab finetune classify`` reports at every evaluation.
    """
    model.eval()
    correct_predictions, num_examples = 0, 0
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
        with torch.no_grad():
            logits = model(input_batch)[:, -1, :]  # (b, classes) last token
        predicted_labels = torch.argmax(logits, dim=-1)
        num_examples += predicted_labels.shape[0]
        correct_predictions += (predicted_labels == target_batch).sum().item()
    if num_examples == 0:
        raise GptlabError("the loader gave no examples; check the CSV and the batch size / drop_last")
    return correct_predictions / num_examples


def train_classifier_simple(model, train_loader, val_loader, optimizer, device, num_epochs: int, eval_freq: int,
                            eval_iter: int) -> tuple[list[float], list[float], list[float], list[float], int]:
    """The course's classification loop; returns ``(train_losses, val_losses, train_accs, val_accs, examples_seen)``.

    Loss on the last token's logits; every ``eval_freq`` steps the losses over
    ``eval_iter`` batches are printed; after each epoch, the accuracies over
    ``eval_iter`` batches. Full strength: ``gptlab finetune classify``.
    """
    if eval_freq < 1 or eval_iter < 1:
        raise GptlabError(f"eval_freq={eval_freq} and eval_iter={eval_iter} must both be >= 1")
    train_losses, val_losses, train_accs, val_accs = [], [], [], []
    examples_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            if target_batch.dim() != 1:
                raise GptlabError("train_classifier_simple needs class labels (b,) as targets; "
                                  "for next-token targets use train_model_simple")
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            examples_seen += input_batch.shape[0]
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                print(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        train_accuracy = calc_accuracy_loader(train_loader, model, device, num_batches=eval_iter)
        val_accuracy = calc_accuracy_loader(val_loader, model, device, num_batches=eval_iter)
        print(f"Training accuracy: {train_accuracy * 100:.2f}% | Validation accuracy: {val_accuracy * 100:.2f}%")
        train_accs.append(train_accuracy)
        val_accs.append(val_accuracy)
    return train_losses, val_losses, train_accs, val_accs, examples_seen


def classify_review(text: str, model, tokenizer, device, max_length: int | None = None,
                    pad_token_id: int = 50256) -> str:
    """"spam" or "not spam" for one message, padded like the training data.

    The ids are cut to ``min(max_length, context_length)`` and padded to
    ``max_length`` (pass the training set's ``max_length``); ``None`` keeps the
    message's own length (cut to the context). Full strength: ``gptlab classify``.
    """
    model.eval()
    input_ids = tokenizer.encode(text)
    supported_context_length = model.pos_emb.weight.shape[0]
    if max_length is None:
        input_ids = input_ids[:supported_context_length]
    else:
        input_ids = input_ids[:min(max_length, supported_context_length)]
        input_ids += [pad_token_id] * (max_length - len(input_ids))
        input_ids = input_ids[:supported_context_length]
    if not input_ids:
        raise GptlabError("the text is empty after tokenization; give a message to classify")
    input_tensor = torch.tensor(input_ids, device=device).unsqueeze(0)  # (1, T)
    with torch.no_grad():
        logits = model(input_tensor)[:, -1, :]
    predicted_label = torch.argmax(logits, dim=-1).item()
    return "spam" if predicted_label == 1 else "not spam"
