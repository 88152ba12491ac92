"""``load_tokenizer(spec)``: one entry point that turns a spec into a :class:`Tokenizer`.

A spec is tried against :data:`RESOLVERS` in order; the first resolver that
recognises it returns the tokenizer. Each resolver returns ``None`` for specs
it does not handle and raises :class:`GptlabError` for specs it handles but
cannot load.

A model reference that names its files only indirectly (``pkg:PACKAGE/PATH``,
a training run directory, a Hub repo id) is turned into a local path by
:func:`gptlab.refs.resolve` -- the same function ``load_model`` uses -- and the
resolvers are tried again on that path. So every command finds a model's
tokenizer the way it finds the model.

Extension point: other formats (e.g. ``.gguf`` files) add their own resolver
with :func:`register_resolver` (which also adds a line to :data:`ACCEPTED`, so
the error message stays complete) in a module listed in :data:`EXTENSION_MODULES`;
those modules are imported on the first call, so this file need not import them.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Callable

from gptlab.errors import GptlabError
from gptlab.refs import needs_resolving, resolve
from gptlab.tokenizers.base import META_FILE, Tokenizer
from gptlab.tokenizers.char import CharTokenizer
from gptlab.tokenizers.gpt2 import GPT2Tokenizer
from gptlab.tokenizers.hf import HFTokenizer
from gptlab.tokenizers.teaching import RegexWordTokenizer, SimpleBPE

Resolver = Callable[[str], "Tokenizer | None"]

# kind (as written in gptlab_tokenizer.json) -> class that reloads a saved dir
KINDS: dict[str, type[Tokenizer]] = {
    "gpt2": GPT2Tokenizer,
    "hf": HFTokenizer,
    "char": CharTokenizer,
    "word": RegexWordTokenizer,
    "simple-bpe": SimpleBPE,
}


def load_saved(directory: str | Path) -> Tokenizer:
    """Reload a tokenizer written by ``Tokenizer.save`` (a dir holding ``gptlab_tokenizer.json``)."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        kind = meta["kind"]
    except FileNotFoundError:
        raise GptlabError(f"{meta_path} not found; {directory} is not a saved gptlab tokenizer") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise GptlabError(f"{meta_path} is unreadable ({e}); save the tokenizer again") from None
    if kind not in KINDS:
        raise GptlabError(f"{meta_path} has kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    try:
        tok = KINDS[kind]._load_dir(directory, meta)
    except KeyError as e:
        raise GptlabError(f"{meta_path} lacks the field {e} a {kind!r} tokenizer needs; save it again") from None
    tok.chat_template = meta.get("chat_template", tok.chat_template)
    return tok


# ---- the resolvers ---------------------------------------------------------------------------

def _saved_dir(spec: str) -> Tokenizer | None:
    return load_saved(spec) if (Path(spec) / META_FILE).is_file() else None


def _gpt2_dir(spec: str) -> Tokenizer | None:
    p = Path(spec)
    return GPT2Tokenizer.from_dir(p) if (p / "encoder.json").is_file() and (p / "vocab.bpe").is_file() else None


def _hf_json(spec: str) -> Tokenizer | None:
    p = Path(spec)
    if p.is_file() and p.suffix == ".json":
        return HFTokenizer.from_file(p)
    if (p / "tokenizer.json").is_file():
        return HFTokenizer.from_file(p)
    return None


def _named(spec: str) -> Tokenizer | None:
    if spec.lower() == "gpt2":
        return GPT2Tokenizer.from_tiktoken_cache()
    if spec.lower() == "char":
        raise GptlabError("a 'char' tokenizer is built from text, it cannot be loaded by name: "
                          "use CharTokenizer.from_text(text), or pass a directory where one was saved")
    return None


RESOLVERS: list[Resolver] = [_saved_dir, _gpt2_dir, _hf_json, _named]
"""Tried in order by :func:`load_tokenizer`. EXTENSION POINT: add with :func:`register_resolver`."""

ACCEPTED: list[str] = [
    "'gpt2' (OpenAI's files via tiktoken's cache)",
    "a directory saved by gptlab (holds gptlab_tokenizer.json)",
    "a directory holding encoder.json + vocab.bpe",
    "a tokenizer.json file, or a directory holding one",
    "a model reference: training run dir, Hub repo id (owner/name) or pkg:PACKAGE/PATH",
]
"""Human-readable list of accepted specs, shown when nothing matches."""


EXTENSION_MODULES: list[str] = ["gptlab.tokenizers.gguf_tokenizer"]
"""Modules imported on the first :func:`load_tokenizer` call; each registers its resolvers on import.
EXTENSION POINT: append a module name here (or import it yourself) to add specs."""


def _import_extensions() -> None:
    while EXTENSION_MODULES:
        name = EXTENSION_MODULES.pop(0)
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


def register_resolver(resolver: Resolver, accepts: str, first: bool = True) -> None:
    """Add a resolver (``spec -> Tokenizer | None``) and a description of what it accepts.

    ``first=True`` puts it before the built-in resolvers (so it can claim specs
    such as ``*.gguf`` or ``org/model`` before the generic ones look at them).
    """
    if resolver in RESOLVERS:
        return
    RESOLVERS.insert(0, resolver) if first else RESOLVERS.append(resolver)
    ACCEPTED.append(accepts)


def _first_match(text: str) -> Tokenizer | None:
    for resolver in RESOLVERS:
        tok = resolver(text)
        if tok is not None:
            return tok
    return None


def load_tokenizer(spec: "str | Path | Tokenizer") -> Tokenizer:
    """Load a tokenizer from a spec (see :data:`ACCEPTED`); a Tokenizer is returned as is."""
    if isinstance(spec, Tokenizer):
        return spec
    if not isinstance(spec, (str, Path)) or not str(spec):
        raise GptlabError(f"tokenizer spec must be a non-empty string or path, got {spec!r}")
    text = str(spec)
    _import_extensions()
    tok = _first_match(text)
    if tok is None and needs_resolving(text):  # pkg:, run dir, Hub id: the path load_model would use
        tok = _first_match(str(resolve(text)))
    if tok is not None:
        return tok
    where = "the path does not exist" if not Path(text).exists() else "nothing there looks like a tokenizer"
    raise GptlabError(f"cannot load tokenizer {text!r} ({where}); accepted: " + "; ".join(ACCEPTED))
