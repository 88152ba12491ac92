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


# ---- the way back: a tokenizer -> tokenizer.* metadata (weights/gguf_export.py writes it) ----
# The pre-tokenizer names written, in preference order; each is one llama.cpp knows.
WRITTEN_PRE = ("gpt-2", "smollm", "llama-bpe", "qwen2")


def _pre_signature(pre) -> str:
    """A pre-tokenizer as comparable JSON (offset trimming does not change the split: dropped)."""
    import json
    import re

    probe = Tokenizer(models.BPE())
    probe.pre_tokenizer = pre
    text = json.dumps(json.loads(probe.to_str())["pre_tokenizer"], sort_keys=True)
    return re.sub(r'"trim_offsets": (true|false), ', "", text)


def pre_tokenizer_name(backend: Tokenizer) -> str:
    """The ``tokenizer.ggml.pre`` name (one llama.cpp knows) of a byte-level BPE's pre-tokenizer.

    Found by comparing it with what each name in :data:`PRE_TOKENIZERS` builds; a
    pre-tokenizer none of them builds is refused (llama.cpp would split text differently).
    """
    if backend.pre_tokenizer is None:
        raise GptlabError("the tokenizer has no pre-tokenizer; llama.cpp's byte-level BPE needs one it knows")
    ours = _pre_signature(backend.pre_tokenizer)
    for name in WRITTEN_PRE:
        if _pre_signature(PRE_TOKENIZERS[name]()) == ours:
            return name
    raise GptlabError("the tokenizer's pre-tokenizer is none that llama.cpp knows (gptlab writes "
                      f"{', '.join(WRITTEN_PRE)}); it cannot be exported to GGUF faithfully")


def _model_state(backend: Tokenizer) -> dict:
    import json

    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise GptlabError(f"a {model.get('type')} tokenizer cannot be written to GGUF (gptlab writes BPE "
                          "tokenizers: byte-level like GPT-2, or SentencePiece BPE like Llama 2)")
    return model


def gguf_tokenizer_metadata(tok: HFTokenizer, vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata of ``tok`` that llama.cpp loads and :func:`build_tokenizer` reads back.

    Args:
        tok: a gptlab HFTokenizer (a trained byte-level BPE, a ``tokenizer.json``, or one
            rebuilt from a GGUF file), or the GPT-2 tokenizer (OpenAI's encoder.json + vocab.bpe).
        vocab_size: rows of the model's embedding; ids the tokenizer does not use are
            written as unused ``[PAD{id}]`` tokens (llama.cpp needs one token per row).
    """
    if tok.kind == "gpt2":  # OpenAI's GPT-2 files (tiktoken): the same byte-level BPE, pre-tokenizer "gpt-2"
        return _gpt2_files_metadata(tok, vocab_size)
    backend = getattr(tok, "backend", None)
    if backend is None:
        raise GptlabError(f"a {tok.kind} tokenizer cannot be written to GGUF; gptlab writes Hugging Face "
                          "BPE tokenizers (a trained BPE, a tokenizer.json or a GGUF's own)")
    model = _model_state(backend)
    n = backend.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise GptlabError(f"the tokenizer has {n} tokens but the model only {vocab_size} embedding rows")
    added = backend.get_added_tokens_decoder()
    tokens, types = [], []
    sentencepiece = bool(model.get("byte_fallback"))
    for i in range(vocab_size):
        t = backend.id_to_token(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(t)
            types.append(_token_type(t, added.get(i), sentencepiece, model.get("unk_token")))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    if sentencepiece:
        meta.update(_sentencepiece_metadata(backend, tokens, merges))
    else:
        meta.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre_tokenizer_name(backend),
                     "tokenizer.ggml.merges": merges})
    for key, value in (("bos", tok.bos_id), ("eos", tok.eos_id), ("padding", tok.pad_id)):
        if value is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(value)
    meta["tokenizer.ggml.add_bos_token"] = bool(tok.add_bos)
    meta["tokenizer.ggml.add_eos_token"] = False
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def _gpt2_files_metadata(tok, vocab_size: int) -> dict[str, Any]:
    tokens, merges = tok.vocab_and_merges()
    if len(tokens) > vocab_size:
        raise GptlabError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embedding rows")
    specials = set(tok.special_tokens)
    types = [CONTROL if t in specials else NORMAL for t in tokens] + [UNUSED] * (vocab_size - len(tokens))
    tokens = tokens + [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": tok.eos_id, "tokenizer.ggml.eos_token_id": tok.eos_id,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False}


def _token_type(token: str, added, sentencepiece: bool, unk: str | None) -> int:
    if sentencepiece and token == unk:  # an added special token too (build_tokenizer makes it one)
        return UNKNOWN
    if added is not None:
        return CONTROL if added.special else USER_DEFINED
    if sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return BYTE
    return NORMAL


def _sentencepiece_metadata(backend: Tokenizer, tokens: list[str], merges: list[str]) -> dict[str, Any]:
    """llama (SentencePiece BPE): scores from the merge ranks (the token made by merge r scores -r-1).

    :func:`merges_from_scores` turns these scores back into the same merge order.
    """
    import json

    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), r)
    scores = [-float(rank[t]) - 1.0 if t in rank else 0.0 for t in tokens]
    normalizer = json.dumps(json.loads(backend.to_str()).get("normalizer"))
    meta: dict[str, Any] = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": scores,
                            "tokenizer.ggml.add_space_prefix": '"Prepend"' in normalizer}
    unk = backend.token_to_id(json.loads(backend.to_str())["model"].get("unk_token") or "<unk>")
    if unk is not None:
        meta["tokenizer.ggml.unknown_token_id"] = unk
    return meta
