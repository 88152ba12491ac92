"""The fit planner: will a model fit on this machine, and how fast will it run?

    hardware.py   Hardware/GPU records; detect CPU/RAM/GPUs/Ollama; simulate other machines
    benchmarks.py measure bandwidth (by row width), matmul peak, op latency, decode overhead, runtime RSS
    calibration.py  the per-machine cache of those figures (checked first); detect_hardware()
    calibration_check.py  are measured figures believable? (checked before they are cached)
    quant.py      bits per weight of each weight format, from the GGUF block layouts
    catalog.py    ModelSpec: exact sizes from a preset, HF config.json, GGUF file or run directory
    estimate.py   the one estimator: inference/training memory, decode/prefill/training speed
    plan.py       fit levels, run paths, min/recommended hardware, upgrade deltas, the ranked table
    verify.py     estimated vs measured peak RSS and tokens/s, in a clean subprocess
    tui.py        the Textual terminal UI
    commands.py   `gptlab fit`
"""

from gptlab.fit.catalog import ModelSpec, catalog, spec_from_config, spec_from_gguf, spec_from_hf_config, spec_from_ref
from gptlab.fit.estimate import (decode_tokens_per_s, inference_memory, kv_cache_bytes, prefill_seconds,
                                 train_tokens_per_s, training_memory, weights_bytes)
from gptlab.fit.calibration import detect_hardware
from gptlab.fit.hardware import Hardware
from gptlab.fit.plan import Plan, make_plan, rank, table_row
from gptlab.fit.quant import QUANTS, get_quant

__all__ = ["Hardware", "ModelSpec", "Plan", "QUANTS", "catalog", "decode_tokens_per_s", "detect_hardware",
           "get_quant", "inference_memory", "kv_cache_bytes", "make_plan", "prefill_seconds", "rank",
           "spec_from_config", "spec_from_gguf", "spec_from_hf_config", "spec_from_ref", "table_row",
           "train_tokens_per_s", "training_memory", "weights_bytes"]
