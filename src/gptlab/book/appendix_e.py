"""Appendix E of the course: parameter-efficient fine-tuning with LoRA.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) keeps a pretrained
``W`` frozen and learns a low-rank update: ``y = x·Wᵀ + alpha · x·A·B`` with
A (in, rank) and B (rank, out). B starts at zero, so the model is unchanged
until training moves it. Note the course scales by ``alpha`` itself (not the
paper's ``alpha / rank``), so the course's ``alpha`` equals PEFT's
``lora_alpha / r``.

Full strength: ``gptlab.finetune`` LoRA (merging into the base weights, saving
only the adapters).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gptlab.errors import GptlabError


class LoRALayer(nn.Module):
    """The low-rank update ``alpha · x·A·B``: x (..., in_dim) -> (..., out_dim).

    Full strength: LoRA in ``gptlab.finetune`` (``gptlab finetune ... --lora``).
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise GptlabError(f"LoRA rank={rank} must be >= 1")
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * (x @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    """A frozen-able ``nn.Linear`` plus a :class:`LoRALayer` on the same input.

    Full strength: LoRA in ``gptlab.finetune``, which can also merge the update into the weight.
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float) -> None:
    """Wrap every ``nn.Linear`` inside ``model`` in a :class:`LinearWithLoRA`, in place.

    Freeze the model first (``p.requires_grad = False`` for all parameters) so only
    the new A and B matrices train. Full strength: LoRA in ``gptlab.finetune``.
    """
    if rank < 1:
        raise GptlabError(f"LoRA rank={rank} must be >= 1")
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)
