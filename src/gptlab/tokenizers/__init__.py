"""Tokenizers behind one interface, :class:`Tokenizer`.

    from gptlab.tokenizers import load_tokenizer, train_bpe, CharTokenizer
    tok = load_tokenizer("path/to/gpt2")     # encoder.json + vocab.bpe
    tok = load_tokenizer("gpt2")             # the same via tiktoken's cache
    tok = load_tokenizer("tokenizer.json")   # any Hugging Face tokenizer
    tok = train_bpe(text, vocab_size=4096)   # your own byte-level BPE
    tok = CharTokenizer.from_text(text)      # one id per character

See docs/tokenizers.md.
"""

from gptlab.tokenizers.base import EOT, Tokenizer
from gptlab.tokenizers.bpe import train_bpe
from gptlab.tokenizers.char import CharTokenizer
from gptlab.tokenizers.gpt2 import GPT2Tokenizer
from gptlab.tokenizers.hf import HFTokenizer
from gptlab.tokenizers.loading import ACCEPTED, KINDS, RESOLVERS, load_saved, load_tokenizer, register_resolver
from gptlab.tokenizers.teaching import RegexWordTokenizer, SimpleBPE

__all__ = [
    "ACCEPTED", "CharTokenizer", "EOT", "GPT2Tokenizer", "HFTokenizer", "KINDS", "RESOLVERS",
    "RegexWordTokenizer", "SimpleBPE", "Tokenizer", "load_saved", "load_tokenizer", "register_resolver",
    "train_bpe",
]
from gptlab.tokenizers import gguf_tokenizer as _gguf_tokenizer  # noqa: E402,F401  registers the .gguf resolver
