"""Data parallelism applied to a model from outside, as torchtitan's ``parallelize.py`` does: the model
files do not change, and the loop asks a :class:`Parallel` for the few things that differ.

    none   one process: the model as it is
    ddp    DistributedDataParallel: every rank holds the whole model; gradients are all-reduced
           (averaged) during backward, bucket by bucket
    fsdp   FSDP2: ``fully_shard`` on every transformer block (reached through
           ``LanguageModel.get_blocks()``), then on the root; each rank keeps 1/N of every parameter,
           gradient and optimizer state, gathers a block's weights just before it runs and reduce-scatters
           its gradients after. A ``MixedPrecisionPolicy`` casts the gathered weights to bf16/fp16 when the
           run's precision says so (gradients are reduced in fp32).

Activation checkpointing (``--activation-checkpointing``) recomputes each block's activations during
backward instead of keeping them: less memory, about one more forward pass of compute. It wraps the
blocks' ``forward`` so parameter names (and so checkpoints) stay the same.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.training.distributed import Dist

STRATEGIES = ("auto", "none", "ddp", "fsdp")


def resolve_strategy(strategy: str, d: Dist) -> str:
    """``auto`` -> ddp with a process group, none without; an explicit one is checked against ``d``."""
    if strategy not in STRATEGIES:
        raise GptlabError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        return "ddp" if d.active else "none"
    if strategy != "none" and not d.active:
        raise GptlabError(f"--strategy {strategy} needs a process group: start with torchrun or --nproc N")
    return strategy


@dataclass
class Parallel:
    """How the model runs across the ranks of ``dist`` (see the module docstring)."""

    model: nn.Module  # the model itself (FSDP shards it in place); checkpoints and evaluation use it
    fwd: nn.Module  # what the training step calls: the DDP wrapper, or the model
    strategy: str
    dist: Dist
    template: nn.Module | None = None  # FSDP, rank 0: an unsharded CPU copy that exports are written from

    def grad_sync(self, last: bool):
        """Context for one micro-batch's backward: gradients are reduced across ranks only when ``last``
        (gradient accumulation communicates once per optimizer step)."""
        if self.strategy == "ddp" and not last:
            return self.fwd.no_sync()
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    @property
    def sharded(self) -> bool:
        """Parameters are split across ranks: every rank must join a forward pass (evaluation, sampling)."""
        return self.strategy == "fsdp"

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on the CPU (FSDP: gathered, a collective every rank must call;
        the tensors land on rank 0, the others get an empty dict)."""
        if self.strategy != "fsdp":
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()} if self.dist.is_main else {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=opts)

    def export(self, save: Callable[[nn.Module, Path], None], out: Path) -> None:
        """Write the whole model with ``save(model, out)`` on rank 0 (every rank calls this: FSDP gathers
        the weights first). ``save`` is the recipe's model-directory writer."""
        whole = self.gathered()
        if whole is not None:
            save(whole, out)

    def gathered(self) -> nn.Module | None:
        """The whole model on rank 0: the model itself, or with FSDP its weights gathered into the unsharded
        CPU copy (a collective every rank calls; None on the others). Samples are drawn from it: generation
        calls parts of the model (its blocks, the head on the last position) that FSDP only gathers for a
        whole forward pass."""
        if self.strategy != "fsdp":
            return self.model if self.dist.is_main else None
        full = self.full_state_dict()
        if not self.dist.is_main:
            return None
        self.template.load_state_dict(full)
        return self.template

    def unsharded(self) -> nn.Module | None:
        """The whole model for what follows training (a recipe's report, its test generations), on rank 0's
        device (a collective; None on the other ranks)."""
        if self.strategy != "fsdp":
            return self.model
        m = self.gathered()
        return m.to(self.dist.device) if m is not None else None


def load_full_optimizer(p: Parallel, optimizer, state: dict[str, Any]) -> None:
    """Restore ``optimizer`` from a single-process checkpoint's ``optimizer.state_dict()`` (1 -> N processes).

    DDP and one process hold whole parameters in the same order: loaded as it is. FSDP holds shards: the
    state is keyed by parameter name (the order :func:`gptlab.training.optim.param_groups` gives) and
    each rank keeps its part.
    """
    if p.strategy != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for n, q in p.model.named_parameters() if q.requires_grad and q.dim() >= 2]
    names += [n for n, q in p.model.named_parameters() if q.requires_grad and q.dim() < 2]
    by_id = dict(enumerate(names))
    groups = [{**g, "params": [by_id[i] for i in g["params"]]} for g in state["param_groups"]]
    named = {"state": {by_id[i]: v for i, v in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(p.model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def single(model: nn.Module, d: Dist | None = None) -> Parallel:
    """One process: nothing applied."""
    return Parallel(model, model, "none", d or Dist(device=next(model.parameters()).device))


def parallelize(model: nn.Module, d: Dist, strategy: str = "auto", *, param_dtype: torch.dtype | None = None,
                activation_checkpointing: bool = False) -> Parallel:
    """Apply ``strategy`` (and activation checkpointing) to ``model``, already on ``d.device``."""
    strategy = resolve_strategy(strategy, d)
    template = copy.deepcopy(model).cpu() if strategy == "fsdp" and d.is_main else None  # for exports
    if activation_checkpointing:
        checkpoint_blocks(model)
    if strategy == "none":
        return single(model, d)
    broadcast_from_main(model, d)  # every rank starts from rank 0's weights, however it built them
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.device.index] if d.device.type == "cuda" else None
        # a mixture of experts may route no token of a rank's batch to an expert: that expert gets no gradient
        sparse = getattr(getattr(model, "cfg", None), "n_experts", 0) > 0
        return Parallel(model, DDP(model, device_ids=ids, find_unused_parameters=sparse), "ddp", d)
    apply_fsdp(model, param_dtype)
    return Parallel(model, model, "fsdp", d, template)


def _blocks(model: nn.Module) -> nn.ModuleList:
    from gptlab.models.base import LanguageModel

    if not isinstance(model, LanguageModel):
        raise GptlabError(f"{type(model).__name__} is not a gptlab LanguageModel: FSDP and activation "
                          "checkpointing reach its blocks through LanguageModel.get_blocks()")
    return model.get_blocks()


def apply_fsdp(model: nn.Module, param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True) -> None:
    """FSDP2: ``fully_shard`` each block, then the root (embedding, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        # the last block is gathered again at once by backward: keep it (torchtitan does the same)
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in backward (``torch.utils.checkpoint``, non-reentrant)."""
    from torch.utils.checkpoint import checkpoint

    for block in _blocks(model):
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():  # evaluation, sampling: nothing to save
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


@torch.no_grad()
def broadcast_from_main(model: nn.Module, d: Dist) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if d.world == 1:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


def describe(p: Parallel) -> str:
    """``ddp over 2 processes (gloo)``, for the run's first line."""
    if p.strategy == "none":
        return "1 process"
    return f"{p.strategy} over {p.dist.world} process{'es' if p.dist.world > 1 else ''} ({p.dist.backend})"

