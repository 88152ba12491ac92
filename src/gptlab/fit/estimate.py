"""The one estimator: memory and speed of a model, for inference and training.

Every view (table, plan, JSON, TUI, --verify) calls these functions; nothing
else computes a size or a speed. Parameter counts, KV-cache bytes, attended
tokens and FLOPs per token are the spec's ``ModelConfig`` methods, the ones
``gptlab inspect`` prints.

Inference memory = weights at the quant + KV cache + compute buffer + runtime
(+ load buffers, see ``load_buffer_bytes``):

    weights   = parameters · bits per weight / 8          (exact file bytes for a GGUF at its own quant)
    KV cache  = 2 · L · Hkv · hd · T · B · bytes per element, T = every token (gptlab's cache)
                or min(T, window) (llama.cpp keeps the last W of a sliding-window model)
    compute   = activations of one forward chunk; dominated by the logits (chunk · V · 4 bytes)
    runtime   = the process itself (measured RSS of python + torch + gptlab; an assumed
                figure for llama.cpp)

Decode speed (per token, batch 1):

    t = max(bytes read / (bandwidth · eff), FLOPs / (matmul peak · eff)) + eager overhead

with the measured GEMV bandwidth and matmul peak of the device (``hardware``).
Bytes read are the weights every token touches (all but the input embedding
tables, of which one row is read; the tied output head is read in full) plus
the cached K/V. The overhead term is gptlab's eager per-layer cost (Python,
dispatch, kernel launches; measured on tiny models), which is what limits small
models in gptlab's runtime; llama.cpp runs a graph and has none worth counting.

Training memory = weights + gradients + optimizer state + activations + runtime
+ step buffers (optimizer temporaries the size of the largest tensor),
with activations counted from what autograd saves per layer per token (below);
training speed = matmul peak · MFU / (6 · N + 12 · L · T · H · hd) FLOPs per token
(Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gptlab.errors import GptlabError
from gptlab.fit.catalog import ModelSpec
from gptlab.fit.hardware import GPU, Hardware, bandwidth_at_width
from gptlab.fit.quant import (GPTLAB_QUANTS, INT4_RESIDENT_COPIES, INT4_VNNI_PACKED_BITS, INT8_VNNI_PACKED_BITS,
                              TORCH_DTYPES, canonical_name, get_quant, gptlab_quant_bits, kv_bytes_per_element)

GiB = 2**30


# ---------------------------------------------------------------- engines
@dataclass(frozen=True)
class Engine:
    """How a runtime uses memory and time. Every constant says where it comes from."""

    name: str
    quantized_weights: bool  # keeps GGUF blocks in memory (llama.cpp) vs. dequantizes (gptlab)
    bandwidth_efficiency: float  # fraction of the measured GEMV bandwidth its decode reaches
    matmul_efficiency: float  # fraction of the measured square-matmul peak its prefill reaches
    runtime_bytes: int | None  # process memory; None = measured (gptlab)
    compute_chunk: int  # tokens per forward chunk at prefill (sizes the compute buffer)
    eager: bool  # per-op dispatch cost applies
    kv_window: bool  # the KV cache of a sliding-window model holds only the last W tokens


# gptlab's decode matmuls stream weights at the rate the width-resolved GEMV
# benchmark measures for the model's d: aten::mm bytes/s in SmolLM2-135M,
# GPT-2 124M and SmolLM2-360M decode steps (torch.profiler) were 0.96-1.15 of
# bandwidth_at_width(d) in the same process. So: 1.0, no correction.
GPTLAB_BANDWIDTH_EFFICIENCY = 1.0

ENGINES: dict[str, Engine] = {
    # gptlab: our own PyTorch runtime. Bandwidth, matmul peak and the per-layer
    # eager overhead are measured on this machine (benchmarks.py).
    # Its engine's cache keeps a ring of a sliding-window model's last W tokens per sequence
    # (models/attention.py SlotCache(ring=W)), as llama.cpp does.
    "gptlab": Engine("gptlab", False, GPTLAB_BANDWIDTH_EFFICIENCY, 0.8, None, 512, True, True),
    # llama.cpp / Ollama: not measurable here. Assumed: its quantized GEMV kernels
    # reach 80% of the bandwidth torch's fp32 GEMV reaches; ~150 MiB process + graph
    # overhead; 512-token ubatch; graph execution (no Python per op); a sliding-window
    # model's cache holds the last W tokens.
    "llama.cpp": Engine("llama.cpp", True, 0.8, 0.5, 150 * 2**20, 512, False, True),
}

# Eager aten ops per decode step of gptlab's models: (per layer, fixed), counted
# with a TorchDispatchMode on one cached decode step (tests/fit recount them).
# Used only when the decode overhead was not measured (see benchmarks.measure_decode_overhead).
EAGER_OPS = {"gpt2": (39, 10), "llama": (75, 20)}
# generate() adds its own per-token ops (sampling, cat, eos bookkeeping).
GENERATE_OPS = 25


def get_engine(name: str) -> Engine:
    """Look up an inference engine by name (gptlab or llama.cpp)."""
    if name not in ENGINES:
        raise GptlabError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINES)}")
    return ENGINES[name]


def is_native(spec: ModelSpec, quant: str) -> bool:
    """True when ``quant`` names a GGUF file's own format: its sizes are the file's, not a table's.

    The name can be one the table lacks (``IQ2_XS``, ``TQ1_0`` ...): the file's
    tensors size it.
    """
    return spec.native_weight_bytes is not None and canonical_name(quant) == spec.native_quant


def check_quant(spec: ModelSpec, quant: str, engine: Engine) -> str:
    """The canonical quant name, rejecting formats the engine cannot hold in memory."""
    q = spec.native_quant if is_native(spec, quant) else get_quant(quant).name
    if not engine.quantized_weights and q not in TORCH_DTYPES and q not in GPTLAB_QUANTS:
        raise GptlabError(
            f"quant {quant} is a GGUF block format, but the gptlab engine dequantizes weights to "
            f"{'/'.join(TORCH_DTYPES)} (and quantizes them itself only as INT8 or INT4, --quantize int8|int4); "
            "pass --quant BF16, F32, INT8 or INT4, or --engine llama.cpp to size quantized inference"
        )
    if engine.quantized_weights and q in GPTLAB_QUANTS:
        raise GptlabError(f"quant {quant} is gptlab's own format (--quantize {q.lower()}); pass --engine gptlab, "
                          "or for llama.cpp a GGUF format (Q4_1 has INT4's blocks, Q8_0 is 8-bit)")
    return q


# ---------------------------------------------------------------- memory
def gptlab_quant_bytes(spec: ModelSpec, quant: str, resident: bool = True) -> float:
    """Bytes of a model under gptlab's ``--quantize int8|int4``: ``resident`` (held) or read per decode step.

    The linear layers of the blocks at the format (``quant.gptlab_quant_bits``,
    rows of d inputs; their few norm and bias values counted with them, < 0.1 %),
    the output head as int8 under both (a tied head becomes an int8 copy beside
    the float embedding), the input embedding tables at bf16 (read: one row).
    INT4 keeps one copy of its codes (``INT4_RESIDENT_COPIES``).
    """
    d = spec.emb_dim
    head = spec.params_lm_head * gptlab_quant_bits("INT8", d) / 8
    blocks = _block_params(spec)
    per_weight = gptlab_quant_bits(quant, d) / 8
    if quant == "INT4" and resident:
        per_weight *= INT4_RESIDENT_COPIES
    embedding = 2.0 * spec.params_embedding if resident else 2.0 * d
    return blocks * per_weight + head + embedding


def _block_params(spec: ModelSpec) -> int:
    """Weights of the linear layers in the blocks (all but the embedding and an untied head)."""
    return spec.params_active - spec.params_embedding - (0 if spec.tied else spec.params_lm_head)


def cpu_packed_bytes(spec: ModelSpec, hw: Hardware, quant: str, engine: str) -> float:
    """The packed copies gptlab's native kernels add at the first forward on an AVX-512 VNNI CPU
    (``Hardware.int4_packed``), for a model run there at ``--quantize int4``: each block layer whose
    rows hold an even number of 32-groups (inputs a multiple of 64) and whose outputs are a multiple
    of 16, again at 6.0 bits (``INT4_VNNI_PACKED_BITS``), and the int8 head once more where its
    vocabulary is a multiple of 16. Zero elsewhere (the CUDA path, other formats, llama.cpp, AVX2): a
    CPU-only run path adds it (``InferenceMemory.cpu_total``)."""
    if engine != "gptlab" or canonical_name(quant) != "INT4" or not hw.int4_packed:
        return 0.0
    d, F, a, kv = spec.emb_dim, _mlp_width(spec), spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    mlp_in = [(d, F)] * (1 if spec.family == "gpt2" else 2)  # (inputs, outputs): fc, or gate and up
    layers = [(d, a), (d, kv), (d, kv), (a, d), *mlp_in, (F, d)]
    share = sum(k * n for k, n in layers if k % 64 == 0 and n % 16 == 0) / sum(k * n for k, n in layers)
    blocks = _block_params(spec) * share * INT4_VNNI_PACKED_BITS / 8
    head = spec.params_lm_head * INT8_VNNI_PACKED_BITS / 8 if spec.vocab_size % 16 == 0 and d % 32 == 0 else 0.0
    return blocks + head


def weights_bytes(spec: ModelSpec, quant: str) -> float:
    """Bytes of all weights at ``quant`` (exact file bytes for a GGUF at its own format)."""
    if is_native(spec, quant):
        return float(spec.native_weight_bytes)
    if canonical_name(quant) in GPTLAB_QUANTS:
        return gptlab_quant_bytes(spec, canonical_name(quant))
    return spec.params_total * get_quant(quant).bits / 8


def kv_cache_bytes(spec: ModelSpec, context: int, batch: int = 1, kv_quant: str = "f16",
                   engine: str = "llama.cpp") -> float:
    """K and V held for ``context`` tokens by ``engine``: ``ModelConfig.kv_cache_bytes`` at the KV format.

    2 · L · Hkv · hd · T · B · bytes. With a sliding window (Mistral) both engines
    keep only the last ``window`` tokens, T = min(context, W) (gptlab's engine: a ring
    cache; ``gptlab inspect`` prints both figures).
    """
    if context < 1 or batch < 1:
        raise GptlabError(f"context ({context}) and batch ({batch}) must be at least 1")
    windowed = get_engine(engine).kv_window
    return spec.config.kv_cache_bytes(context, batch, kv_bytes_per_element(kv_quant), windowed=windowed)


def kv_read_bytes(spec: ModelSpec, context: int, kv_quant: str = "f16") -> float:
    """K and V one decode step reads at ``context``: the attended tokens, min(T, W), in every engine."""
    return spec.config.kv_cache_bytes(context, 1, kv_bytes_per_element(kv_quant), windowed=True)


def compute_buffer_bytes(spec: ModelSpec, context: int, engine: Engine, batch: int = 1) -> float:
    """Activations of one forward chunk: logits (fp32) plus a few d-wide hidden states.

    Both engines apply the output head to each sequence's last position only, prompt chunks included
    (llama.cpp; gptlab's ``inference.engine``, which ``generate``, chat and the server run on)."""
    chunk = min(context, engine.compute_chunk)
    logits = spec.vocab_size * 4
    return batch * (logits + chunk * 8 * spec.emb_dim * 4)


def runtime_bytes(hw: Hardware, engine: Engine) -> float:
    """Memory of the process itself before any model is loaded."""
    return float(engine.runtime_bytes if engine.runtime_bytes is not None else hw.runtime_rss)


def load_buffer_bytes(spec: ModelSpec, engine: Engine) -> float:
    """Memory the allocator keeps after gptlab converts weights at load (GGUF dequantization).

    The loader builds each tensor through fp32 temporaries; glibc keeps the heap
    they grew, about the largest tensor in fp32 (measured on SmolLM2-135M:
    +127 MiB for a 108 MiB embedding). Zero for a model built in place (presets)
    and for llama.cpp, which maps the file.
    """
    if engine.quantized_weights or spec.source == "preset":
        return 0.0
    F = _mlp_width(spec)
    return 4.0 * max(spec.vocab_size * spec.emb_dim, F * spec.emb_dim)


@dataclass
class InferenceMemory:
    """Bytes needed to run a model for inference, by part."""

    weights: float
    kv_cache: float
    compute: float
    runtime: float
    load_buffers: float = 0.0
    cpu_packed: float = 0.0  # the native kernels' packed copies, made only when the model runs on the CPU

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.compute + self.runtime + self.load_buffers

    @property
    def cpu_total(self) -> float:
        """What a CPU-only run holds: ``total`` and the packed copies (``cpu_packed_bytes``)."""
        return self.total + self.cpu_packed

    @property
    def device(self) -> float:
        """What must sit on an accelerator (everything but the host process)."""
        return self.weights + self.kv_cache + self.compute + self.load_buffers

    def gib(self) -> dict[str, float]:
        d = {f"{k}_gib": v / GiB for k, v in asdict(self).items()}
        d["kv_cache_gib"] = d.pop("kv_cache_gib")
        d["total_gib"] = self.total / GiB
        d["cpu_total_gib"] = self.cpu_total / GiB
        return d


def inference_memory(spec: ModelSpec, hw: Hardware, quant: str, context: int, batch: int = 1,
                     kv_quant: str = "f16", engine: str = "llama.cpp") -> InferenceMemory:
    """Weights + KV cache + compute buffer + runtime, for ``context`` tokens at ``quant``."""
    eng = get_engine(engine)
    q = check_quant(spec, quant, eng)
    return InferenceMemory(
        weights=weights_bytes(spec, q),
        kv_cache=kv_cache_bytes(spec, context, batch, kv_quant, engine),
        compute=compute_buffer_bytes(spec, context, eng, batch),
        runtime=runtime_bytes(hw, eng),
        load_buffers=load_buffer_bytes(spec, eng),
        cpu_packed=cpu_packed_bytes(spec, hw, q, engine),
    )


# ---------------------------------------------------------------- speed
def bytes_per_token(spec: ModelSpec, quant: str, context: int, kv_quant: str = "f16") -> float:
    """Bytes a decode step reads: active weights (one row of input embeddings) + the cached K/V.

    A GGUF file at its own format reads its tensors' real bytes (its embedding
    and head are often in a bigger type than the rest).
    """
    if context < 1:
        raise GptlabError(f"context ({context}) must be at least 1")
    kv = kv_read_bytes(spec, context, kv_quant)
    if is_native(spec, quant) and spec.native_read_bytes is not None:
        return spec.native_read_bytes + kv
    if canonical_name(quant) in GPTLAB_QUANTS:
        return gptlab_quant_bytes(spec, canonical_name(quant), resident=False) + kv
    touched = spec.params_active - spec.params_embedding + (spec.params_lm_head if spec.tied else 0)
    return touched * get_quant(quant).bits / 8 + kv


def flops_per_token(spec: ModelSpec, context: int) -> float:
    """Forward FLOPs for one token attending to ``context`` tokens (``ModelConfig.flops_per_token``).

    2 · (active non-embedding params + head) + 4 · L · min(T, W) · H · hd.
    """
    return float(spec.config.flops_per_token(context))


def eager_ops_per_token(spec: ModelSpec) -> int:
    """PyTorch ops one decode step dispatches in gptlab (model + generate loop)."""
    per_layer, fixed = EAGER_OPS["gpt2" if spec.family == "gpt2" else "llama"]
    return spec.n_layers * per_layer + fixed + GENERATE_OPS


def eager_overhead_seconds(spec: ModelSpec, hw: Hardware, gpu: GPU | None = None) -> float:
    """Per-token eager overhead of gptlab: measured per layer + fixed, else ops x op latency."""
    fam = "gpt2" if spec.family == "gpt2" else "llama"
    measured = hw.decode_overhead.get(fam)
    if measured and gpu is None:
        return spec.n_layers * measured["per_layer"] + measured["fixed"]
    # GPU kernel launches cost at least ~5 us each.
    return eager_ops_per_token(spec) * max(hw.op_latency, 5e-6 if gpu else 0.0)


def _device_speed(hw: Hardware, gpu: GPU | None, quant: str, width: int | None = None) -> tuple[float, float]:
    """(bandwidth bytes/s, matmul FLOP/s) of the CPU or a GPU for weights in ``quant``.

    On the CPU the bandwidth is read from the measured curve at the model's width
    (row length of its projections), when the curve was measured.
    """
    if gpu is not None:
        return gpu.bandwidth or 0.0, gpu.matmul_bf16 or 0.0
    peak = hw.cpu_matmul_fp32 if canonical_name(quant) == "F32" else max(hw.cpu_matmul_bf16, hw.cpu_matmul_fp32)
    bw = bandwidth_at_width(hw, width) if width else hw.cpu_bandwidth
    return bw, peak


def decode_seconds(spec: ModelSpec, hw: Hardware, quant: str, context: int, engine: str = "llama.cpp",
                   gpu: GPU | None = None, kv_quant: str = "f16") -> float:
    """Seconds per generated token on the CPU (``gpu=None``) or on ``gpu``."""
    eng = get_engine(engine)
    bw, peak = _device_speed(hw, gpu, quant, spec.emb_dim)
    t_mem = bytes_per_token(spec, quant, context, kv_quant) / (bw * eng.bandwidth_efficiency)
    t_flop = flops_per_token(spec, context) / (peak * eng.matmul_efficiency)
    t_ops = eager_overhead_seconds(spec, hw, gpu) if eng.eager else 0.0
    return max(t_mem, t_flop) + t_ops


def decode_tokens_per_s(spec: ModelSpec, hw: Hardware, quant: str, context: int, engine: str = "llama.cpp",
                        gpu: GPU | None = None, kv_quant: str = "f16") -> float:
    """Decode tokens/s = 1 / decode_seconds (batch 1, at ``context`` tokens of history)."""
    return 1.0 / decode_seconds(spec, hw, quant, context, engine, gpu, kv_quant)


def prefill_seconds(spec: ModelSpec, hw: Hardware, quant: str, prompt_tokens: int,
                    engine: str = "llama.cpp", gpu: GPU | None = None) -> float:
    """Seconds to process a prompt: FLOP-bound for long prompts, one weight read at least."""
    eng = get_engine(engine)
    bw, peak = _device_speed(hw, gpu, quant)
    # P tokens through the matmuls, plus causal attention over on average P/2 keys each.
    kept = spec.config.attended_tokens(prompt_tokens)
    flops = prompt_tokens * flops_per_token(spec, max(1, kept // 2))
    t_mem = bytes_per_token(spec, quant, 1) / (bw * eng.bandwidth_efficiency)
    return max(flops / (peak * eng.matmul_efficiency), t_mem)


# ---------------------------------------------------------------- training
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1, "lion": 1}
PRECISIONS = ("fp32", "bf16-mixed", "bf16")


def activation_elements_per_token(spec: ModelSpec) -> tuple[float, float]:
    """(elements autograd saves per token per layer, elements per token at the output head).

    Per layer (a = H·hd, kv = Hkv·hd, F = MLP width): both families save the
    block input and norm outputs, q/k/v and the attention output, the MLP
    intermediates. GPT-2 (LayerNorm, GELU MLP): 4d + 5a + 2F. Llama (each RMSNorm
    saves x and the normed x; RoPE saves q, k and their rotated halves; attention
    saves rotated q, k, v and its output; gated MLP saves gate, up, act(gate),
    product): 4d + 5a + 4kv + 4F. Checked against ``saved_tensors_hooks``.
    Head: the fp32 logits, their log-softmax and its gradient, 3V.
    """
    d, a, kv = spec.emb_dim, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    F = _mlp_width(spec)
    if spec.family == "gpt2":
        per_layer = 4 * d + 5 * a + 2 * F
    else:
        per_layer = 4 * d + 5 * a + 4 * kv + 4 * F
    return per_layer, 3 * spec.vocab_size


def _mlp_width(spec: ModelSpec) -> int:
    if spec.config is not None and spec.config.hidden_dim:
        return spec.config.hidden_dim
    # Recover F from the counts: per-layer MLP params ≈ 3·d·F (gated) or 2·d·F (GPT-2).
    per_layer = _block_params(spec) / spec.n_layers
    attn = 2 * spec.emb_dim * (spec.n_heads + spec.n_kv_heads) * spec.head_dim
    return max(1, int((per_layer - attn) / ((2 if spec.family == "gpt2" else 3) * spec.emb_dim)))


@dataclass
class TrainingMemory:
    """Bytes needed for one training step, by part."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    runtime: float
    step_buffers: float = 0.0

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.runtime
                + self.step_buffers)

    @property
    def device(self) -> float:
        return self.total - self.runtime

    def gib(self) -> dict[str, float]:
        d = {f"{k}_gib": v / GiB for k, v in asdict(self).items()}
        d["total_gib"] = self.total / GiB
        return d


def training_memory(spec: ModelSpec, hw: Hardware, batch: int, context: int, precision: str = "fp32",
                    optimizer: str = "adamw", checkpointing: bool = False) -> TrainingMemory:
    """Peak memory of a training step (from the second step on, when optimizer state exists).

    precision: ``fp32``; ``bf16-mixed`` (fp32 weights, grads, moments; autocast bf16
    activations); ``bf16`` (everything bf16; PyTorch keeps optimizer state in the
    parameter dtype). With ``checkpointing`` only each block's input is kept and
    one block's activations are recomputed at a time.
    """
    if precision not in PRECISIONS:
        raise GptlabError(f"precision {precision!r} must be one of {', '.join(PRECISIONS)}")
    if optimizer not in OPTIMIZER_STATES:
        raise GptlabError(f"optimizer {optimizer!r} must be one of {', '.join(OPTIMIZER_STATES)}")
    if batch < 1 or context < 1:
        raise GptlabError(f"batch ({batch}) and context ({context}) must be at least 1")
    P = spec.params_total
    wbytes = 2 if precision == "bf16" else 4
    abytes = 4 if precision == "fp32" else 2
    per_layer, head = activation_elements_per_token(spec)
    # Temporaries the size of the largest tensor: the optimizer's per-parameter
    # update (AdamW: sqrt of the second moment and the step; others: one), and for
    # tied embeddings the second gradient summed into the shared matrix.
    largest = max(spec.vocab_size * spec.emb_dim, _mlp_width(spec) * spec.emb_dim) * wbytes
    n_temp = (2 if OPTIMIZER_STATES[optimizer] == 2 else 1) + (1 if spec.tied else 0)
    tokens = batch * context
    if checkpointing:
        layers = tokens * (spec.n_layers * spec.emb_dim * 4 + per_layer * abytes)
    else:
        layers = tokens * spec.n_layers * per_layer * abytes
    acts = layers + tokens * head * 4
    return TrainingMemory(
        weights=P * wbytes, gradients=P * wbytes, optimizer=P * wbytes * OPTIMIZER_STATES[optimizer],
        activations=acts, runtime=float(hw.runtime_rss), step_buffers=n_temp * largest,
    )


def train_flops_per_token(spec: ModelSpec, context: int) -> float:
    """Forward + backward FLOPs per token: 3 × forward (6·N + 12·L·T·H·hd, T averaged causally)."""
    return 3 * flops_per_token(spec, max(1, context // 2))


# MFU reached by gptlab's training loop; CPU value measured on this runtime (see docs/fit.md).
TRAIN_MFU = {"cpu": 0.35, "gpu": 0.35}


def train_tokens_per_s(spec: ModelSpec, hw: Hardware, context: int, precision: str = "fp32",
                       gpu: GPU | None = None) -> float:
    """Training tokens/s = matmul peak × MFU / training FLOPs per token."""
    if gpu is not None:
        peak, mfu = (gpu.matmul_bf16 or 0.0), TRAIN_MFU["gpu"]
    else:
        peak = hw.cpu_matmul_fp32 if precision == "fp32" else hw.cpu_matmul_bf16
        mfu = TRAIN_MFU["cpu"]
    return peak * mfu / train_flops_per_token(spec, context)
