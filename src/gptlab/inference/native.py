"""gptlab's own CPU kernels for int4/int8 weights (``kernels.c``), built on first use and cached.

The C file ships with the package and is built on first use for this CPU (:func:`gptlab.ccompile.compiled`:
cached on disk, off with ``GPTLAB_NATIVE=0``). Where it cannot be built, or the CPU has neither AVX-512 nor
AVX2, :func:`kernels` returns None and the layers use PyTorch's kernels instead (same results to float rounding).

The layers call :func:`q4_matmul` / :func:`i8_matmul` for float32 activations on the CPU. OpenMP threads:
``torch.get_num_threads()``; the library links the OpenMP runtime that PyTorch already loaded, so both
share one thread pool.
"""

from __future__ import annotations

import ctypes
import operator
import os
from pathlib import Path

import torch
import torch.nn as nn

from gptlab.ccompile import compiled
from gptlab.models.attention import SlotBatch
from gptlab.models.llama import DecoderLayer, GatedMLP, RMSNorm

_SOURCE = Path(__file__).with_name("kernels.c")
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable here


def kernels() -> ctypes.CDLL | None:
    """The compiled kernels (built now if needed), or None where they cannot be used here."""
    global _lib
    if _lib is None:
        _lib = _load() or False
    return _lib or None


def _load() -> ctypes.CDLL | None:
    lib = compiled(_SOURCE, "int4/int8 layers")
    if lib is None:
        return None
    if lib.gptlab_kernels_isa() == 0:
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.gptlab_q4_matmul.argtypes = [i, i, i, p, p, p, p, p, p, i, p, p, p]
    lib.gptlab_q4_pack.argtypes = [i, i, p, p, p, p, p, p]
    lib.gptlab_q4_packs.argtypes = [i, i]
    lib.gptlab_q4_pack.restype = lib.gptlab_q4_packs.restype = i
    lib.gptlab_i8_pack.argtypes, lib.gptlab_i8_packs.argtypes = [i, i, p, p], [i, i]
    lib.gptlab_i8_matmul_packed.argtypes = [i, i, i, p, p, p, p, p, i]
    lib.gptlab_i8_pack.restype = lib.gptlab_i8_packs.restype = lib.gptlab_i8_matmul_packed.restype = i
    lib.gptlab_i8_matmul.argtypes = [i, i, i, p, p, p, p, p, i]
    lib.gptlab_i8_matmul_rounded.argtypes = [i, i, i, p, p, p, p, p, i]
    lib.gptlab_q4_matmul.restype = lib.gptlab_i8_matmul.restype = lib.gptlab_i8_matmul_rounded.restype = i
    lib.gptlab_i8_rounds_for.argtypes, lib.gptlab_i8_rounds_for.restype = [i], i
    lib.gptlab_rms_norm.argtypes = [i, i, p, p, ctypes.c_float, p]
    lib.gptlab_rms_norm.restype = None
    lib.gptlab_decode_layer.argtypes = [p, i, p, p, p, p, p, p, p, i, i]
    lib.gptlab_decode_layers.argtypes = [p, i, i, p, p, p, p, p, p, p, i, i]
    lib.gptlab_decode_layer.restype = lib.gptlab_decode_layers.restype = i
    lib.gptlab_int4_integer_path.argtypes = [i]
    lib.gptlab_int4_integer_path.restype = lib.gptlab_int4_integer_for.restype = i
    lib.gptlab_int4_integer_for.argtypes = [i]
    lib.gptlab_int4_integer_path(int(os.environ.get("GPTLAB_INT4_ACTIVATIONS", "int8").strip().lower() != "float"))
    return lib


def set_int4_activations(kind: str) -> str:
    """How int4 products treat the activations: ``"int8"`` (default; rounded to int8 per 32 inputs, as
    llama.cpp does: ~1.3x faster decoding, +0.8-1.5 % perplexity on SmolLM2) or ``"float"`` (exact).
    Also set by ``$GPTLAB_INT4_ACTIVATIONS``. Returns the previous setting."""
    if kind not in ("int8", "float"):
        raise ValueError(f"int4 activations {kind!r}: use int8 or float")
    lib = kernels()
    if lib is None:
        return "float"
    return "int8" if lib.gptlab_int4_integer_path(int(kind == "int8")) else "float"


def int4_rounds_activations(in_features: int) -> bool:
    """Whether an int4 product over ``in_features`` inputs takes the integer path here (x rounded to int8
    per 32 inputs: AVX2, or AVX-512 VNNI with an even number of groups) rather than float32 activations."""
    lib = kernels()
    return lib is not None and bool(lib.gptlab_int4_integer_for(in_features))


def usable(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether the native kernels take activations ``x`` (CPU, no gradient to record) on this machine."""
    if x.device.type != "cpu" or (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        return False
    return kernels() is not None


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x`` as contiguous float32 rows (M, K) (a view when it is already)."""
    x2 = x.reshape(-1, in_features)
    return x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.float().contiguous()


def _version(t: torch.Tensor) -> int:
    """How many in-place writes ``t`` has seen (-1 for an inference-mode tensor, which counts none)."""
    return -1 if t.is_inference() else t._version


def cached_pack(layer: nn.Module, sources: tuple[torch.Tensor, ...], make,
                slot: str = "_native_pack") -> tuple[torch.Tensor, ...] | None:
    """``layer``'s packed copy of ``sources``, made by ``make()`` (None: no copy) when there is none for
    these very tensors at these addresses and versions (an in-place write counts). Kept in
    ``layer.__dict__[slot]`` as (sources, their addresses and versions, *the copy): holding the
    sources, so a replaced one is never mistaken for its successor. (The native kernels' copies use
    ``"_native_pack"``; ``Int4Linear`` keeps PyTorch's int4 packing the same way.)"""
    ptrs = tuple((t.data_ptr(), _version(t)) for t in sources)  # (the version: an in-place write, e.g. load_state_dict)
    cached = layer.__dict__.get(slot)
    if cached is not None and all(map(operator.is_, cached[0], sources)) and cached[1] == ptrs:
        return cached[2:]
    copy = make()
    layer.__dict__[slot] = None if copy is None else (sources, ptrs, *copy)
    return copy


def packed_copy(layer: nn.Module) -> tuple[torch.Tensor, ...]:
    """The packed tensors a layer holds for the native kernels (empty when none): the plans point into them."""
    cached = layer.__dict__.get("_native_pack")
    return cached[2:] if cached is not None else ()


def packed_int4(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """An int4 layer's weights in the packed layout of the AVX-512 VNNI kernel (``gptlab_q4_pack`` in
    ``kernels.c``: blocks of 16 output rows, which one ``dpbusd`` fills at once), or None where that
    layout does not apply here (no VNNI, ``GPTLAB_INT4_ACTIVATIONS=float``, rows not a multiple of 16).

    Made on first use and kept on the layer (not in its state dict; remade when its codes, scale or
    minimum are replaced): as many bytes as the codes again, plus the scales and minimums as float32
    (~1.5x the layer's int4 buffers in all)."""
    lib = kernels()
    codes, scale, minimum = layer.codes, layer.scale, layer.minimum
    n, k = codes.shape[0], codes.shape[1] * 2
    if lib is None or codes.device.type != "cpu" or not lib.gptlab_q4_packs(n, k) \
            or not all(t.is_contiguous() for t in (codes, scale, minimum)):
        layer.__dict__.pop("_native_pack", None)  # (moved to a GPU, say: the old copy is not kept alive)
        return None

    def make():
        pc = torch.empty_like(codes)
        ps, pm = torch.empty(n, k // 32, dtype=torch.float32), torch.empty(n, k // 32, dtype=torch.float32)
        rc = lib.gptlab_q4_pack(n, k, codes.data_ptr(), scale.data_ptr(), minimum.data_ptr(), pc.data_ptr(),
                                ps.data_ptr(), pm.data_ptr())
        return None if rc else (pc, ps, pm)
    return cached_pack(layer, (codes, scale, minimum), make)


def packed_int8(layer: nn.Module) -> tuple[torch.Tensor] | None:
    """An int8 layer's weights in the packed layout of the AVX-512 VNNI kernel (``gptlab_i8_pack``: blocks
    of 16 output rows, each weight + 128), for an int4 model's head, whose input is rounded to int8 per
    32-group as the int4 layers round theirs; None where it does not apply here. Kept as
    :func:`packed_int4` keeps its copy: as many bytes as the weights again."""
    lib = kernels()
    q = layer.weight_int8
    n, k = q.shape
    if lib is None or q.device.type != "cpu" or not lib.gptlab_i8_packs(n, k) or not q.is_contiguous():
        layer.__dict__.pop("_native_pack", None)
        return None

    def make():
        packed = torch.empty(n, k, dtype=torch.uint8)
        return None if lib.gptlab_i8_pack(n, k, q.data_ptr(), packed.data_ptr()) else (packed,)
    return cached_pack(layer, (q,), make)


def q4_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
              bias: torch.Tensor | None, packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
              ) -> torch.Tensor:
    """``x @ Wᵀ + bias`` for an int4 layer's buffers (see ``kernels.c`` for the layout); float32 out.
    ``packed``: the same weights as :func:`packed_int4` gives them (then read instead)."""
    n, k = codes.shape[0], codes.shape[1] * 2
    x2 = _rows(x, k)
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    b = bias.float().contiguous() if bias is not None else None
    pc, ps, pm = (t.data_ptr() for t in packed) if packed is not None else (None, None, None)
    rc = kernels().gptlab_q4_matmul(x2.shape[0], n, k, x2.data_ptr(), codes.data_ptr(), scale.data_ptr(),
                                    minimum.data_ptr(), b.data_ptr() if b is not None else None, y.data_ptr(),
                                    torch.get_num_threads(), pc, ps, pm)
    if rc:
        raise ValueError(f"int4 kernel refused shapes x {tuple(x2.shape)}, codes {tuple(codes.shape)}")
    return y.reshape(*x.shape[:-1], n)


def i8_rounds_activations(in_features: int) -> bool:
    """Whether an int8 product with ``rounded=True`` over ``in_features`` inputs rounds x to int8 per 32-group
    here (AVX2 with the integer path on; see :func:`i8_matmul`)."""
    lib = kernels()
    return lib is not None and bool(lib.gptlab_i8_rounds_for(in_features))


def i8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              rounded: bool = False, packed: tuple[torch.Tensor] | None = None) -> torch.Tensor:
    """``x @ Wᵀ + bias`` for an int8 layer with one bf16 scale per output row; float32 out. ``rounded``: x may
    be rounded to int8 per 32-group first, as an int4 model's layers round theirs (an int4 model's head).
    ``packed``: the same weights as :func:`packed_int8` gives them; then x is rounded so and the packed
    copy read."""
    n, k = q.shape
    x2 = _rows(x, k)
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    b = bias.float().contiguous() if bias is not None else None
    bp = b.data_ptr() if b is not None else None
    lib = kernels()
    if packed is not None:
        rc = lib.gptlab_i8_matmul_packed(x2.shape[0], n, k, x2.data_ptr(), packed[0].data_ptr(), scale.data_ptr(),
                                         bp, y.data_ptr(), torch.get_num_threads())
    else:
        call = lib.gptlab_i8_matmul_rounded if rounded else lib.gptlab_i8_matmul
        rc = call(x2.shape[0], n, k, x2.data_ptr(), q.data_ptr(), scale.data_ptr(), bp, y.data_ptr(),
                  torch.get_num_threads())
    if rc:
        raise ValueError(f"int8 kernel refused shapes x {tuple(x2.shape)}, weights {tuple(q.shape)}")
    return y.reshape(*x.shape[:-1], n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight · x / sqrt(mean(x²) + eps)`` over the last dimension, float32 (one call, no temporaries)."""
    d = x.shape[-1]
    x2 = _rows(x, d)
    y = torch.empty_like(x2)
    kernels().gptlab_rms_norm(x2.shape[0], d, x2.data_ptr(), weight.data_ptr(), eps, y.data_ptr())
    return y.view(x.shape)


class NativeRMSNorm(RMSNorm):
    """A Llama RMSNorm that computes with :func:`rms_norm` where the native kernels take its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.float32 and self.weight.dtype == torch.float32 and not self.unit_offset
                and usable(x, self.weight)):
            return rms_norm(x, self.weight, self.eps)
        return super().forward(x)


def _swap(model: nn.Module, keep, native_cls: type, **settings) -> None:
    """Replace each submodule for which ``keep(module)`` holds by a ``native_cls`` sharing its parameters,
    buffers, submodules and settings (only ``forward`` differs), plus ``settings``."""
    for name, mod in list(model.named_modules()):
        if name and keep(mod):
            parent_name, _, child = name.rpartition(".")
            fast = native_cls.__new__(native_cls)
            fast.__dict__.update(mod.__dict__)
            fast.__dict__.update(settings)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fast)


def use_native_norms(model: nn.Module) -> nn.Module:
    """Let ``model``'s RMSNorms (inference, in place) compute with the native kernel where it exists."""
    if kernels() is not None:
        _swap(model, lambda m: type(m) is RMSNorm, NativeRMSNorm)
    return model


# ---- one decoder layer per call (decoding: one new token per row) ----

class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int), ("w", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("minimum", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("packed", ctypes.c_void_p), ("pscale", ctypes.c_void_p), ("pmin", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("d", ctypes.c_int), ("n_heads", ctypes.c_int), ("n_kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("hidden", ctypes.c_int), ("act", ctypes.c_int), ("eps", ctypes.c_float),
                ("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p)] + \
               [(name, _Linear) for name in ("q", "k", "v", "o", "gate", "up", "down")]


def _linear_struct(layer: nn.Module) -> _Linear | None:
    """The kernel's view of an int4/int8 layer (``Int4Linear``/``Int8Linear``, known by their buffers:
    this module is imported by theirs), or None if it is another kind or not laid out for it."""
    bias = getattr(layer, "bias", None)
    if bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous()):
        return None
    b = bias.data_ptr() if bias is not None else None
    if getattr(layer, "group_size", None) == 32 and hasattr(layer, "codes") and all(
            t.is_contiguous() for t in (layer.codes, layer.scale, layer.minimum)):
        packed = packed_int4(layer)
        pc, ps, pm = (t.data_ptr() for t in packed) if packed is not None else (None, None, None)
        return _Linear(4, layer.out_features, layer.in_features, layer.codes.data_ptr(), layer.scale.data_ptr(),
                       layer.minimum.data_ptr(), b, pc, ps, pm)
    if hasattr(layer, "weight_int8") and layer.weight_int8.is_contiguous() and layer.scale.is_contiguous():
        return _Linear(8, layer.out_features, layer.in_features, layer.weight_int8.data_ptr(),
                       layer.scale.data_ptr(), None, b)
    return None


def _step_inputs(x: torch.Tensor, cos: torch.Tensor, cache) -> bool:
    """Is this call a decode step the native layer takes: one new float32 token per row of a slot batch?"""
    return type(cache) is SlotBatch and x.dim() == 3 and x.shape[1] == 1 and x.dtype == torch.float32 \
        and cos.dim() == 4 and usable(x)


def _plan_key(held: list) -> tuple:
    """What a layer's plan depends on: each module's identity, each tensor's identity, address, dtype
    and version (an in-place write counts)."""
    return tuple((id(t), t.data_ptr(), t.dtype, _version(t)) if isinstance(t, torch.Tensor) else id(t) for t in held)


class NativeDecoderLayer(DecoderLayer):
    """A Llama decoder layer that decodes (one new token per row of a slot batch) in one native call.

    Everything else (prefill, training, a ring cache, float projections) runs the module's own forward.
    The kernel holds pointers to this layer's tensors: the plan is rebuilt whenever one of them is replaced
    or moves (a reload, ``.to()``, ``p.data = ...``: the key is each tensor's identity, address and dtype),
    and holds them alive while it is cached. Copies and pickles leave the plan behind.
    """

    act: int = 0  # 0: SiLU, 1: GELU (tanh)

    def _held(self) -> list:
        """The modules the kernel reads and every tensor they hold, straight from their dicts (cheap: a
        decode step checks these are still the same objects at the same addresses)."""
        mods = self.__dict__["_modules"]
        a, m = mods["self_attn"]._modules, mods["mlp"]._modules
        held = [a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"], m["gate_proj"], m["up_proj"], m["down_proj"],
                mods["input_layernorm"], mods["post_attention_layernorm"]]
        for mod in held[:9]:
            held += mod._buffers.values()
            held += mod._parameters.values()
            held += packed_copy(mod)  # (packed_int4: the plan points into it too)
        return held

    def _plan(self) -> _Layer | None:
        tensors = self._held()
        linears, norms = tensors[:7], tensors[7:9]
        key = _plan_key(tensors)
        cached = self.__dict__.get("_native_plan")
        if cached is not None and cached[0] == key:
            return cached[1]
        plan = None
        structs = [_linear_struct(t) for t in linears]
        if all(structs) and all(type(n) in (RMSNorm, NativeRMSNorm) and not n.unit_offset
                                and n.weight.dtype == torch.float32 and n.weight.is_contiguous() for n in norms):
            attn = self.self_attn
            plan = _Layer(norms[0].weight.shape[0], attn.n_heads, attn.n_kv_heads, attn.head_dim,
                          linears[6].in_features, self.act, norms[0].eps, norms[0].weight.data_ptr(),
                          norms[1].weight.data_ptr(), *structs)
            if norms[1].eps != norms[0].eps:
                plan = None
        if any(s is not None and s.packed for s in structs):  # packed just now: what the plan points into
            tensors = self._held()
            key = _plan_key(tensors)
        self.__dict__["_native_plan"] = (key, plan, tensors)  # the tensors: alive while their ids are the key
        return plan

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_native_plan", None)  # raw pointers into this object's tensors: never copied
        return state

    def _decodes_with(self, store, layer: int) -> _Layer | None:
        """This layer's plan if it can decode into ``store``'s cache of layer ``layer``, else None."""
        kc, vc = store.k[layer], store.v[layer]
        window = self.self_attn.window
        if kc.dtype != torch.float32 or not (kc.is_contiguous() and vc.is_contiguous()) \
                or kc.shape[2] != store.max_len or vc.shape != kc.shape \
                or (window is not None and window < store.max_len):
            return None
        return self._plan()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache=None, layer: int = 0) -> torch.Tensor:
        if _step_inputs(x, cos, cache):
            store = cache.cache
            plan = self._decodes_with(store, layer)
            if plan is not None:
                return _decode(kernels().gptlab_decode_layer, ctypes.byref(plan), x, cos, sin, cache,
                               store.k[layer].data_ptr(), store.v[layer].data_ptr())
        return super().forward(x, cos, sin, cache, layer)


class NativeLayerStack(nn.ModuleList):
    """A model's decoder layers (the same modules and state-dict keys) that run a whole decode step in
    one native call when every layer can (``decode``); the model's own loop runs otherwise (also when a
    forward hook is registered on a layer or globally: the single call would skip it)."""

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor | None:
        """Every layer's output for a decode step, or None when some layer or the call is not for it."""
        if not _step_inputs(x, cos, cache) or _hooked(self):
            return None
        store = cache.cache
        cached = store.__dict__.get("_native_stack")
        if cached is None or not cached.current(self, store, cache.slots):
            plans = []
            for i, layer in enumerate(self):
                plan = layer._decodes_with(store, i) if type(layer) is NativeDecoderLayer else None
                if plan is None:
                    return None
                plans.append(plan)
            # The arrays live on the cache store (they point into its k/v buffers): they go when it does.
            cached = store.__dict__["_native_stack"] = _StackPlan(self, store, plans)
        return _decode(lambda *a: kernels().gptlab_decode_layers(cached.layers, len(self), *a), None, x, cos, sin,
                       cache, cached.kcs, cached.vcs)


FULL_CHECK_EVERY = 16  # decode steps between a stack plan's full checks while its batch stays the same


class _StackPlan:
    """A whole stack's decode arrays for one cache store, and what they were built from.

    The full check (:meth:`still_valid`) verifies, in one pass, that the layers, the cache's k/v buffers
    and every module and tensor a layer holds are the same objects (identity) at the same addresses,
    with the same attention windows; any change rebuilds the plans, every layer's own checks included.
    It touches ~1,800 objects that the step's weight traffic has pushed out of the CPU caches: ~1.2 ms,
    an eighth of a batch-1 step of a 30-layer model. So it runs when the plan is new, when the batch's rows
    change (a request joins or leaves: weights swapped between requests are seen at once) and every
    :data:`FULL_CHECK_EVERY` steps; the other steps check the layer objects and the cache's buffers only.
    A weight replaced in the middle of a batch is used from the next full check on, and the kernel never
    reads freed memory meanwhile: the plan keeps every storage it points into alive (``pinned``).
    """

    def __init__(self, stack: "NativeLayerStack", store, plans: list):
        n = len(plans)
        self.stack_id, self.plans = id(stack), plans  # the plans stay alive: the arrays point at their tensors
        self.layers = (_Layer * n)(*plans)
        self.kcs = (ctypes.c_void_p * n)(*(t.data_ptr() for t in store.k))
        self.vcs = (ctypes.c_void_p * n)(*(t.data_ptr() for t in store.v))
        self.held, self.ptrs, self.windows = self._snapshot(stack, store)
        self.pinned = [t.untyped_storage() for t in self.held if isinstance(t, torch.Tensor)]
        self.rows: list[int] | None = None  # the batch's slots at the last step
        self.unchecked = 0  # steps since the last full check

    def current(self, stack, store, slots: torch.Tensor) -> bool:
        """May this plan run the step? The same layer objects, and the full check passing when it is due."""
        layers, n = stack._modules.values(), len(self.plans)
        if id(stack) != self.stack_id or len(layers) != n or not all(map(operator.is_, layers, self.held)) \
                or not all(map(operator.is_, [*store.k, *store.v], self.held[n:3 * n])):
            return False
        rows = slots.tolist()
        self.unchecked += 1
        if rows == self.rows and self.unchecked < FULL_CHECK_EVERY:
            return True
        if not self.still_valid(stack, store):  # a full check (see the class docstring)
            return False
        self.rows, self.unchecked = rows, 0
        return True

    @staticmethod
    def _snapshot(stack, store) -> tuple[list, list[int], list]:
        """(every layer and cache buffer and what each layer holds, their addresses (and the layers' tensors'
        versions: an in-place write, e.g. ``load_state_dict``, counts as a change), the layers' windows)."""
        layers = list(stack._modules.values())
        cache = [*store.k, *store.v]  # (written every step: their versions move)
        held = [*layers, *cache]
        for layer in layers:
            held += layer._held()
        ptrs = [t.data_ptr() for t in cache] + [(t.data_ptr(), _version(t)) for t in held[len(layers) + len(cache):]
                                                if isinstance(t, torch.Tensor)]
        return held, ptrs, [layer.__dict__["_modules"]["self_attn"].window for layer in layers]

    def still_valid(self, stack, store) -> bool:
        """The full check, after :meth:`current` found the same layer objects (so each has ``_held()``)."""
        held, ptrs, windows = self._snapshot(stack, store)
        return (len(held) == len(self.held) and all(map(operator.is_, held, self.held)) and ptrs == self.ptrs
                and windows == self.windows)


def _hooked(layers: nn.ModuleList) -> bool:
    """Whether a forward hook would see the layers' calls (on a layer, or on every module)."""
    from torch.nn.modules import module as M

    return bool(getattr(M, "_global_forward_hooks", None) or getattr(M, "_global_forward_pre_hooks", None)) or any(
        m._forward_hooks or m._forward_pre_hooks for m in layers)


def _decode(call, plan, x, cos, sin, cache, kc, vc) -> torch.Tensor:
    """Run a native decode ``call`` (one layer with ``plan``, or the stack when plan is None) on ``x``."""
    B = x.shape[0]
    out = x.contiguous().clone()  # (B, 1, d), updated in place by the kernel
    cos2, sin2 = cos.reshape(B, -1).contiguous(), sin.reshape(B, -1).contiguous()  # (B, hd)
    slots = cache.slots.to(torch.int64).contiguous()  # (B,)
    pos = cache.pos.reshape(B).to(torch.int64).contiguous()  # (B,)
    args = (B, out.data_ptr(), cos2.data_ptr(), sin2.data_ptr(), kc, vc, slots.data_ptr(), pos.data_ptr(),
            cache.cache.max_len, torch.get_num_threads())
    rc = call(*args) if plan is None else call(plan, *args)
    if rc:
        raise RuntimeError(f"the native decoder layer failed (code {rc}) at positions {pos.tolist()}")
    return out


def use_native_layers(model: nn.Module) -> nn.Module:
    """Let a quantized Llama-family ``model`` decode each layer in one native call, and a whole step in one
    (in place; see :class:`NativeDecoderLayer`, :class:`NativeLayerStack`). Norms and other layers use the
    native kernels too where they exist."""
    if kernels() is None:
        return model
    use_native_norms(model)
    cfg = getattr(model, "cfg", None)
    act = {"silu": 0, "gelu_tanh": 1}.get(getattr(cfg, "mlp_act", "silu"))
    if act is not None:
        _swap(model, lambda m: type(m) is DecoderLayer and type(m.mlp) is GatedMLP, NativeDecoderLayer, act=act)
        if type(getattr(model, "layers", None)) is nn.ModuleList:
            model.layers.__class__ = NativeLayerStack  # the same list: a decode step is then one native call
    return model
