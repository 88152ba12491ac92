"""Move a model between the course's ``GPTModel`` and gptlab's own ``GPT2``.

The two are the same network with different names and one layout change:
gptlab fuses the three q/k/v projections into one ``attn.qkv`` Linear whose
output rows are ordered q, then k, then v. The map below is the whole story;
every key is checked (missing, unexpected, shape) before anything is copied.

    course (GPTModel)                         gptlab (GPT2)
    tok_emb.weight                            tok_emb.weight
    pos_emb.weight                            pos_emb.weight
    trf_blocks.{i}.att.W_query|W_key|W_value  blocks.{i}.attn.qkv      (row-concatenated q, k, v)
    trf_blocks.{i}.att.out_proj               blocks.{i}.attn.proj
    trf_blocks.{i}.ff.layers.0                blocks.{i}.mlp.fc
    trf_blocks.{i}.ff.layers.2                blocks.{i}.mlp.proj
    trf_blocks.{i}.norm1|norm2.scale|shift    blocks.{i}.norm1|norm2.weight|bias
    final_norm.scale|shift                    final_norm.weight|bias
    out_head.weight                           out_head.weight           (untied)
"""

from __future__ import annotations

import torch

from gptlab.book.ch04 import GPTModel
from gptlab.errors import GptlabError
from gptlab.models.gpt2 import GPT2Config

# course key -> gptlab key, for everything except the fused q/k/v ({i} = block index).
_TOP = {
    "tok_emb.weight": "tok_emb.weight",
    "pos_emb.weight": "pos_emb.weight",
    "final_norm.scale": "final_norm.weight",
    "final_norm.shift": "final_norm.bias",
    "out_head.weight": "out_head.weight",
}
_BLOCK = {
    "att.out_proj.weight": "attn.proj.weight",
    "att.out_proj.bias": "attn.proj.bias",
    "ff.layers.0.weight": "mlp.fc.weight",
    "ff.layers.0.bias": "mlp.fc.bias",
    "ff.layers.2.weight": "mlp.proj.weight",
    "ff.layers.2.bias": "mlp.proj.bias",
    "norm1.scale": "norm1.weight",
    "norm1.shift": "norm1.bias",
    "norm2.scale": "norm2.weight",
    "norm2.shift": "norm2.bias",
}
_QKV = ("att.W_query", "att.W_key", "att.W_value")  # -> attn.qkv, in this row order


def config_to_gptlab(cfg: dict) -> GPT2Config:
    """The :class:`GPT2Config` of a course config dict (untied head, as the course builds it)."""
    return GPT2Config(vocab_size=cfg["vocab_size"], context_length=cfg["context_length"], emb_dim=cfg["emb_dim"],
                      n_layers=cfg["n_layers"], n_heads=cfg["n_heads"], drop_rate=float(cfg["drop_rate"]),
                      qkv_bias=bool(cfg["qkv_bias"]), tie_embeddings=False, name="book")


def config_from_gptlab(cfg: GPT2Config) -> dict:
    """The course's config dict of a gptlab GPT-2 config."""
    return {"vocab_size": cfg.vocab_size, "context_length": cfg.context_length, "emb_dim": cfg.emb_dim,
            "n_heads": cfg.n_heads, "n_layers": cfg.n_layers, "drop_rate": cfg.drop_rate, "qkv_bias": cfg.qkv_bias}


def _book_config_of(model: GPTModel) -> dict:
    blk = model.trf_blocks[0]
    return {
        "vocab_size": model.tok_emb.num_embeddings,
        "context_length": model.pos_emb.num_embeddings,
        "emb_dim": model.tok_emb.embedding_dim,
        "n_heads": blk.att.num_heads,
        "n_layers": len(model.trf_blocks),
        "drop_rate": model.drop_emb.p,
        "qkv_bias": blk.att.W_query.bias is not None,
    }


def book_state_to_gptlab(state: dict[str, torch.Tensor], n_layers: int, qkv_bias: bool) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v in) a course ``GPTModel`` state dict to gptlab ``GPT2`` keys."""
    out, used = {}, set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise GptlabError(f"course state dict lacks {key!r}; was it saved from a GPTModel with {n_layers} layers?")
        used.add(key)
        return state[key]

    for src, dst in _TOP.items():
        out[dst] = take(src)
    for i in range(n_layers):
        for src, dst in _BLOCK.items():
            out[f"blocks.{i}.{dst}"] = take(f"trf_blocks.{i}.{src}")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([take(f"trf_blocks.{i}.{p}.weight") for p in _QKV], dim=0)
        if qkv_bias:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([take(f"trf_blocks.{i}.{p}.bias") for p in _QKV], dim=0)
        used.add(f"trf_blocks.{i}.att.mask")  # a constant buffer, rebuilt by the model
    unexpected = sorted(k for k in state if k not in used)
    if unexpected:
        raise GptlabError(f"course state dict has keys gptlab's GPT-2 has no place for: {unexpected[:5]}"
                          " (LoRA layers or a replaced head? merge or convert before changing the model)")
    return out


def gptlab_state_to_book(state: dict[str, torch.Tensor], n_layers: int, qkv_bias: bool) -> dict[str, torch.Tensor]:
    """Rename (and split q/k/v in) a gptlab ``GPT2`` state dict to course ``GPTModel`` keys."""
    out = {}
    for src, dst in _TOP.items():
        out[src] = state[dst]
    for i in range(n_layers):
        for src, dst in _BLOCK.items():
            out[f"trf_blocks.{i}.{src}"] = state[f"blocks.{i}.{dst}"]
        for name in ("weight", "bias") if qkv_bias else ("weight",):
            parts = state[f"blocks.{i}.attn.qkv.{name}"].chunk(3, dim=0)  # q, k, v
            for p, t in zip(_QKV, parts):
                out[f"trf_blocks.{i}.{p}.{name}"] = t
    return out


def _load(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = model.state_dict()
    own = {k: v for k, v in own.items() if not k.endswith("att.mask")}
    missing = sorted(set(own) - set(state))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or shapes:
        raise GptlabError(f"cannot convert to {what}: missing {missing[:5]} wrong shapes {shapes[:5]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])


def book_to_gptlab(book_model: GPTModel):
    """A ``gptlab.models.gpt2.GPT2`` with the same weights (and logits) as a course ``GPTModel``.

    The result plugs into the full toolkit: ``gptlab.generate``, the training loop,
    ``gptlab.weights.native.save_model_dir`` (then every ``gptlab`` command).
    """
    from gptlab.models.gpt2 import GPT2

    if not isinstance(book_model, GPTModel):
        raise GptlabError(f"book_to_gptlab needs a gptlab.book.GPTModel; got {type(book_model).__name__}")
    if not isinstance(book_model.out_head, torch.nn.Linear) or \
            book_model.out_head.out_features != book_model.tok_emb.num_embeddings:
        raise GptlabError("this GPTModel's out_head is not a vocab-sized Linear (a classifier head?); "
                          "convert the language model first, or use gptlab.finetune for classifiers")
    cfg = _book_config_of(book_model)
    ref = book_model.tok_emb.weight
    with torch.device("meta"):
        gpt2 = GPT2(config_to_gptlab(cfg))
    gpt2 = gpt2.to_empty(device=ref.device).to(ref.dtype)
    state = book_state_to_gptlab(book_model.state_dict(), cfg["n_layers"], cfg["qkv_bias"])
    _load(gpt2, state, "gptlab GPT2")
    gpt2.train(book_model.training)
    return gpt2


def gptlab_to_book(gpt2) -> GPTModel:
    """A course ``GPTModel`` with the same weights (and logits) as a gptlab GPT-2 model.

    Needs an untied output head (``GPT2Config(tie_embeddings=False)``); a tied
    model is converted by copying the shared embedding into ``out_head``.
    """
    from gptlab.models.gpt2 import GPT2

    if not isinstance(gpt2, GPT2):
        raise GptlabError(f"gptlab_to_book needs a gptlab GPT-2 model (gptlab.models.gpt2.GPT2); got {type(gpt2).__name__}")
    c = gpt2.cfg
    if c.hidden_dim != 4 * c.emb_dim or c.head_dim * c.n_heads != c.emb_dim or c.norm_eps != 1e-5:
        raise GptlabError("the course's GPTModel has a 4x MLP, head_dim = emb_dim / n_heads and LayerNorm eps 1e-5; "
                          f"this config has hidden_dim={c.hidden_dim}, head_dim={c.head_dim}, norm_eps={c.norm_eps}")
    cfg = config_from_gptlab(c)
    ref = gpt2.tok_emb.weight
    with torch.device("meta"):
        book = GPTModel(cfg)
    book = book.to_empty(device=ref.device).to(ref.dtype)
    for blk in book.trf_blocks:  # to_empty leaves buffers uninitialised: rebuild the causal mask
        n = cfg["context_length"]
        blk.att.mask = torch.triu(torch.ones(n, n, device=ref.device), diagonal=1)
    state = dict(gpt2.state_dict())
    if c.tie_embeddings:
        state["out_head.weight"] = state["tok_emb.weight"]
    _load(book, gptlab_state_to_book(state, c.n_layers, c.qkv_bias), "course GPTModel")
    book.train(gpt2.training)
    return book
