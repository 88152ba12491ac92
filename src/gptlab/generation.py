"""Sampling and the cached decode loop.

``generate(model, ids, max_new_tokens, ...)`` works with every gptlab model
(any ``model(ids, cache=None) -> logits`` with ``new_cache``). Decoding runs
the prompt once (prefill) and then one token per step through the KV cache,
which gives the same tokens as recomputing the whole sequence every step
(tested) at a fraction of the cost.

Sampling pipeline per step, on the last position's logits (B, V):
    repetition penalty -> temperature -> top-k -> top-p (nucleus) -> min-p -> sample
Temperature 0 means greedy (argmax).
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from gptlab.errors import GptlabError


def validate_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                      min_p: float | None = None, max_new_tokens: int = 1,
                      repetition_penalty: float | None = None) -> None:
    """Raise a clear GptlabError for out-of-range sampling values."""
    if temperature is None or temperature < 0:
        raise GptlabError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise GptlabError(f"top_k={top_k} must be >= 1 (or omitted to disable)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GptlabError(f"top_p={top_p} must be in (0, 1] (1 disables nucleus sampling)")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise GptlabError(f"min_p={min_p} must be in [0, 1]")
    if max_new_tokens < 0:
        raise GptlabError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise GptlabError(f"repetition_penalty={repetition_penalty} must be > 0 (1 disables it)")


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, min_p: float | None = None) -> torch.Tensor:
    """Apply temperature and the top-k / top-p / min-p filters to (B, V) logits.

    Filtered-out entries become -inf; the most likely token always survives.
    """
    logits = logits.float() / max(temperature, 1e-8)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (keeps >= 1 token).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p is not None and min_p > 0.0:
        probs = logits.softmax(-1)
        threshold = min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def _apply_repetition_penalty(logits: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (Keskar et al. 2019): divide positive / multiply negative logits of seen tokens."""
    seen = torch.gather(logits, 1, seqs)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, seqs, seen)


@torch.inference_mode()
def generate(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None,
             eos_id: int | list[int] | None = None, min_new_tokens: int = 0,
             num_return_sequences: int = 1, seed: int | None = None, use_cache: bool = True,
             stream: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Continue token ids ``ids`` (B, T) (or (T,)) by up to ``max_new_tokens`` tokens.

    Args:
        model: any gptlab model (``model(ids, cache) -> logits``).
        ids: prompt token ids, (B, T) or (T,); cropped to the model's context from the left.
        max_new_tokens: how many tokens to add at most.
        temperature: 0 = greedy; otherwise logits are divided by it before sampling.
        top_k: keep only the k most likely tokens.
        top_p: keep the smallest set of tokens whose probability reaches p (nucleus).
        min_p: drop tokens less likely than min_p × the top token's probability.
        repetition_penalty: >1 discourages tokens already in the sequence.
        eos_id: stop a sequence once it emits this id (or any of these ids).
        min_new_tokens: eos is suppressed until this many tokens were generated.
        num_return_sequences: samples per prompt (the batch is repeated).
        seed: seed for a private random generator (reproducible sampling).
        use_cache: KV-cached decoding (False recomputes the whole sequence each step).
        stream: called with each step's new tokens (B,) as they are produced.

    Returns:
        (B · num_return_sequences, T + n) ids; sequences that stopped at eos are
        padded with eos after it.
    """
    validate_sampling(temperature, top_k, top_p, min_p, max_new_tokens, repetition_penalty)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.numel() == 0 or ids.shape[1] == 0:
        raise GptlabError("the prompt is empty: give at least one token (e.g. a start-of-text or a word)")
    if num_return_sequences > 1:
        ids = ids.repeat_interleave(num_return_sequences, dim=0)
    device = next(model.parameters()).device
    ids = ids.to(device)
    ctx = model.cfg.context_length
    eos_ids = [] if eos_id is None else ([eos_id] if isinstance(eos_id, int) else list(eos_id))
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed if seed is not None else torch.seed())

    was_training = model.training
    model.eval()
    B = ids.shape[0]
    out = ids
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache = None
    # Prompt longer than the context: keep the most recent tokens.
    window = ids[:, -ctx:]
    if use_cache:
        cache = model.new_cache(B, min(ctx, window.shape[1] + max_new_tokens))
        logits = model(window, cache)[:, -1]
    for step in range(max_new_tokens):
        if cache is not None and step > 0 and cache.pos >= cache.max_len:
            # The context is full: from here every step sees a shifted window of the
            # last `ctx` tokens, which a cache cannot reuse. Recompute instead.
            cache = None
        if cache is None:
            logits = model(out[:, -ctx:])[:, -1]
        elif step > 0:
            logits = model(out[:, -1:], cache)[:, -1]
        logits = logits.float()
        if repetition_penalty is not None and repetition_penalty != 1.0:
            logits = _apply_repetition_penalty(logits, out, repetition_penalty)
        if eos_ids and step < min_new_tokens:
            logits[:, eos_ids] = float("-inf")
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
            nxt = torch.multinomial(filtered.softmax(-1), 1, generator=gen).squeeze(-1)
        if eos_ids:
            nxt = torch.where(finished, torch.full_like(nxt, eos_ids[0]), nxt)
        out = torch.cat([out, nxt.unsqueeze(1)], dim=1)
        if stream is not None:
            stream(nxt)
        if eos_ids:
            finished |= torch.isin(nxt, torch.tensor(eos_ids, device=device))
            if bool(finished.all()):
                break
    if was_training:
        model.train()
    return out


def continuation_text(tok, context_ids: list[int], new_ids: list[int]) -> str:
    """Text of ``new_ids`` as it reads after ``context_ids``.

    Decoding new tokens alone can drop a space: SentencePiece decoders strip the
    leading space of a text, so "▁Paris" alone decodes to "Paris". Decoding a
    few context tokens with them and cutting the context's text off keeps it.
    """
    context = list(context_ids[-8:])
    if not context:
        return tok.decode(new_ids)
    base, full = tok.decode(context), tok.decode(context + list(new_ids))
    return full[len(base):] if full.startswith(base) else tok.decode(new_ids)


class TextStreamer:
    """Decode tokens incrementally and print only complete characters (for B == 1).

    Byte-level BPE tokens can split a UTF-8 character; text is held back until
    it decodes cleanly, so the terminal never shows a replacement character mid-way.
    ``context_ids`` (the prompt's last ids) make the first token's leading space
    come out right for SentencePiece tokenizers (see :func:`continuation_text`).
    """

    def __init__(self, tokenizer, file=None, stop_ids: list[int] | None = None,
                 context_ids: list[int] | None = None):
        self.tok, self.file = tokenizer, file or sys.stdout
        self.context = list(context_ids or [])[-8:]
        self.ids: list[int] = []
        self.printed = 0
        self.stop_ids = set(stop_ids or [])
        self.stopped = False

    def __call__(self, nxt: torch.Tensor) -> None:
        if self.stopped:
            return
        t = int(nxt[0])
        if t in self.stop_ids:
            self.stopped = True
            return
        self.ids.append(t)
        text = continuation_text(self.tok, self.context, self.ids)
        if text.endswith("\ufffd"):
            return
        self.file.write(text[self.printed:])
        self.file.flush()
        self.printed = len(text)

    def finish(self) -> None:
        text = continuation_text(self.tok, self.context, self.ids)
        self.file.write(text[self.printed:] + "\n")
        self.file.flush()


def generate_command(model: str, prompt: str = "", max_new_tokens: int = 100, temperature: float = 0.8,
                     top_k: int | None = 50, top_p: float | None = None, min_p: float | None = None,
                     repetition_penalty: float | None = None, seed: int | None = None,
                     num_samples: int = 1, stop_at_eos: bool = True, device: str = "auto",
                     dtype: str | None = None, quantize: str | None = None, stream: bool = True) -> int:
    """Generate text from a model.

    Args:
        model: a gptlab run or model directory, a Hugging Face directory or repo id,
            a .gguf file, or pkg:PACKAGE/PATH.
        prompt: the text to continue (empty: start from the end-of-text token).
        max_new_tokens: how many tokens to generate at most.
        temperature: 0 for greedy decoding; higher is more random.
        top_k: sample only among the k most likely tokens.
        top_p: nucleus sampling threshold in (0, 1].
        min_p: drop tokens below min_p × the top token's probability.
        repetition_penalty: >1 discourages repeating tokens.
        seed: random seed for reproducible samples.
        num_samples: how many samples to print.
        stop_at_eos: stop at the tokenizer's end-of-text token.
        device: auto, cpu, cuda or mps.
        dtype: weights dtype (fp32, bf16, fp16); default: the checkpoint's / fp32.
        quantize: "int4" (4-bit blocks like GGUF Q4_1; fastest on CPU) or "int8" weight-only
            linear layers: faster decoding, approximate logits.
        stream: print tokens as they are generated (one sample at a time).
    """
    from gptlab.device import parse_dtype, pick_device
    from gptlab.tokenizers import load_tokenizer
    from gptlab.weights import load_model

    validate_sampling(temperature, top_k, top_p, min_p, max_new_tokens, repetition_penalty)
    if num_samples < 1:
        raise GptlabError(f"--num-samples {num_samples} must be >= 1")
    if quantize is not None:
        from gptlab.quantize import check_scheme

        check_scheme(quantize)  # before the model is loaded
    dev = pick_device(device)
    net = load_model(model, dtype=parse_dtype(dtype), device=dev)
    if quantize is not None:
        from gptlab.quantize import apply_quantization

        apply_quantization(net, quantize)
    tok = load_tokenizer(model)
    ids = tok.encode(prompt) if prompt else []
    if ids and tok.add_bos and tok.bos_id is not None and ids[0] != tok.bos_id:
        ids = [tok.bos_id] + ids  # Llama 2 / Mistral / Llama 3 expect prompts to start with BOS
    if not ids:
        start = tok.bos_id if tok.bos_id is not None else tok.eos_id
        if start is None:
            raise GptlabError("empty prompt and the tokenizer has no start token; pass --prompt TEXT")
        ids = [start]
    x = torch.tensor([ids], dtype=torch.long)
    eos = tok.eos_id if stop_at_eos else None
    for i in range(num_samples):
        s = None if seed is None else seed + i
        if num_samples > 1:
            print(f"--- sample {i + 1} ---")
        if stream:
            sys.stdout.write(prompt)
            streamer = TextStreamer(tok, stop_ids=[eos] if eos is not None else None, context_ids=ids)
            generate(net, x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     repetition_penalty=repetition_penalty, eos_id=eos, seed=s, stream=streamer)
            streamer.finish()
        else:
            out = generate(net, x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           min_p=min_p, repetition_penalty=repetition_penalty, eos_id=eos, seed=s)
            new = out[0, len(ids):].tolist()
            if eos is not None and eos in new:
                new = new[:new.index(eos)]
            print(prompt + continuation_text(tok, ids, new))
    return 0
