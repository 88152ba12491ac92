"""Pretraining data beyond one corpus: mixtures of sources, streamed corpora, and the corpus-size check.

    gptlab train --data book.txt:0.7 --data code/:0.3        # a mixture (MixtureBatches)
    gptlab train --data corpus_jsonl/ --stream               # tokenized on the fly (StreamBatches)

:func:`default_vocab` is the trained BPE's vocabulary when ``--vocab-size`` is
not given (it grows with the corpus); :func:`corpus_advice` is the one line
``gptlab train`` prints when the corpus is far too small for the model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gptlab.errors import GptlabError

TOKENS_PER_PARAM = 20  # Chinchilla's compute-optimal ratio (Hoffmann et al. 2022)
FAR_TOO_SMALL = 1.0  # warn below this many training tokens per parameter (20x under Chinchilla)
SMALL_PRESETS = ("gpt2-nano", "gpt2-micro", "gpt2-mini", "gpt2-124m", "gpt2-355m", "gpt2-774m", "gpt2-1558m")
CHARS_PER_VOCAB_ENTRY = 100


def default_vocab(train_chars: int) -> int:
    """The trained BPE's default vocabulary: the power of two nearest ``chars / 100``, in [512, 32768].

    20 KB of text gets 512, a 170 KB book 2,048, the built-in corpus (418 K
    training characters) 4,096, tinyshakespeare 8,192; 3.3 MB and more, 32,768.
    """
    target = max(1, train_chars) / CHARS_PER_VOCAB_ENTRY
    return int(min(32768, max(512, 2 ** round(math.log2(max(target, 1))))))


def _params(preset: str, vocab: int, context_length: int | None = None) -> int:
    from gptlab.models import get_preset

    cfg = get_preset(preset)
    changes = {"vocab_size": vocab} | ({"context_length": context_length} if context_length else {})
    return cfg.replace(**changes).param_counts()["total"]


def fitting_preset(train_tokens: int, train_chars: int | None, max_vocab: int | None = None) -> tuple[str, int, int]:
    """(preset, vocab, parameters) of the largest small preset that ``train_tokens`` trains compute-optimally
    (about 20 tokens per parameter), with the vocabulary :func:`default_vocab` gives for the corpus (at most
    ``max_vocab``); the smallest preset when none does."""
    vocab = default_vocab(train_chars if train_chars is not None else train_tokens * 4)
    vocab = min(vocab, max_vocab) if max_vocab else vocab
    best = None
    for name in SMALL_PRESETS:
        n = _params(name, vocab)
        if n * TOKENS_PER_PARAM <= train_tokens and (best is None or n > best[2]):
            best = (name, vocab, n)
    return best or (SMALL_PRESETS[0], vocab, _params(SMALL_PRESETS[0], vocab))


def corpus_advice(train_tokens: int, n_params: int, preset: str, vocab: int,
                  train_chars: int | None = None) -> str | None:
    """One line when the corpus is far too small for the model (under ``FAR_TOO_SMALL`` tokens per parameter):
    the ratio, what Chinchilla would want, and the preset (and vocabulary) that fits; None otherwise."""
    ratio = train_tokens / max(1, n_params)
    if ratio >= FAR_TOO_SMALL:
        return None
    name, fit_vocab, fit_n = fitting_preset(train_tokens, train_chars, max_vocab=vocab)
    head = (f"warning: {train_tokens:,} training tokens for {n_params / 1e6:.2f}M parameters ({preset}, vocab "
            f"{vocab:,}) is {ratio:.3g} tokens per parameter, far below the ~{TOKENS_PER_PARAM} that is "
            "compute-optimal: it will memorize the corpus and its validation loss will climb early; ")
    if fit_n * TOKENS_PER_PARAM <= train_tokens:
        return head + (f"this corpus fits --preset {name} --vocab-size {fit_vocab} ({fit_n / 1e6:.2f}M parameters), "
                       f"or give ~{n_params * TOKENS_PER_PARAM / 1e6:,.0f}M tokens of text for {preset}")
    smallest = min(fit_n, n_params)
    return head + (f"even --preset {name} --vocab-size {fit_vocab} ({fit_n / 1e6:.2f}M parameters) wants "
                   f"~{smallest * TOKENS_PER_PARAM / 1e6:,.1f}M tokens: give more text (or expect to overfit)")


# ---------------------------------------------------------------- mixtures
def _text_ids(tok, text: str) -> np.ndarray:
    ids = tok.encode(text, allowed_special="all")
    return np.asarray(ids, dtype=np.uint16 if tok.vocab_size < 65536 else np.uint32)


def mixture_sources(specs: Sequence[str], tokenizer_spec: str | None, vocab_size: int | None, val_ratio: float,
                    build_tokenizer) -> tuple[Any, list[str], list[float], list, list, int]:
    """(tokenizer, names, weights, train token arrays, val token arrays, training characters) of a mixture.

    Prepared directories (``gptlab prepare``) are memmapped and must share one
    tokenizer; text sources are split like a single corpus and tokenized with
    it (or with a BPE trained on all their training splits).
    ``build_tokenizer(spec, train_text, vocab_size, full_text)`` makes that tokenizer.
    """
    from gptlab import data as D
    from gptlab.data.mixture import parse_mixture

    parsed = parse_mixture(specs)
    prepared = {p: D.load_prepared(p) for p, _ in parsed if D.is_prepared(p)}
    texts = {p: D.split_text(D.load_corpus(p), 1.0 - val_ratio) for p, _ in parsed if p not in prepared}
    tok = None
    if prepared and tokenizer_spec is None:
        toks = {p: d.tokenizer() for p, d in prepared.items()}
        kinds = {(t.kind, t.vocab_size) for t in toks.values()}
        if len(kinds) > 1:
            raise GptlabError("the prepared --data sources were made with different tokenizers "
                              f"({', '.join(f'{p}: {t.kind} {t.vocab_size}' for p, t in toks.items())}); "
                              "prepare them with one --tokenizer")
        tok = next(iter(toks.values()))
    train_chars = sum(len(tr) for tr, _ in texts.values())
    if tok is None:
        joined = "\n\n".join(tr for tr, _ in texts.values())
        tok = build_tokenizer(tokenizer_spec, joined, vocab_size or default_vocab(train_chars), joined)
    train, val = [], []
    for p, _ in parsed:
        if p in prepared:
            if prepared[p].meta.get("vocab_size") not in (None, tok.vocab_size):
                raise GptlabError(f"{p} was prepared with a {prepared[p].meta['vocab_size']}-token vocabulary, "
                                  f"the run's tokenizer has {tok.vocab_size}; use one tokenizer for every source")
            train.append(prepared[p].train)
            val.append(prepared[p].val)
        else:
            train.append(_text_ids(tok, texts[p][0]))
            val.append(_text_ids(tok, texts[p][1]))
    from gptlab.training.settings import recorded_ref

    names = [recorded_ref(p) for p, _ in parsed]  # as the run records them, so a resume compares equal
    return tok, names, [w for _, w in parsed], train, val, train_chars


def mixture_batches(names, weights, train, val, L: int, batch_size: int, seed: int, rank: int = 0,
                    world: int = 1):
    """(train, val or None) :class:`MixtureBatches` over the sources (val: those with a window of tokens)."""
    from gptlab.data.mixture import MixtureBatches

    train_b = MixtureBatches(train, weights, L, batch_size, seed=seed, rank=rank, world=world, names=names)
    keep = [k for k, v in enumerate(val) if len(v) > L + 1]
    val_b = None
    if keep:
        val_b = MixtureBatches([val[k] for k in keep], [weights[k] for k in keep], L, batch_size, seed=seed + 1,
                               rank=rank, world=world, names=[names[k] for k in keep])
    return train_b, val_b


# ---------------------------------------------------------------- streaming
def stream_sample(spec: str, sample_chars: int) -> str:
    """The first ``sample_chars`` characters of a streamed corpus's documents (to train a tokenizer on)."""
    from gptlab.data.sources import iter_documents, list_sources, plan_shards

    root = str(Path(spec).expanduser().resolve()) if Path(spec).expanduser().is_dir() else None
    parts, left = [], sample_chars
    for shard in plan_shards(list_sources(spec), 64 << 20):
        for piece in shard:
            for _, text in iter_documents(piece, root):
                parts.append(text[:left])
                left -= len(parts[-1])
                if left <= 0:
                    return "\n\n".join(parts)
    return "\n\n".join(parts)


def stream_batches(spec: str, tok, L: int, batch_size: int, val_ratio: float, rank: int = 0, world: int = 1):
    """(train, val) :class:`StreamBatches` of a streamed corpus: every ``round(1 / val_ratio)``-th document is
    held out for validation."""
    from gptlab.data.stream import StreamBatches, TokenStream

    every = max(2, round(1 / val_ratio))
    train = TokenStream(spec, tok, L, rank=rank, world=world, split="train", val_every=every)
    val = TokenStream(spec, tok, L, rank=rank, world=world, split="val", val_every=every)
    return StreamBatches(train, batch_size, eval_stream=None), StreamBatches(val, batch_size, eval_stream=val)
