"""Instruction fine-tuning (the course's chapter 7): teach a pretrained LM to follow instructions.

Recipe:

    read entries (Alpaca JSON/JSONL: instruction, input, output; or chat-messages JSONL)
    -> the course's 85/10/5 split in file order (train / test / val)
    -> render each entry in a prompt style: alpaca or phi-3 (the course's), chatml, llama-3, or chat
       (the model's own template); the styles are those of ``gptlab chat --style``
    -> token ids = prompt + response + end-of-text
    -> collate: pad to the batch's longest, targets = inputs shifted by one, padding in the
       targets -> -100 except the first end-of-text, optional masking of the prompt tokens,
       allowed_max_length truncation
    -> train_loop() with the ordinary next-token loss (targets of -100 are ignored)
    -> greedy responses for the test split, saved with a ``model_response`` field per entry
       (the course's ``instruction-data-with-response.json``)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_json, atomic_write_text
from gptlab.finetune.common import json_records, load_model_and_tokenizer, pad_id_of, restore_checkpoint, split_fractions
from gptlab.tokenizers.chat_template import MODEL_TEMPLATE, PROMPT_STYLES, style_name
from gptlab.training.batches import Batch, IndexedBatches
from gptlab.training.driver import Job, run_recipe
from gptlab.training.loop import TrainConfig
from gptlab.training.settings import RunSettings, api, command, from_record, recorded_ref, train_config_from

IGNORE = -100
STYLES = PROMPT_STYLES  # alpaca, phi-3 (alias phi3), chatml, llama-3, chat
RESPONSES_FILE = "instruction-data-with-response.json"
CONFIG_FILE = "instruct_config.json"  # the run's settings, for --resume
DEFAULT_EPOCHS = 2


# ---- data --------------------------------------------------------------------------------------

def _from_messages(messages: list[dict], where: str) -> dict:
    """A chat-messages record -> an entry (the last assistant turn is the output)."""
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise GptlabError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
    if messages[-1]["role"] != "assistant":
        raise GptlabError(f"{where}: the last message must be the assistant's answer (role 'assistant')")
    users = [m["content"] for m in messages[:-1] if m["role"] == "user"]
    return {"instruction": users[-1] if users else "", "input": "", "output": messages[-1]["content"],
            "messages": messages}


def load_instruction_data(data: str | Path) -> list[dict]:
    """Entries with ``instruction``, ``input``, ``output`` (and ``messages`` for chat records).

    Accepts a JSON array or JSONL of Alpaca-style objects, JSONL of
    ``{"messages": [...]}`` chat records, or the named dataset ``instruction-data``.
    """
    if str(data) == "instruction-data":
        from gptlab.data.download import fetch_dataset

        data = fetch_dataset("instruction-data")
    p = Path(data)
    if p.is_dir():
        raise GptlabError(f"instruction data {p} is a directory; give a .json/.jsonl file inside it "
                          "or 'instruction-data'")
    if not p.is_file():
        raise GptlabError(f"instruction data {p} not found; give a .json/.jsonl file or 'instruction-data'")
    entries = []
    for where, r in json_records(p):
        where = f"{p} {where}"
        if isinstance(r, dict) and "messages" in r:
            entries.append(_from_messages(r["messages"], where))
        elif isinstance(r, dict) and "instruction" in r and "output" in r:
            entries.append({"instruction": str(r["instruction"]), "input": str(r.get("input") or ""),
                            "output": str(r["output"])})
        else:
            raise GptlabError(f"{where} needs 'instruction' and 'output' keys (Alpaca style) or 'messages'")
    if not entries:
        raise GptlabError(f"{p} holds no entries")
    return entries


def course_split(entries: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """The course's split in file order: first 85% train, next 10% test, the rest validation."""
    train, test, val = split_fractions(entries, (0.85, 0.10, 0.05))
    return train, test, val


# ---- prompt styles -----------------------------------------------------------------------------

# How an Alpaca entry's optional input joins its instruction in the user turn: the course's two formats
# put it under "### Input:" (alpaca) or on the next line (phi-3); other templates get a blank line.
INPUT_JOIN = {"alpaca": "\n\n### Input:\n", "phi-3": "\n"}


def _messages(entry: dict, style: str) -> list[dict]:
    """The conversation before the answer: a chat record's messages, or one user turn built from the entry."""
    if "messages" in entry:
        return entry["messages"][:-1]
    join = INPUT_JOIN.get(style, "\n\n")
    return [{"role": "user", "content": entry["instruction"] + (join + entry["input"] if entry.get("input") else "")}]


def render_chat(template: str, messages: list[dict], tokenizer=None, add_generation_prompt: bool = True) -> str:
    """Render a Jinja chat template or built-in style for ``messages`` (as Hugging Face does; tokenizers/chat_template.py)."""
    from gptlab.tokenizers.chat_template import apply_chat_template

    tokens = {k: getattr(tokenizer, k, None) or "" for k in ("bos_token", "eos_token")}
    return apply_chat_template(messages, template, add_generation_prompt=add_generation_prompt, **tokens)


def _template(style: str, tokenizer) -> str:
    """The template source of a prompt style: a built-in, or the tokenizer's own for ``chat``."""
    style = style_name(style)
    if style != MODEL_TEMPLATE:
        return style
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise GptlabError(f"prompt style '{MODEL_TEMPLATE}' needs a tokenizer with a chat template; this one has "
                          "none (use --style alpaca or phi-3)")
    return template


def format_input(entry: dict, style: str = "alpaca", tokenizer=None) -> str:
    """The prompt without the header that opens the answer; for alpaca the course's ``format_input`` exactly."""
    return render_chat(_template(style, tokenizer), _messages(entry, style_name(style)), tokenizer,
                       add_generation_prompt=False)


def format_example(entry: dict, style: str = "alpaca", tokenizer=None) -> tuple[str, str]:
    """(prompt, response): the prompt ends right where the model's answer begins.

    The prompt is the style's template (``gptlab.tokenizers.chat_template``, the
    same definitions ``gptlab chat --style`` uses) with the generation prompt:

    alpaca: preamble + ``"\n\n### Instruction:\n..."`` [+ ``"\n\n### Input:\n..."``] + ``"\n\n### Response:\n"``
    phi-3:  ``"<|user|>\n..."`` [+ ``"\n" + input``] + ``"\n<|assistant|>\n"``
    chatml, llama-3: their turn markup; chat: the tokenizer's chat template
    """
    name = style_name(style)
    return render_chat(_template(name, tokenizer), _messages(entry, name), tokenizer), entry["output"]


def encode_example(tok, entry: dict, style: str) -> tuple[list[int], int]:
    """(token ids of prompt + response, number of prompt tokens). The end-of-text is added by the collate."""
    prompt, response = format_example(entry, style, tok)
    p = tok.encode(prompt, allowed_special="all")  # the template's own control tokens are meant
    r = tok.encode(response, allowed_special="none")
    return p + r, len(p)


# ---- collate -----------------------------------------------------------------------------------

def collate(items: list[list[int]], *, pad_id: int, eos_id: int | None = None, ignore_index: int = IGNORE,
            allowed_max_length: int | None = None, prompt_lengths: list[int] | None = None,
            mask_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The course's ``custom_collate_fn``: (inputs (B, T), targets (B, T)).

    Each item gets one end-of-text appended (``eos_id``, default ``pad_id``);
    items are right-padded with ``pad_id`` to the batch's longest; targets are
    the inputs shifted left by one, with every padding position after the
    end-of-text set to ``ignore_index``. With ``mask_prompt`` the targets that
    are prompt tokens are ignored too, so only the response is learned. Both
    tensors are cut to ``allowed_max_length``.
    """
    if not items:
        raise GptlabError("cannot collate an empty batch")
    if mask_prompt and prompt_lengths is None:
        raise GptlabError("mask_prompt needs the prompt length of every item")
    eos = pad_id if eos_id is None else eos_id
    T = max(len(it) + 1 for it in items)
    inputs = torch.full((len(items), T - 1 if T > 1 else 1), pad_id, dtype=torch.long)  # (B, T-1)
    targets = torch.full_like(inputs, ignore_index)  # (B, T-1)
    for b, it in enumerate(items):
        seq = list(it) + [eos]
        inputs[b, :len(seq) - 1] = torch.tensor(seq[:-1], dtype=torch.long)
        targets[b, :len(seq) - 1] = torch.tensor(seq[1:], dtype=torch.long)
        if mask_prompt:
            targets[b, :max(0, prompt_lengths[b] - 1)] = ignore_index  # target j is token j+1
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs, targets


def instruction_batches(encoded: list[tuple[list[int], int]], batch_size: int, *, pad_id: int, eos_id: int,
                        allowed_max_length: int | None, mask_prompt: bool, shuffle: bool, drop_last: bool,
                        seed: int = 0) -> IndexedBatches:
    """Batch source for :func:`gptlab.training.train_loop` over encoded (ids, prompt_length) examples."""

    def fetch(idx: torch.Tensor) -> Batch:
        rows = [encoded[i] for i in idx.tolist()]
        return collate([r[0] for r in rows], pad_id=pad_id, eos_id=eos_id, allowed_max_length=allowed_max_length,
                       prompt_lengths=[r[1] for r in rows], mask_prompt=mask_prompt)

    return IndexedBatches(len(encoded), batch_size, fetch, shuffle=shuffle, drop_last=drop_last, seed=seed,
                          tokens_per_item=max(1, sum(len(e[0]) for e in encoded) // max(1, len(encoded))))


class InstructionTask:
    """Next-token cross-entropy over the targets that are not -100 (a batch with none counts 0, not NaN)."""

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        import torch.nn.functional as F

        x, y = batch[0], batch[1]
        logits = model(x)  # (B, T, V)
        total = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum")
        return total / (y != IGNORE).sum().clamp(min=1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Batch]) -> dict[str, float]:
        import math

        losses = [float(self.loss(model, b)) for b in batches]
        loss = sum(losses) / max(1, len(losses))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# ---- responses ---------------------------------------------------------------------------------

@torch.no_grad()
def generate_responses(model: nn.Module, tok, entries: list[dict], style: str = "alpaca",
                       max_new_tokens: int = 128, progress: bool = True) -> list[dict]:
    """Copies of ``entries`` with a ``model_response`` field: the greedy continuation of each prompt.

    A response ends where a chat reply in ``style`` would: at the model's StopSet for that
    prompt style (eos, the template's end-of-turn token, the style's stop strings).
    """
    from gptlab.inference import StopSet, completion_text, generate_events

    stops = StopSet.for_model(tok, model.cfg, template=_template(style, tok))
    out = []
    it = entries
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(entries, desc="responses", unit="entry", dynamic_ncols=True)
    for entry in it:
        prompt, _ = format_example(entry, style, tok)
        ids = torch.tensor(tok.encode(prompt, allowed_special="all"))
        events = generate_events(model, ids, max_new_tokens, tokenizer=tok, stops=stops, text_after_prompt=False)
        text = completion_text(events)[0].replace("### Response:", "").strip()
        e = {k: v for k, v in entry.items() if k != "messages"}
        e["model_response"] = text
        out.append(e)
    return out


# ---- the whole run -----------------------------------------------------------------------------

@dataclasses.dataclass
class InstructSettings(RunSettings):
    """Instruction fine-tuning (Alpaca / Phi-3 / the model's chat template), then test-set responses.

    Writes OUT/model (best by validation loss; LoRA adapters merged, and also saved
    alone in OUT/adapter in the peft format), OUT/instruction-data-with-response.json
    (the test entries with a model_response field), metrics.jsonl and loss.png.

    Attributes:
        model: pretrained model: run/model dir, Hugging Face dir, .gguf file or pkg:PACKAGE/PATH.
        data: instruction-data (downloaded, checksummed), or a JSON/JSONL file of
            {instruction, input, output} or {messages: [...]} records.
        style: prompt style: alpaca, phi-3 (alias phi3), chatml, llama-3, or chat (the model's own chat
            template); `gptlab chat --style` renders the same formats.
        trainable: what trains: last-N (last N blocks + final norm + head), head, all, or lora.
        mask_prompt: learn only the response tokens (the prompt's targets are ignored).
        allowed_max_length: truncate every example to this many tokens.
        epochs: passes over the training split (default 2).
        max_steps: stop after this many optimizer steps instead.
        batch_size: examples per batch.
        lr: learning rate (AdamW, constant).
        weight_decay: AdamW weight decay.
        eval_every: evaluate, sample and checkpoint every N steps (default: twice per epoch).
        eval_iters: batches per evaluation.
        lora_rank: LoRA rank (with --trainable lora).
        lora_alpha: LoRA alpha (with --trainable lora).
        lora_dropout: dropout on the LoRA input (with --trainable lora).
        lora_targets: module names that get adapters (default: all linear layers of the blocks).
        max_new_tokens: longest generated response.
        max_test: generate responses for only the first N test entries.
        resume: continue the run in this directory from its latest checkpoint, with the settings it was
            started with (only --epochs or --max-steps, the new total, may change).
        progress: show progress bars.
    """

    POSITIVE = ('allowed_max_length', 'lora_rank', 'lora_alpha', 'max_test', 'max_new_tokens')

    model: str | None = None
    data: str = "instruction-data"
    out: str = "runs/instruct"
    style: str = "alpaca"
    trainable: str = "last-4"
    mask_prompt: bool = False
    allowed_max_length: int = 256
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    eval_every: int | None = None
    eval_iters: int = 5
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None
    max_new_tokens: int = 128
    max_test: int | None = None


RECORDED = ("model", "data", "style", "trainable", "mask_prompt", "allowed_max_length", "lora_rank", "lora_alpha",
            "lora_dropout", "lora_targets", "max_new_tokens", "max_test")


def _encode(tok, s: InstructSettings, parts: dict[str, list[dict]], limit: int) -> dict[str, list]:
    """(ids, prompt length) per example; with mask_prompt, examples whose prompt fills the window are dropped."""
    enc = {k: [encode_example(tok, e, s.style) for e in part] for k, part in parts.items()}
    if s.mask_prompt:  # an example whose prompt fills the whole window would teach nothing
        for k in enc:
            kept = [e for e in enc[k] if e[1] < limit]
            if len(kept) < len(enc[k]):
                print(f"note: {len(enc[k]) - len(kept)} {k} examples dropped: their prompt alone reaches "
                      f"allowed_max_length={limit}", flush=True)
            enc[k] = kept
        if not enc["train"]:
            raise GptlabError(f"every training prompt is at least allowed_max_length={limit} tokens long, so "
                              "nothing is left to learn; raise --allowed_max_length or drop --mask_prompt")
    return enc


def _saver(tok, lora: bool, base_model: str):
    from gptlab.finetune.lora import merged_copy, save_adapter
    from gptlab.weights.native import save_model_dir

    def save(m: nn.Module, d: Path) -> None:
        save_model_dir(merged_copy(m) if lora else m, d, tok)
        if lora:
            save_adapter(m, d / "adapter", base_model=base_model)

    return save


class InstructionTuning:
    """The instruction-tuning recipe (see the module docstring)."""

    config_file, what, limits = CONFIG_FILE, "instruction", ("max_steps", "epochs")
    refs = {"model": (), "data": ("instruction-data",)}

    def check(self, s: InstructSettings) -> None:
        if not s.model:
            raise GptlabError("give the pretrained model to start from: --model REF (or --resume RUN_DIR)")
        if not 0.0 <= s.lora_dropout < 1.0:
            raise GptlabError(f"--lora-dropout {s.lora_dropout} must be in [0, 1)")
        from gptlab.refs import resolve

        resolve(s.model)  # a wrong model reference fails now, not after the data is prepared

    def train_config(self, s: InstructSettings, device) -> TrainConfig:
        epochs = None if s.max_steps else (DEFAULT_EPOCHS if s.epochs is None else s.epochs)
        return train_config_from(s, epochs=epochs, eval_every=s.eval_every or 50, warmup_steps=0, min_lr=s.lr,
                                 device=str(device))

    def record(self, s: InstructSettings) -> dict:
        return {k: getattr(s, k) for k in RECORDED} | {
            "model": recorded_ref(s.model), "data": recorded_ref(s.data, ["instruction-data"]),
            "style": style_name(s.style), "lora_targets": list(s.lora_targets or ["all-linear"])}

    def from_record(self, meta: dict, s: InstructSettings) -> InstructSettings:
        meta["settings"]["style"] = style_name(meta["settings"]["style"])  # runs recorded "phi3" before phi-3
        s.style = style_name(s.style)  # compared with the recorded one by the resume rule
        return from_record(InstructSettings, meta, s)

    def build(self, s: InstructSettings, cfg: TrainConfig, dev, resuming, steps_known) -> Job:
        from gptlab.finetune.lora import LoraConfig, add_lora
        from gptlab.finetune.surgery import apply_freezing

        if resuming is None:
            s = dataclasses.replace(s, **self.record(s))
        entries = load_instruction_data(s.data)
        train, test, val = course_split(entries)
        if len(train) < cfg.batch_size:
            raise GptlabError(f"{s.data} holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: the 85/10/5 "
                              f"split leaves {len(train)} for training, fewer than --batch-size {cfg.batch_size}; "
                              "give more data (a JSON array or one object per line) or a smaller --batch-size")
        torch.manual_seed(cfg.seed)
        net, tok = load_model_and_tokenizer(s.model, dev)
        pad = pad_id_of(tok)
        limit = min(s.allowed_max_length, net.cfg.context_length)
        enc = _encode(tok, s, {"train": train, "val": val}, limit)
        lora = s.trainable.strip().lower() == "lora"
        if lora:
            add_lora(net, LoraConfig(rank=s.lora_rank, alpha=s.lora_alpha, dropout=s.lora_dropout, targets=s.lora_targets))
        counts = apply_freezing(net, s.trainable)
        net.to(dev)
        kw = dict(pad_id=pad, eos_id=tok.eos_id if tok.eos_id is not None else pad, allowed_max_length=limit,
                  mask_prompt=s.mask_prompt)
        train_b = instruction_batches(enc["train"], cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed, **kw)
        steps_known(cfg.steps_per_epoch(len(train_b)))
        resume_state = restore_checkpoint(net, resuming.path) if resuming is not None else None
        if resuming is None and s.eval_every is None:
            cfg.eval_every = max(1, len(train) // cfg.batch_size // 2)  # twice per epoch
        val_b = instruction_batches(enc["val"], cfg.batch_size, shuffle=False, drop_last=False, **kw) if enc["val"] else None
        print(f"data: {len(train)} train / {len(test)} test / {len(val)} val entries, style {s.style}"
              f"{', prompt masked' if s.mask_prompt else ''}; model: {counts['trainable'] / 1e6:.2f}M of "
              f"{counts['total'] / 1e6:.2f}M parameters train ({s.trainable}); device {dev}", flush=True)
        sample_entry = (val or test or train)[0]

        def sample(m: nn.Module) -> str:
            return generate_responses(m, tok, [sample_entry], s.style, min(48, s.max_new_tokens), progress=False)[0][
                "model_response"]

        return Job(net, train_b, val_b, InstructionTask(), tok, steps_per_epoch=cfg.steps_per_epoch(len(train_b)),
                   save_model=_saver(tok, lora, s.model), sample_fn=sample, resume_state=resume_state,
                   extra=dict(s=s, lora=lora, split=(train, test, val)))

    def report(self, s: InstructSettings, cfg: TrainConfig, job: Job, result, run: Path) -> dict:
        from gptlab.finetune.lora import save_adapter
        from gptlab.weights import load_model

        s, (train, test, val) = job.extra["s"], job.extra["split"]
        if job.extra["lora"]:
            save_adapter(job.model, run / "adapter", base_model=s.model)
        best = load_model(run / "model", device=next(job.model.parameters()).device)  # best by validation loss
        todo = test if s.max_test is None else test[:s.max_test]
        responses = generate_responses(best, job.tokenizer, todo, s.style, s.max_new_tokens, progress=s.progress)
        atomic_write_text(run / RESPONSES_FILE, json.dumps(responses, indent=4, ensure_ascii=False))
        summary = {"steps": result.step, "best_val_loss": result.best_val_loss, "best_step": result.best_step,
                   "n_train": len(train), "n_test": len(test), "n_val": len(val), "responses": str(run / RESPONSES_FILE)}
        atomic_write_json(run / "summary.json", summary)
        print(f"stopped ({result.stopped_because}) at step {result.step}; best val loss "
              f"{result.best_val_loss if result.best_val_loss is None else round(result.best_val_loss, 3)}; "
              f"{len(responses)} test responses in {run / RESPONSES_FILE}", flush=True)
        print(f"next: gptlab judge --responses {run / RESPONSES_FILE} --judge REF_OR_URL", flush=True)
        return summary


finetune_instruct = api(InstructSettings, lambda s: run_recipe(InstructionTuning(), s), name="finetune_instruct", positional=("model", "data", "out"),
                        returns=dict, summary="Instruction-tune ``model`` on ``data``; returns a summary "
                        "(see :class:`InstructSettings`).")
instruct_command = command(InstructSettings, lambda s: run_recipe(InstructionTuning(), s), name="instruct_command")
