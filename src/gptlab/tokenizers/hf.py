"""Hugging Face ``tokenizer.json`` tokenizers (Llama 3, SmolLM2, Qwen, our own trained BPE).

The ``tokenizers`` library runs the whole pipeline (normalizer, pre-tokenizer,
model, decoder). ``tokenizer_config.json``, when present next to it, names the
BOS/EOS/PAD tokens and holds the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import tokenizers

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_json, atomic_write_text
from gptlab.tokenizers.base import EOT, Tokenizer, check_ids


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` behind gptlab's interface.

    ``special_tokens`` are the tokenizer's added tokens marked special.
    ``encode`` never adds the post-processor's BOS/EOS (see the module
    docstring of :mod:`gptlab.tokenizers.base`).
    """

    kind = "hf"

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str | None = None,
                 bos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None):
        """Wrap ``tokenizer``; the named tokens must be among its vocabulary."""
        self._tok = tokenizer
        self.special_tokens = {t.content: i for i, t in sorted(tokenizer.get_added_tokens_decoder().items())
                               if t.special}
        if eos_token is None and EOT in self.special_tokens:
            eos_token = EOT
        for role, token in (("eos", eos_token), ("bos", bos_token), ("pad", pad_token)):
            if token is None:
                continue
            idx = tokenizer.token_to_id(token)
            if idx is None:
                raise GptlabError(f"{role}_token {token!r} is not in this tokenizer's vocabulary; "
                                  "check tokenizer_config.json")
            self.special_tokens.setdefault(token, idx)
        self.eos_token, self.bos_token, self.pad_token = eos_token, bos_token, pad_token
        self.chat_template = chat_template

    @property
    def add_bos(self) -> bool:
        """Whether the tokenizer's post-processor starts an encoded text with BOS (as transformers would)."""
        bos = self.bos_id
        if bos is None:
            return False
        ids = self._tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == bos

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        """Load ``tokenizer.json`` (a file, or a dir holding it) plus an optional ``tokenizer_config.json``."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise GptlabError(f"{file} not found; give a tokenizer.json file or a directory that holds one")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a plain Exception for malformed JSON
            raise GptlabError(f"{file} is not a valid Hugging Face tokenizer.json ({e})") from None
        config = read_tokenizer_config(file.parent / "tokenizer_config.json")
        return cls(tok, eos_token=config.get("eos_token"), bos_token=config.get("bos_token"),
                   pad_token=config.get("pad_token"), chat_template=config.get("chat_template"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, allowed_special="all") -> list[int]:
        """Token ids of ``text`` (see :meth:`Tokenizer.encode`).

        "all" and "none" run the tokenizer on the whole text, so tokenizers whose
        result depends on position (e.g. a SentencePiece prefix space) match
        Hugging Face exactly; a set splits the text on the allowed specials.
        """
        if not isinstance(text, str):
            raise GptlabError(f"encode() needs a str, got {type(text).__name__}; decode bytes first")
        if allowed_special == "all" or allowed_special == "none":
            return self._encode(text, specials=allowed_special == "all")
        return super().encode(text, allowed_special)

    def _encode(self, text: str, specials: bool) -> list[int]:
        self._tok.encode_special_tokens = not specials
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False

    def _encode_ordinary(self, text: str) -> list[int]:
        return self._encode(text, specials=False)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, special tokens included as their strings."""
        return self._tok.decode(check_ids(ids, self.vocab_size, self.kind), skip_special_tokens=False)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        atomic_write_text(directory / "tokenizer.json", self._tok.to_str())
        config = {k: v for k, v in (("eos_token", self.eos_token), ("bos_token", self.bos_token),
                                    ("pad_token", self.pad_token), ("chat_template", self.chat_template))
                  if v is not None}
        atomic_write_json(directory / "tokenizer_config.json", config)
        return {}

    @classmethod
    def _load_dir(cls, directory: Path, meta: dict[str, Any]) -> "HFTokenizer":
        tok = cls.from_file(directory / "tokenizer.json")
        return cls(tok.backend, eos_token=meta.get("eos_token"), bos_token=meta.get("bos_token"),
                   pad_token=meta.get("pad_token"), chat_template=meta.get("chat_template"))


def read_tokenizer_config(path: Path) -> dict[str, Any]:
    """eos/bos/pad token strings and the chat template from a ``tokenizer_config.json`` (if any)."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise GptlabError(f"{path} is not valid JSON ({e}); fix or remove it") from None
    out: dict[str, Any] = {}
    for key in ("eos_token", "bos_token", "pad_token"):
        value = raw.get(key)
        if isinstance(value, dict):  # the {"content": "<s>", "lstrip": ...} form
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    template = raw.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str):
        out["chat_template"] = template
    return out
