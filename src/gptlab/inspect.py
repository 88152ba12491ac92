"""Look inside a model: module tree, config, named parameters, counts, memory, FLOPs.

The course inspects models by printing them, listing ``named_parameters()``,
reading ``state_dict()`` entries and editing one by hand; these functions do
the same for any gptlab model, and ``gptlab inspect`` prints it all.
"""

from __future__ import annotations

import json

import torch
import torch.nn as nn

from gptlab.errors import GptlabError


def parameter_table(model: nn.Module) -> list[tuple[str, tuple[int, ...], int, str]]:
    """(name, shape, numel, dtype) of each parameter; tied weights listed once (first name)."""
    return [(n, tuple(p.shape), p.numel(), str(p.dtype).replace("torch.", ""))
            for n, p in model.named_parameters()]


def summarize(model: nn.Module) -> dict:
    """Counts, memory, KV cache and FLOPs of a model (works on the meta device too).

    ``kv_cache_bytes`` is a cache of every token at the full context, batch 1
    (a plain ``KVCache``, e.g. ``model.generate`` without the engine);
    ``kv_cache_bytes_windowed``, when it differs, is what an engine that keeps
    only the sliding window holds: gptlab's engine (a ring cache) and llama.cpp,
    the figure ``gptlab fit`` plans.
    """
    cfg = model.cfg
    counts = cfg.param_counts()
    actual = sum(p.numel() for p in model.parameters())  # tied parameters counted once
    T = cfg.context_length
    kv = {"context": T, "bf16": cfg.kv_cache_bytes(T, 1, 2), "fp32": cfg.kv_cache_bytes(T, 1, 4)}
    out = {
        "config": cfg.to_dict(),
        "parameters": {**counts, "actual": actual},
        "memory_bytes": {"fp32": actual * 4, "bf16": actual * 2, "fp16": actual * 2},
        "kv_cache_bytes": kv,
        "flops_per_token_forward": cfg.flops_per_token(),
        "flops_per_token_training": 3 * cfg.flops_per_token(),
    }
    if cfg.cached_tokens(T, windowed=True) != T:
        out["kv_cache_bytes_windowed"] = {"context": T, "bf16": cfg.kv_cache_bytes(T, 1, 2, windowed=True),
                                          "fp32": cfg.kv_cache_bytes(T, 1, 4, windowed=True)}
    return out


def get_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor called ``name`` in ``model.state_dict()`` (a view: edits change the model)."""
    sd = model.state_dict()
    if name not in sd:
        close = [k for k in sd if name.split(".")[-1] in k][:5]
        raise GptlabError(f"no weight named {name!r}; similar names: {close or list(sd)[:5]}")
    return sd[name]


@torch.no_grad()
def set_weight(model: nn.Module, name: str, value, index=None) -> None:
    """Overwrite a weight (or ``weight[index]``) in place, shape-checked.

    Example: ``set_weight(model, "blocks.0.norm1.weight", 0.1, index=0)`` is the
    course's ``state_dict["h.0.ln_1.weight"][0] = 0.1``.
    """
    t = get_weight(model, name)
    target = t if index is None else t[index]
    value = torch.as_tensor(value, dtype=t.dtype)
    if value.dim() > 0 and value.shape != target.shape:
        raise GptlabError(f"{name}{'' if index is None else [index]} has shape {tuple(target.shape)}, "
                          f"the new value {tuple(value.shape)}: give a value of the same shape")
    target.copy_(value)


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _load_for_inspect(ref: str) -> nn.Module:
    from gptlab.models import empty_model, get_preset, list_presets

    if ref in list_presets():
        return empty_model(get_preset(ref))  # shapes only: a 24B preset costs no memory
    from gptlab.weights import load_model

    return load_model(ref)


def inspect_command(model: str, params: bool = True, tree: bool = True, as_json: bool = False,
                    weight: str | None = None) -> int:
    """Print a model's module tree, config, named parameters, counts, memory and FLOPs per token.

    Args:
        model: a preset name (e.g. gpt2-124m, llama-3-8b; built on the meta device, no
            memory used), a gptlab run or model directory, a Hugging Face directory,
            a .gguf file or pkg:PACKAGE/PATH.
        params: list every named parameter with its shape.
        tree: print the module tree.
        as_json: print the summary as JSON instead.
        weight: print the values of this one weight (e.g. blocks.0.norm1.weight).
    """
    net = _load_for_inspect(model)
    s = summarize(net)
    if as_json:
        s["parameter_table"] = [{"name": n, "shape": list(sh), "numel": k, "dtype": d}
                                for n, sh, k, d in parameter_table(net)]
        print(json.dumps(s, indent=2))
        return 0
    if weight is not None:
        t = get_weight(net, weight)
        if t.is_meta:
            raise GptlabError(f"{model} is a preset (shapes only); load a checkpoint to see values")
        print(f"{weight} {tuple(t.shape)} {t.dtype}\n{t}")
        return 0
    if tree:
        print(net)
        print()
    print("config:")
    for k, v in s["config"].items():
        print(f"  {k}: {v}")
    if params:
        print("\nparameters:")
        width = max(len(n) for n, *_ in parameter_table(net))
        for n, sh, k, d in parameter_table(net):
            print(f"  {n.ljust(width)}  {str(list(sh)):>16}  {k:>13,}  {d}")
    c = s["parameters"]
    print(f"\ntotal parameters:     {c['total']:,} ({_human(c['total'])})")
    if c.get("experts"):  # a mixture of experts: what one token runs
        print(f"active per token:     {c['active']:,} ({_human(c['active'])}; {c['experts_active']} of "
              f"{c['experts']} experts{' + a shared one' if c.get('experts_shared') else ''})")
    print(f"non-embedding:        {c['non_embedding']:,}")
    print(f"embedding:            {c['embedding']:,}")
    print(f"tied (counted once):  {c['tied']:,}")
    m = s["memory_bytes"]
    print(f"memory: fp32 {m['fp32'] / 2**30:.2f} GiB, bf16/fp16 {m['bf16'] / 2**30:.2f} GiB")
    kv = s["kv_cache_bytes"]
    windowed = s.get("kv_cache_bytes_windowed")
    print(f"KV cache at context {kv['context']} (batch 1): bf16 {kv['bf16'] / 2**30:.2f} GiB with every token "
          "kept" + (f"; {windowed['bf16'] / 2**30:.2f} GiB where only the sliding window is kept (gptlab's engine, "
                    "llama.cpp)" if windowed else ""))
    cfg = net.cfg
    window = "" if cfg.attended_tokens() == cfg.context_length else f" (sliding window {cfg.attended_tokens()})"
    print(f"FLOPs per token: forward {_human(s['flops_per_token_forward'])}, "
          f"training (3x) {_human(s['flops_per_token_training'])} at context {cfg.context_length}{window}")
    return 0
