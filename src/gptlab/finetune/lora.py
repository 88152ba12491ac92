"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A frozen weight W (out, in) gets a trainable update ΔW = (α / r) · B · A with
A (r, in) and B (out, r), r ≪ min(in, out):

    y = x Wᵀ + b + (α / r) · dropout(x) Aᵀ Bᵀ

A starts random (Kaiming-uniform) and B at zero, so training starts exactly at
the pretrained model. After training, ΔW can be merged into W (no extra cost
at inference), or saved on its own in the Hugging Face ``peft`` format:
``adapter_model.safetensors`` + ``adapter_config.json`` with keys
``base_model.model.<HF module>.lora_A.weight`` / ``.lora_B.weight``. The HF
module names come from the same declarative key maps that load checkpoints
(``weights/keymaps.py``), so an adapter trained in gptlab loads onto the
``transformers`` model with ``PeftModel.from_pretrained``.

:class:`LoRALinear` *is* an ``nn.Linear`` (same ``weight``/``bias``
parameters) with two extra sub-layers, so the base model's state-dict keys do
not change: ``x.weight``, ``x.bias``, plus ``x.lora_A.weight``, ``x.lora_B.weight``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_save, atomic_write_json
from gptlab.finetune.surgery import blocks, head_name
from gptlab.models.base import LoraConfig  # the settings' type is declared with the model: LanguageModel.lora

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update: y = base(x) + (α/r) · B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the frozen base parameters, shared
        dd = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **dd)  # A (r, in)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **dd)  # B (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # ΔW = 0 at the start
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r) · B · A, shape (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with W + ΔW (the base bias kept)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight + self.delta_weight().to(self.weight.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.weight.requires_grad_(self.weight.requires_grad)
        return lin


def _target_names(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Full module names of the linear layers that get adapters (only inside the blocks)."""
    layer_list = blocks(model)
    prefix = next(n for n, m in model.named_children() if m is layer_list)
    names = []
    for name, m in model.named_modules():
        if not name.startswith(prefix + ".") or not isinstance(m, nn.Linear) or isinstance(m, LoRALinear):
            continue
        if ".lora_" in name:
            continue
        short = name.rsplit(".", 1)[-1]
        if "all-linear" in cfg.targets or short in cfg.targets:
            names.append(name)
    if not names:
        shorts = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if n.startswith(prefix + ".") and isinstance(m, nn.Linear)})
        raise GptlabError(f"no linear layer matches LoRA targets {cfg.targets}; this model has {shorts} "
                          "(or use all-linear)")
    return names


def add_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap the target linear layers in :class:`LoRALinear`, in place; returns their names.

    Records ``model.lora`` (saved in every model directory written while the adapters are unmerged). Freezing is
    separate: call ``apply_freezing(model, "lora")`` to train only the adapters.
    """
    cfg.validate()
    blocks(model)  # a gptlab model (the interface declares ``lora``), or one clear error
    if model.lora is not None:
        raise GptlabError("the model already has LoRA adapters; merge_lora(model) first to add new ones")
    names = _target_names(model, cfg)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), cfg.rank, cfg.alpha, cfg.dropout))
    model.lora = cfg
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Name -> LoRALinear for every adapter in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W ← W + ΔW) and drop the adapters, in place."""
    for name, m in lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, m.merged())
    model.lora = None
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its adapters merged (the original keeps training)."""
    return merge_lora(copy.deepcopy(model))


# ---- the peft format ----------------------------------------------------------------------------

def hf_module_names(model: nn.Module) -> dict[str, tuple[str, bool]]:
    """Our module name -> (Hugging Face module name, stored transposed?) from the family key map."""
    from gptlab.weights.keymaps import expand

    out = {}
    for rule in expand(model.cfg.family, model.cfg):
        if rule.ours.endswith(".weight"):
            out[rule.ours[:-len(".weight")]] = (rule.theirs[:-len(".weight")], rule.transpose)
    out[head_name(model)] = ("lm_head", False)
    return out


def save_adapter(model: nn.Module, out: str | Path, base_model: str = "") -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` that ``peft`` loads onto the HF model.

    Args:
        model: a model with LoRA adapters (see :func:`add_lora`).
        out: directory to write.
        base_model: recorded as ``base_model_name_or_path``.
    """
    from safetensors.torch import save_file

    cfg = model.lora
    mods = lora_modules(model)
    if cfg is None or not mods:
        raise GptlabError("the model has no LoRA adapters to save; train with --trainable lora")
    names = hf_module_names(model)
    state, targets, transposed = {}, set(), set()
    for ours, m in mods.items():
        if ours not in names:
            raise GptlabError(f"module {ours} has no Hugging Face name in the {model.cfg.family} key map; "
                              "it cannot be saved in the peft format")
        theirs, t = names[ours]
        state[f"base_model.model.{theirs}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous().cpu()
        state[f"base_model.model.{theirs}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous().cpu()
        targets.add(theirs.rsplit(".", 1)[-1])
        transposed.add(t)
    if len(transposed) > 1:
        raise GptlabError("adapters on both Conv1D-style and Linear-style layers cannot share one peft config")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save(out / ADAPTER_WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write_json(out / ADAPTER_CONFIG, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(targets), "fan_in_fan_out": transposed.pop(), "bias": "none",
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
    })
    return out


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Attach the adapters saved by :func:`save_adapter` (or peft) to ``model``, strictly checked."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, w_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not w_file.is_file():
        raise GptlabError(f"{path} is not a LoRA adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    meta = json.loads(cfg_file.read_text())
    if meta.get("peft_type") != "LORA":
        raise GptlabError(f"{cfg_file}: peft_type {meta.get('peft_type')!r} is not LORA")
    state = load_file(str(w_file))
    theirs_to_ours = {v[0]: k for k, v in hf_module_names(model).items()}
    wanted = {}
    for key, t in state.items():
        core = key.removeprefix("base_model.model.")
        mod, _, kind = core.rpartition(".lora_")
        if mod not in theirs_to_ours:
            raise GptlabError(f"{w_file}: adapter key {key} names no module of this {model.cfg.family} model")
        wanted.setdefault(theirs_to_ours[mod], {})[kind] = t
    rank = int(meta["r"])
    cfg = LoraConfig(rank=rank, alpha=float(meta["lora_alpha"]), dropout=float(meta.get("lora_dropout", 0.0)),
                     targets=sorted({n.rsplit(".", 1)[-1] for n in wanted}))
    add_lora(model, cfg)
    mods = lora_modules(model)
    if set(mods) != set(wanted):
        missing = sorted(set(mods) - set(wanted))
        raise GptlabError(f"{w_file} has no adapter weights for {missing[:4]}")
    with torch.no_grad():
        for name, m in mods.items():
            a, b = wanted[name]["A.weight"], wanted[name]["B.weight"]
            if a.shape != m.lora_A.weight.shape or b.shape != m.lora_B.weight.shape:
                raise GptlabError(f"{w_file}: adapter {name} has shapes A{tuple(a.shape)} B{tuple(b.shape)}, "
                                  f"the model needs A{tuple(m.lora_A.weight.shape)} B{tuple(m.lora_B.weight.shape)}")
            m.lora_A.weight.copy_(a)
            m.lora_B.weight.copy_(b)
    return model
