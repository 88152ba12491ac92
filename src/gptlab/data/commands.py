"""``gptlab prepare``: tokenize a corpus into memmapped train/val token files."""

from __future__ import annotations

from gptlab.errors import GptlabError


def prepare(data: str = "builtin", out: str | None = None, tokenizer: str | None = None, val_ratio: float = 0.1,
            chunk_chars: int = 1_000_000, vocab_size: int = 8192, sample_chars: int = 5_000_000,
            progress: bool = True) -> int:
    """Tokenize a corpus of any size into OUT/train.bin, OUT/val.bin and OUT/meta.json, in bounded memory.

    The tokenizer is saved into OUT too, so `--tokenizer OUT` reloads it.

    Args:
        data: corpus: "builtin" (offline), a dataset name (the-verdict, tinyshakespeare),
            a .txt file, a directory of .txt files, or a .jsonl file with a "text" field.
        out: output directory (required).
        tokenizer: tokenizer spec ("gpt2", a dir with encoder.json + vocab.bpe, a tokenizer.json,
            a saved gptlab tokenizer dir, a .gguf file), or "char" for a character vocabulary
            built from the corpus. Omit it (or say "bpe") to train a byte-level BPE on the corpus.
        val_ratio: fraction of the tokens, from the end, kept for validation.
        chunk_chars: characters read and tokenized at a time; bounds the memory used.
        vocab_size: vocabulary size of the trained BPE (only without --tokenizer).
        sample_chars: characters of the corpus the BPE is trained on (only without --tokenizer).
        progress: show a progress bar.
    """
    from gptlab.data.prepare import prepare_corpus

    if not out:
        raise GptlabError("give --out DIR: where to write train.bin, val.bin and meta.json")
    for name, value in (("chunk-chars", chunk_chars), ("vocab-size", vocab_size), ("sample-chars", sample_chars)):
        if value < 1:
            raise GptlabError(f"--{name} {value} must be at least 1")
    meta = prepare_corpus(data, out, tokenizer=tokenizer, val_ratio=val_ratio, chunk_chars=chunk_chars,
                          vocab_size=vocab_size, sample_chars=sample_chars, progress=progress)
    print(f"wrote {out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
          f"({meta['dtype']}, {meta['tokenizer_kind']} tokenizer, vocab {meta['vocab_size']:,})")
    return 0
