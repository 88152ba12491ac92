"""``gptlab tokenizer train`` and ``gptlab tokenizer encode``."""

from __future__ import annotations

from gptlab.errors import GptlabError


def train_tokenizer(data: str = "builtin", vocab_size: int = 8192, out: str | None = None, min_frequency: int = 2,
                    special_tokens: list[str] | None = None) -> int:
    """Train a lossless byte-level BPE tokenizer on a corpus and save it to OUT.

    Load it later with `--tokenizer OUT` or `gptlab.load_tokenizer(OUT)`.

    Args:
        data: corpus: "builtin" (offline), a dataset name (the-verdict, tinyshakespeare),
            a .txt file, a directory of .txt files, or a .jsonl file with a "text" field.
        vocab_size: total vocabulary size (256 bytes + merges + special tokens).
        out: directory to save the tokenizer in (required).
        min_frequency: a pair must occur at least this often to be merged.
        special_tokens: special tokens (the first is end-of-text); default <|endoftext|>.
    """
    from gptlab.data.corpus import iter_corpus
    from gptlab.tokenizers import EOT, train_bpe
    from gptlab.tokenizers.bpe import shortfall_note

    if not out:
        raise GptlabError("give --out DIR: where to save the trained tokenizer")
    tok = train_bpe(iter_corpus(data), vocab_size=vocab_size, min_frequency=min_frequency,
                    special_tokens=special_tokens or [EOT])
    tok.save(out)
    print(f"saved a {tok.vocab_size:,}-token byte-level BPE to {out} (eos {tok.eos_token!r} = {tok.eos_id})")
    note = shortfall_note(tok, vocab_size, min_frequency)
    if note:
        print(note)
    return 0


def encode(text: str, tokenizer: str = "gpt2", allowed_special: str = "all") -> int:
    """Print the token ids of TEXT and the piece of text each id stands for.

    Args:
        text: the text to encode.
        tokenizer: tokenizer spec ("gpt2", a dir with encoder.json + vocab.bpe,
            a tokenizer.json file or dir, a saved gptlab tokenizer dir).
        allowed_special: "all" (special-token spellings become special ids) or "none".
    """
    from gptlab.tokenizers import load_tokenizer

    if allowed_special not in ("all", "none"):
        raise GptlabError(f"--allowed_special must be 'all' or 'none', got {allowed_special!r}")
    tok = load_tokenizer(tokenizer)
    ids = tok.encode(text, allowed_special=allowed_special)
    print(f"{len(ids)} tokens ({tok.kind}, vocab {tok.vocab_size:,})")
    print("ids:   ", ids)
    print("pieces:", tok.token_pieces(ids))
    return 0
