"""``gptlab prepare``: tokenize a corpus into memmapped token files (one pair, or shards with an index)."""

from __future__ import annotations

from gptlab.errors import GptlabError


def prepare(data: str = "builtin", out: str | None = None, tokenizer: str | None = None, val_ratio: float = 0.1,
            chunk_chars: int = 1_000_000, vocab_size: int = 8192, sample_chars: int = 5_000_000,
            workers: int | None = None, shard_mb: float = 64.0, max_shards: int | None = None,
            dedup: str = "none", jaccard: float = 0.8, num_perm: int = 128, shingle: int = 3,
            quality: bool = False, min_chars: int | None = 50, max_symbol_ratio: float | None = 0.2,
            max_digit_ratio: float | None = 0.3, max_non_letter_ratio: float | None = 0.5,
            max_repeated_lines: float | None = 0.3, max_repeated_ngrams: float | None = 0.2, ngram: int = 5,
            progress: bool = True) -> int:
    """Tokenize a corpus of any size into memmapped token files, in bounded memory.

    Without --workers (and without curation): OUT/train.bin, OUT/val.bin and OUT/meta.json.
    With --workers N (0: every core), --dedup or --quality: sharded token files OUT/shard-*.bin
    with OUT/index.json, made by N worker processes; rerunning the same command resumes an
    interrupted run. The tokenizer is saved into OUT too, so `--tokenizer OUT` reloads it.

    Args:
        data: corpus: "builtin" (offline), a dataset name (the-verdict, tinyshakespeare),
            a .txt file, a directory of .txt files (with --workers: of .txt, .jsonl and .parquet
            files, searched recursively), or a .jsonl file with a "text" field.
        out: output directory (required).
        tokenizer: tokenizer spec ("gpt2", a dir with encoder.json + vocab.bpe, a tokenizer.json,
            a saved gptlab tokenizer dir, a .gguf file), or "char" for a character vocabulary
            built from the corpus. Omit it (or say "bpe") to train a byte-level BPE on the corpus.
        val_ratio: fraction of the tokens, from the end (of each shard), kept for validation.
        chunk_chars: characters read and tokenized at a time; bounds the memory used.
        vocab_size: vocabulary size of the trained BPE (only without --tokenizer).
        sample_chars: characters of the corpus the BPE is trained on (only without --tokenizer).
        workers: worker processes for sharded output (0: one per core).
        shard_mb: input megabytes per shard (bigger .txt/.jsonl files are split).
        max_shards: tokenize at most this many more shards and stop (run again to continue).
        dedup: remove duplicates: none, exact (same content hash), near (exact + MinHash LSH).
        jaccard: near-duplicate threshold on word-shingle Jaccard similarity.
        num_perm: MinHash permutations for --dedup near.
        shingle: words per shingle for --dedup near.
        quality: remove documents failing the quality rules (the thresholds below).
        min_chars: fewest non-whitespace characters a document may have (quality).
        max_symbol_ratio: most symbols (Unicode S*) among its non-whitespace characters (quality).
        max_digit_ratio: most digits (Unicode N*) among them (quality).
        max_non_letter_ratio: most characters that are not letters or marks (quality).
        max_repeated_lines: most of its lines that may repeat an earlier line (quality).
        max_repeated_ngrams: most of its word characters inside repeated word n-grams (quality).
        ngram: n of the repeated n-gram rule.
        progress: show a progress bar.
    """
    from gptlab.data.curate import Curation

    if not out:
        raise GptlabError("give --out DIR: where to write the token files")
    for name, value in (("chunk-chars", chunk_chars), ("vocab-size", vocab_size), ("sample-chars", sample_chars)):
        if value < 1:
            raise GptlabError(f"--{name} {value} must be at least 1")
    if workers is not None and workers < 0:
        raise GptlabError(f"--workers {workers} must be at least 1 (or 0 for one per core)")
    if not shard_mb > 0:
        raise GptlabError(f"--shard-mb {shard_mb} must be > 0")
    if max_shards is not None and max_shards < 1:
        raise GptlabError(f"--max-shards {max_shards} must be at least 1")
    cur = Curation(dedup=dedup, jaccard=jaccard, num_perm=num_perm, shingle=shingle, quality=quality,
                   min_chars=min_chars, max_symbol_ratio=max_symbol_ratio, max_digit_ratio=max_digit_ratio,
                   max_non_letter_ratio=max_non_letter_ratio, max_repeated_lines=max_repeated_lines,
                   max_repeated_ngrams=max_repeated_ngrams, ngram=ngram)
    if workers is None and not cur.active and max_shards is None:
        return _prepare_single(data, out, tokenizer, val_ratio, chunk_chars, vocab_size, sample_chars, progress)
    return _prepare_shards(data, out, tokenizer, val_ratio, chunk_chars, vocab_size, sample_chars, workers,
                           shard_mb, max_shards, cur, progress)


def _prepare_single(data, out, tokenizer, val_ratio, chunk_chars, vocab_size, sample_chars, progress) -> int:
    from gptlab.data.prepare import prepare_corpus

    meta = prepare_corpus(data, out, tokenizer=tokenizer, val_ratio=val_ratio, chunk_chars=chunk_chars,
                          vocab_size=vocab_size, sample_chars=sample_chars, progress=progress)
    print(f"wrote {out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
          f"({meta['dtype']}, {meta['tokenizer_kind']} tokenizer, vocab {meta['vocab_size']:,})")
    return 0


def _prepare_shards(data, out, tokenizer, val_ratio, chunk_chars, vocab_size, sample_chars, workers, shard_mb,
                    max_shards, cur, progress) -> int:
    from gptlab.data.curate import Report
    from gptlab.data.shards import cpu_workers, prepare_sharded

    n_workers = cpu_workers() if workers in (None, 0) else workers
    idx = prepare_sharded(data, out, tokenizer=tokenizer, val_ratio=val_ratio, chunk_chars=chunk_chars,
                          vocab_size=vocab_size, sample_chars=sample_chars, workers=n_workers,
                          shard_bytes=max(1, int(shard_mb * 1e6)), curation=cur, max_shards=max_shards,
                          progress=progress)
    if "curation" in idx:
        print(Report.from_dict(idx["curation"]).summary() + f" (details: {out}/curation.json)")
    n_done = sum(e is not None for e in idx["shards"])
    state = "" if idx["complete"] else f" so far; {len(idx['shards']) - n_done} shards left: run the same command again"
    print(f"wrote {out}: {n_done} of {len(idx['shards'])} shards, {idx['documents']:,} documents, "
          f"{idx['train_tokens']:,} train + {idx['val_tokens']:,} val tokens ({idx['dtype']}, "
          f"{idx['tokenizer_kind']} tokenizer, vocab {idx['vocab_size']:,}){state}")
    return 0
