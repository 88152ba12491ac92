"""A stand-in language model for inference tests: it says a fixed script, whatever the prompt."""

import torch
import torch.nn as nn

from gptlab.models.attention import SlotCache


class _Cfg:
    def __init__(self, vocab: int, context_length: int):
        self.vocab_size, self.context_length = vocab, context_length

    def attended_tokens(self, context=None):
        return self.context_length if context is None else context


class ScriptedModel(nn.Module):
    """A stand-in LM that answers every prompt with the same token script (then repeats its last token).

    It speaks the engine's model interface (``features`` with a slot-cache view, ``get_head``,
    ``new_slot_cache``): a call of several tokens, or one at position 0, is a prompt; each
    one-token call after it is the next step of the script.
    """

    def __init__(self, vocab: int, script: list[int], context_length: int = 512):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.dummy = nn.Parameter(torch.zeros(1))
        self.cfg = _Cfg(vocab, context_length)
        self.prompt_end: dict[int, int] = {}  # slot -> position after its prompt
        self.head = _ScriptHead(self)

    def features(self, ids, cache):
        assert cache is not None, "the engine decodes with the slot cache"
        out = torch.zeros(ids.shape[0], ids.shape[1], 1)
        for row, (slot, pos) in enumerate(zip(cache.slots.tolist(), cache.pos.tolist())):
            if len(pos) > 1 or pos[0] == 0:  # a prompt (or its rest after a reused prefix)
                self.prompt_end[slot] = pos[-1] + 1
            out[row, -1, 0] = pos[-1] + 1 - self.prompt_end[slot]  # tokens generated before this output
        return out

    def get_head(self):
        return self.head

    def new_slot_cache(self, max_batch, max_len=None, **_):
        return SlotCache(1, max_batch, 1, max_len or self.cfg.context_length, 1, dtype=torch.float32, device="cpu")


class _ScriptHead(nn.Module):
    def __init__(self, owner):
        super().__init__()
        self.owner = [owner]

    def forward(self, h):
        script, vocab = self.owner[0].script, self.owner[0].vocab
        k = h[..., 0].long()  # (...,) the script index at each position
        logits = torch.zeros(*h.shape[:-1], vocab)
        nxt = torch.tensor(script)[k.clamp(max=len(script) - 1)]
        logits.scatter_(-1, nxt.unsqueeze(-1), 10.0)
        return logits
