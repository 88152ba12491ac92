"""A tokenizer rebuilt from a GGUF file's metadata.

A GGUF file carries no ``tokenizer.json``; llama.cpp stores the tokenizer as
metadata instead:

    tokenizer.ggml.model          "gpt2" = byte-level BPE (Llama 3, Qwen2, SmolLM2)
                                  "llama" = SentencePiece BPE (Llama 2, Mistral 7B, Gemma)
    tokenizer.ggml.pre            gpt2 only: the pre-tokenizer (how text is split before BPE)
    tokenizer.ggml.tokens         the vocabulary, index = token id
    tokenizer.ggml.merges         gpt2 only: "a b" merge rules, highest priority first
    tokenizer.ggml.scores         llama only: one score per token; higher merges first
    tokenizer.ggml.token_type     1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.{bos,eos,padding,unknown}_token_id
    tokenizer.ggml.add_bos_token / add_eos_token   llama: does a prompt start with BOS (default yes)
    tokenizer.ggml.add_space_prefix                llama: prepend "▁" to the text (default yes)
    tokenizer.chat_template       the Jinja chat template, if the model has one

From these we assemble a Hugging Face ``tokenizers.Tokenizer``.

- gpt2: a BPE model over the vocabulary and merges, the pre-tokenizer that
  ``tokenizer.ggml.pre`` names, and a ByteLevel decoder.
- llama: SentencePiece BPE as llama.cpp runs it. The text's spaces become "▁"
  (and one "▁" is prepended); then, starting from single characters, the
  adjacent pair whose concatenation is the highest-scoring vocabulary token is
  merged, leftmost first, until no pair is in the vocabulary; characters that
  are not tokens become their UTF-8 bytes ``<0xXX>``. A BPE model does exactly
  this once every way of cutting a token into two tokens is a merge ranked by
  the whole token's score (:func:`merges_from_scores`). Decoding turns "▁" back
  into spaces, byte tokens back into text, and drops the prepended space.

In both, control (and unknown) tokens become special added tokens, so text such
as ``<|im_end|>`` or ``<s>`` maps to its one id instead of being split;
user-defined tokens are added as plain tokens, matched whole in any text. As in
llama.cpp, the text between two such tokens is encoded on its own, so with a
space prefix each stretch after a special token starts with "▁".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

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

# llama.cpp token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁", SentencePiece's visible space


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
    if kind not in BUILDERS:
        raise GptlabError(f"{source} has a {kind!r} tokenizer (tokenizer.ggml.model); gptlab builds "
                          f"{' and '.join(repr(k) for k in BUILDERS)} GGUF tokenizers; "
                          "pass the model's tokenizer.json instead")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise GptlabError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for "
                          f"{len(tokens)} tokens; the file is damaged")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GptlabError(f"{source}: the vocabulary has duplicate tokens; the file is damaged")
    tok = BUILDERS[kind](meta, tokens, types, vocab, source)
    special = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], types: list[int], vocab: dict[str, int],
                    source: str) -> Tokenizer:
    """gpt2: BPE over the file's merges, the named pre-tokenizer, a byte-level decoder."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GptlabError(f"{source}: unknown pre-tokenizer tokenizer.ggml.pre={pre!r}; known: "
                          f"{', '.join(sorted(PRE_TOKENIZERS))}; pass the model's tokenizer.json instead")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    return tok


def merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging, best first.

    SentencePiece merges the adjacent pair whose concatenation is the vocabulary
    token with the highest score. So every cut of a token ``t`` into two tokens
    ``(a, b)`` is a merge whose rank is ``t``'s score (ties: lower id of ``t``,
    then the cut further left). Only normal, user-defined and unused tokens take
    part: SentencePiece never builds control or byte tokens from text.

    Args:
        tokens: the vocabulary, index = id.
        scores: one score per token.
        types: one llama.cpp token type per token.
    """
    pieces = {t for t, ty in zip(tokens, types) if ty in (NORMAL, USER_DEFINED, UNUSED)}
    ranked = []
    for i, (t, score) in enumerate(zip(tokens, scores)):
        if t not in pieces or len(t) < 2:
            continue
        for cut in range(1, len(t)):
            if t[:cut] in pieces and t[cut:] in pieces:
                ranked.append((-float(score), i, cut, t[:cut], t[cut:]))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], types: list[int], vocab: dict[str, int],
                       source: str) -> Tokenizer:
    """llama: SentencePiece BPE with byte fallback, as llama.cpp tokenizes it (module docstring)."""
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        got = "no tokenizer.ggml.scores" if scores is None else f"{len(scores)} scores for {len(tokens)} tokens"
        raise GptlabError(f"{source}: a SentencePiece ('llama') tokenizer needs one score per token, found "
                          f"{got}; the file is damaged")
    unk = _token(meta, "unknown")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges_from_scores(tokens, scores, types),
                               unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend(SPACE)] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    ends = [_added_end(meta, name, default, source) for name, default in (("bos", True), ("eos", False))]
    if any(ends):
        # llama.cpp's llama_tokenize(add_special=True) puts these around the text; so does
        # this backend's encode(). gptlab's Tokenizer.encode never adds them (see base.py).
        bos, eos = ends
        tok.post_processor = processors.TemplateProcessing(
            single=[t for t in (bos, "$A", eos) if t],
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(t for t in ends if t)])
    return tok


def _added_end(meta: dict[str, Any], name: str, default: bool, source: str) -> str | None:
    """The bos/eos token llama.cpp adds around a prompt (``tokenizer.ggml.add_{name}_token``), or None."""
    flag = meta.get(f"tokenizer.ggml.add_{name}_token")
    token = _token(meta, name)
    if flag and token is None:
        raise GptlabError(f"{source}: tokenizer.ggml.add_{name}_token is set but tokenizer.ggml.{name}_token_id "
                          "names no token of the vocabulary; the file is damaged")
    return token if (default if flag is None else bool(flag)) else None


BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


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
    """load_tokenizer resolver: a ``.gguf`` file path (``pkg:PACKAGE/....gguf`` is resolved to one first)."""
    if not spec.endswith(".gguf") or spec.startswith("pkg:"):
        return None
    return load_gguf_tokenizer(spec)


register_resolver(_resolve_gguf, "a .gguf file (or pkg:PACKAGE/FILE.gguf): the tokenizer in its metadata")
