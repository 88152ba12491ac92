"""Train your own byte-level BPE tokenizer (GPT-2 style) with Hugging Face ``tokenizers``.

Byte-level means the base alphabet is the 256 bytes, so any text encodes
without an unknown token and decodes back exactly: the ByteLevel
pre-tokenizer splits with GPT-2's regex and maps bytes to printable
characters, the ByteLevel decoder maps them back. No prefix space is added and
offsets are not trimmed, so ``decode(encode(s)) == s`` for every string.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from tokenizers import Tokenizer as _HFBackend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from gptlab.errors import GptlabError
from gptlab.tokenizers.base import EOT
from gptlab.tokenizers.hf import HFTokenizer


def train_bpe(texts: str | Iterable[str], vocab_size: int, special_tokens: Iterable[str] = (EOT,),
              min_frequency: int = 2, show_progress: bool = False) -> HFTokenizer:
    """Train a lossless byte-level BPE tokenizer.

    Args:
        texts: one string, or an iterable of strings (streamed; it may be a generator).
        vocab_size: total ids including the 256 byte tokens and the special tokens.
        special_tokens: special token strings; they get the first ids (0, 1, ...).
            The first is the end-of-text token (``eos_token``).
        min_frequency: a pair must occur this often to be merged.
        show_progress: print the trainer's progress bar.

    Returns:
        An :class:`HFTokenizer` with ``eos_token`` = the first special token. On a
        small or repetitive text it can hold fewer than ``vocab_size`` ids: the
        trainer stops when no pair occurs ``min_frequency`` times.
    """
    specials = list(special_tokens)
    if len(set(specials)) != len(specials):
        raise GptlabError(f"special_tokens {specials} has duplicates")
    smallest = 256 + len(specials)
    if vocab_size < smallest:
        raise GptlabError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs the 256 bytes "
                          f"+ {len(specials)} special tokens = at least {smallest}")
    if min_frequency < 1:
        raise GptlabError(f"min_frequency={min_frequency} must be >= 1")
    seen = {"chars": 0}

    def stream() -> Iterator[str]:
        for text in ([texts] if isinstance(texts, str) else texts):
            if not isinstance(text, str):
                raise GptlabError(f"train_bpe needs strings, got {type(text).__name__}")
            seen["chars"] += len(text)
            yield text

    backend = _HFBackend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=specials, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(stream(), trainer=trainer)
    if seen["chars"] == 0:
        raise GptlabError("train_bpe got no text; give a non-empty corpus")
    return HFTokenizer(backend, eos_token=specials[0] if specials else None)


def shortfall_note(tok: HFTokenizer, requested: int, min_frequency: int = 2) -> str | None:
    """One line explaining a trained vocabulary smaller than ``requested``, or None when it is full.

    BPE stops merging when no pair of tokens occurs ``min_frequency`` times: a
    small corpus cannot fill a large vocabulary, and asking for more changes nothing.
    """
    if tok.vocab_size >= requested:
        return None
    return (f"note: the corpus filled {tok.vocab_size:,} of the {requested:,} requested tokens: no pair left occurs "
            f"{min_frequency}+ times, so a larger --vocab-size changes nothing here (give more text, or a smaller "
            f"--vocab-size such as {tok.vocab_size:,})")
