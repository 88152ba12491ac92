"""A tokenizer rebuilt from a GGUF file's metadata.

A GGUF file carries no ``tokenizer.json``; llama.cpp stores the tokenizer as
metadata instead:

    tokenizer.ggml.model          "gpt2" = byte-level BPE (the only kind built here)
    tokenizer.ggml.pre            name of the pre-tokenizer (how text is split before BPE)
    tokenizer.ggml.tokens         the vocabulary, index = token id, in GPT-2's byte alphabet
    tokenizer.ggml.merges         "a b" merge rules, highest priority first
    tokenizer.ggml.token_type     1 normal, 2 unknown, 3 control (special), 4 user-defined, 6 byte
    tokenizer.ggml.{bos,eos,padding,unknown}_token_id
    tokenizer.chat_template       the Jinja chat template, if the model has one

From these we assemble a Hugging Face ``tokenizers.Tokenizer``: a BPE model over
the vocabulary and merges, the pre-tokenizer that ``tokenizer.ggml.pre`` names,
a ByteLevel decoder, and the control tokens as special added tokens (so text
such as ``<|im_end|>`` maps to its one id instead of being split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from gptlab.errors import GptlabError
from gptlab.tokenizers.hf import HFTokenizer
from gptlab.tokenizers.loading import register_resolver

# ---- pre-tokenizers: llama.cpp's `tokenizer.ggml.pre` names -> how text is split ----
# Split regexes (facts from the reference tokenizers these names stand for).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (  # Llama 3's pattern with single digits
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_style() -> pre_tokenizers.PreTokenizer:
    """GPT-2's own split regex (built into ByteLevel) then bytes -> byte alphabet."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    """Every digit its own piece, then GPT-2's regex (StarCoder, SmolLM)."""
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_style()])


def _split(regex: str):
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return build


PRE_TOKENIZERS = {
    "default": _gpt2_style,
    "gpt-2": _gpt2_style,
    "gpt2": _gpt2_style,
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "refact": _digits_then_gpt2,
    "llama-bpe": _split(LLAMA3_SPLIT),
    "llama3": _split(LLAMA3_SPLIT),
    "llama-v3": _split(LLAMA3_SPLIT),
    "smaug-bpe": _split(LLAMA3_SPLIT),
    "dbrx": _split(LLAMA3_SPLIT),
    "falcon3": _split(LLAMA3_SPLIT),
    "qwen2": _split(QWEN2_SPLIT),
    "deepseek-r1-qwen": _split(QWEN2_SPLIT),
}

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def build_tokenizer(meta: dict[str, Any], source: str = "GGUF file") -> Tokenizer:
    """Assemble a ``tokenizers.Tokenizer`` from GGUF tokenizer metadata.

    Args:
        meta: GGUF metadata (``gptlab.weights.gguf.read_metadata``), at least the
            ``tokenizer.ggml.*`` keys.
        source: name of the file, for error messages.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise GptlabError(f"{source} has no tokenizer (no tokenizer.ggml.model key); "
                          "pass a tokenizer separately (a tokenizer.json or a Hugging Face model directory)")
    if kind != "gpt2":
        raise GptlabError(f"{source} has a {kind!r} tokenizer; only byte-level BPE ('gpt2') GGUF tokenizers "
                          "are supported; pass the model's tokenizer.json instead")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GptlabError(f"{source}: unknown pre-tokenizer tokenizer.ggml.pre={pre!r}; known: "
                          f"{', '.join(sorted(PRE_TOKENIZERS))}; pass the model's tokenizer.json instead")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GptlabError(f"{source}: the vocabulary has duplicate tokens; the file is damaged")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type", []))
    special = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == CONTROL]
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def _token(meta: dict[str, Any], key: str) -> str | None:
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    tokens = meta["tokenizer.ggml.tokens"]
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None


def special_tokens(meta: dict[str, Any]) -> dict[str, str | None]:
    """bos / eos / pad / unk token strings named by the metadata's ``*_token_id`` keys."""
    return {name: _token(meta, key) for name, key in
            (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))}


def load_gguf_tokenizer(path: str | Path) -> HFTokenizer:
    """The tokenizer of a ``.gguf`` file as a gptlab ``HFTokenizer`` (with its chat template).

    Args:
        path: the .gguf file.
    """
    from gptlab.weights.gguf import read_metadata

    meta = read_metadata(path)
    tok = build_tokenizer(meta, str(path))
    sp = special_tokens(meta)
    return HFTokenizer(tok, eos_token=sp["eos"], bos_token=sp["bos"], pad_token=sp["pad"],
                       chat_template=meta.get("tokenizer.chat_template"))


def _resolve_gguf(spec: str) -> HFTokenizer | None:
    """load_tokenizer resolver: a ``.gguf`` file path or ``pkg:PACKAGE/....gguf``."""
    if not spec.endswith(".gguf"):
        return None
    if spec.startswith("pkg:"):
        from gptlab.weights import package_path

        return load_gguf_tokenizer(package_path(spec))
    return load_gguf_tokenizer(spec)


register_resolver(_resolve_gguf, "a .gguf file (or pkg:PACKAGE/FILE.gguf): the tokenizer in its metadata")
