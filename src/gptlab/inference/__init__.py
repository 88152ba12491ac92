"""Inference: open a model, decode it, stop it, detokenize it, chat with it, quantize it.

    open.py        open_model(ref, device, dtype, quantize, tokenizer) -> OpenedModel(model, tokenizer, stops)
    stops.py       StopSet: eos ids (tokenizer + config), the chat template's end-of-turn tokens, stop strings
    detokenize.py  Detokenizer: token ids -> text pieces (split UTF-8, SentencePiece spaces)
    sampling.py    Sampling settings and the per-step filters (temperature, top-k/p, min-p, repetition)
    events.py      GenerationEvent (one per token), TextStops (text pieces cut at stop strings)
    requests.py    Request (one sequence's prompt and settings), Handle (what the engine reports)
    engine.py      Engine, the one decoding loop: continuous batching over a slot cache; submit, step, run, cancel
    generation.py  on the engine: generate(...) -> ids tensor; generate_events(...) -> events; `gptlab generate`
    chat.py        ChatSession and `gptlab chat`
    quantize.py    int8 / int4 weight-only linear layers

Everything that generates text (``gptlab generate``, ``gptlab chat``, the
in-process judge, instruction responses, distillation's teacher) opens its
model with :func:`open_model` (or holds one already) and decodes on the
:class:`Engine` (directly, or through :func:`generate` / :func:`generate_events`),
stopping at a :class:`StopSet`.
"""

from gptlab.inference.detokenize import Detokenizer, continuation_text
from gptlab.inference.engine import Engine, Handle, Request
from gptlab.inference.generation import (CANCELLED, LENGTH, STOP, GenerationEvent, completion_text,
                                       generate, generate_events)
from gptlab.inference.open import OpenedModel, default_dtype, open_model
from gptlab.inference.sampling import Sampling, filter_logits, validate_sampling
from gptlab.inference.stops import StopSet, end_of_turn_tokens

__all__ = ["CANCELLED", "LENGTH", "STOP", "Detokenizer", "Engine", "GenerationEvent", "Handle", "OpenedModel",
           "Request", "Sampling", "StopSet",
           "completion_text", "continuation_text", "default_dtype", "end_of_turn_tokens",
           "filter_logits", "generate", "generate_events", "open_model", "validate_sampling"]
