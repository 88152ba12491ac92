"""Token ids -> text, one token at a time: the one incremental detokenizer.

Two things make "decode each new token and print it" wrong:

- byte-level BPE splits a multi-byte UTF-8 character over several tokens; a
  token alone decodes to a replacement character (U+FFFD);
- SentencePiece decoders strip the leading space of a text, so "▁Paris"
  decoded alone is "Paris", not " Paris".

:class:`Detokenizer` therefore decodes a short window of recent ids (starting
with the prompt's last few, ``context_ids``) and emits only the text the newest
tokens added to it, holding a piece back while it ends in U+FFFD (the rest of
the character is still to come). This is the incremental scheme of vLLM's
``detokenize_incrementally``: the window keeps decoding O(1) per token.
"""

from __future__ import annotations

import sys

CONTEXT = 8  # prompt ids decoded ahead of the new ones (enough for the leading-space rule)
_INCOMPLETE = "\ufffd"


class Detokenizer:
    """Turn a stream of token ids into text pieces that join into the decoded text.

    Args:
        tokenizer: a gptlab tokenizer (``decode(ids) -> str``).
        context_ids: the ids before the first pushed one (the prompt); only the last few are used.

    ``push(id)`` returns the new complete text (possibly ""), ``flush()`` what
    is still held back; ``text`` is everything emitted so far.
    """

    def __init__(self, tokenizer, context_ids: list[int] | None = None):
        self.tok = tokenizer
        self.ids: list[int] = list(context_ids or [])[-CONTEXT:]
        self.prefix = 0  # self.ids[prefix:read] is text already emitted, decoded again for its context
        self.read = len(self.ids)
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one token; the text it completes ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        piece = self._pending()
        if piece.endswith(_INCOMPLETE):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        self.text += piece
        return piece

    def flush(self) -> str:
        """The text still held back (an incomplete character shows as U+FFFD); the stream is then at its end."""
        piece = self._pending()
        self.prefix, self.read = self.read, len(self.ids)
        self.text += piece
        return piece

    def _pending(self) -> str:
        """Text of ids[read:] as it reads after ids[prefix:read]."""
        if self.read == len(self.ids):
            return ""
        if self.prefix == self.read:  # no context: nothing to strip
            return self.tok.decode(self.ids[self.read:])
        base = self.tok.decode(self.ids[self.prefix:self.read])
        full = self.tok.decode(self.ids[self.prefix:])
        return full[len(base):] if full.startswith(base) else self.tok.decode(self.ids[self.read:])


def continuation_text(tok, context_ids: list[int], new_ids: list[int]) -> str:
    """Text of ``new_ids`` as it reads after ``context_ids`` (keeps a SentencePiece leading space)."""
    d = Detokenizer(tok, context_ids)
    return "".join(d.push(t) for t in new_ids) + d.flush()


class TextStreamer:
    """Print a single sequence's tokens as they come (the ``stream=`` callback of ``generate``, B == 1).

    A :class:`Detokenizer` writing to ``file`` (default stdout); ids in
    ``stop_ids`` end the stream; ``finish()`` writes what is left and a newline.
    """

    def __init__(self, tokenizer, file=None, stop_ids: list[int] | None = None,
                 context_ids: list[int] | None = None):
        self.file = file or sys.stdout
        self.detok = Detokenizer(tokenizer, context_ids)
        self.stop_ids = set(stop_ids or [])
        self.stopped = False

    def __call__(self, nxt) -> None:
        t = int(nxt[0])
        if self.stopped or t in self.stop_ids:
            self.stopped = True
            return
        self.write(self.detok.push(t))

    def write(self, piece: str) -> None:
        if piece:
            self.file.write(piece)
            self.file.flush()

    def finish(self) -> None:
        self.write(self.detok.flush() + "\n")
