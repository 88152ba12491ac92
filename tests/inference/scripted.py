"""A stand-in language model for inference tests: it says a fixed script, whatever the prompt."""

import torch
import torch.nn as nn

from gptlab.models.attention import KVCache


class ScriptedModel(nn.Module):
    """A stand-in LM that answers every prompt with the same token script (then repeats its last token)."""

    def __init__(self, vocab: int, script: list[int], context_length: int = 512):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.dummy = nn.Parameter(torch.zeros(1))
        self.cfg = type("Cfg", (), {"context_length": context_length})()
        self.prompt_len = 0

    def forward(self, ids, cache=None):
        assert cache is not None, "chat decodes with the KV cache"
        if cache.pos == 0:  # prefill: a new prompt
            self.prompt_len = ids.shape[1]
        k = cache.pos + ids.shape[1] - self.prompt_len  # tokens generated before this step's output
        cache.advance(ids.shape[1])
        nxt = self.script[min(k, len(self.script) - 1)]
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        logits[:, -1, nxt] = 10.0
        return logits  # (B, T, V)

    def new_cache(self, batch, max_len=None, **_):
        return KVCache(0, batch, 1, max_len or self.cfg.context_length, 1, dtype=torch.float32, device="cpu")
