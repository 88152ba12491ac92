"""What the fit planner knows about a model: exact sizes, read from its config.

A :class:`ModelSpec` holds only the numbers the estimator needs: layer and head
shapes (for the KV cache), the exact parameter counts split the way memory and
speed need them (input lookup tables, output head, total vs. active for
mixture-of-experts), and the format the weights ship in.

Every spec carries a ``ModelConfig`` and its sizes come from that config's
methods (``param_counts``, ``kv_cache_bytes``, ``flops_per_token``,
``attended_tokens``) — the ones ``gptlab inspect`` prints. A gptlab preset or
run directory brings its own config; a checkpoint of an architecture without a
gptlab family (Qwen3, Mixtral, any GGUF file) becomes a :class:`CountedConfig`:
its shapes plus the parameter counts read from the checkpoint, so the same
methods size it.

Sources (``spec_from_ref`` picks by the reference's shape):

- a gptlab preset name (``llama-3-8b``) -> ``ModelConfig.param_counts()``;
- a gptlab model or run directory (``config.json`` with ``"format": "gptlab"``,
  or ``RUN/model/``);
- a Hugging Face ``config.json`` (or the directory holding it) -> counted from
  the HF keys (``hidden_size``, ``num_key_value_heads``, ``num_local_experts`` ...);
- a GGUF file -> architecture metadata plus the exact element and byte count of
  every tensor (so the weight size of a quantized file is exact), and the file's
  format: ``general.file_type`` (``Q4_1``, ``Q4_K_M`` ...), else the tensor type
  holding most weights;
- ``pkg:PACKAGE/FILE`` -> a file shipped inside an installed Python package.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from gptlab.errors import GptlabError
from gptlab.models.config import ConfigError, ModelConfig, get_preset, list_presets


@dataclass
class CountedConfig(ModelConfig):
    """The shapes and exact parameter counts of a checkpoint gptlab has no family for.

    ``counts`` is a ``param_counts()`` dict read from the checkpoint (a Hugging
    Face ``config.json``'s keys, a GGUF file's tensors); ``ModelConfig``'s sizing
    methods then run on it unchanged. Not buildable: there is no model class.
    """

    family: ClassVar[str] = "counted"

    arch: str = "unknown"  # the checkpoint's architecture name (qwen3, mixtral, a GGUF general.architecture)
    sliding_window: int | None = None
    counts: dict = field(default_factory=dict)

    def param_counts(self) -> dict[str, int]:
        return dict(self.counts)


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of one model, as needed for memory and speed estimates.

    ``params_embedding`` are the input lookup tables (token and learned position
    embeddings): a token reads one row of them, not the whole matrix.
    ``params_lm_head`` is the output projection V·d, which every token reads in
    full; when ``tied`` it is the token-embedding matrix and is not counted twice
    in ``params_total``.

    For a GGUF file, ``native_quant`` names the file's format and the
    ``native_*_bytes`` are summed from its tensors: ``native_weight_bytes`` all
    of them, ``native_read_bytes`` what one decode step reads (the same split as
    the parameters: one row of the input embeddings, the head in full, the
    active share of the experts).
    """

    name: str
    source: str  # "preset" | "gptlab" | "hf" | "gguf"
    arch: str  # a gptlab family (gpt2, llama) or a CountedConfig's architecture
    n_layers: int
    emb_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    params_total: int
    params_active: int
    params_embedding: int
    params_lm_head: int
    tied: bool
    sliding_window: int | None = None
    n_experts: int = 0
    n_experts_active: int = 0
    native_quant: str = "BF16"
    native_weight_bytes: int | None = None  # exact, for GGUF files
    native_read_bytes: int | None = None  # exact, for GGUF files
    path: str | None = None
    config: ModelConfig | None = field(default=None, compare=False, repr=False)  # where every size comes from

    @property
    def family(self) -> str:
        return self.arch

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("config")
        return d


# ---------------------------------------------------------------- gptlab configs
def spec_from_config(cfg: ModelConfig, source: str = "preset", path: str | None = None,
                     native_quant: str | None = None, **native: Any) -> ModelSpec:
    """A spec from a ``ModelConfig``: every count from ``param_counts()``, shapes from its fields.

    ``native`` carries a GGUF file's exact ``native_weight_bytes`` / ``native_read_bytes``.
    """
    try:
        c = cfg.param_counts()
    except NotImplementedError:
        raise GptlabError(f"the {cfg.family} family cannot count its parameters yet") from None
    arch = cfg.arch if isinstance(cfg, CountedConfig) else cfg.family
    if native_quant is None:
        native_quant = "F32" if cfg.family == "gpt2" else "BF16"
    return ModelSpec(
        name=cfg.name, source=source, arch=arch, n_layers=cfg.n_layers, emb_dim=cfg.emb_dim,
        n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size, context_length=cfg.context_length,
        params_total=c["total"], params_active=cfg.active_params(), params_embedding=c["embedding"],
        params_lm_head=c["lm_head"], tied=bool(cfg.tie_embeddings),
        sliding_window=getattr(cfg, "sliding_window", None) or None,
        n_experts=c.get("experts", 0), n_experts_active=c.get("experts_active", 0),
        native_quant=native_quant, path=path, config=cfg, **native,
    )


def counted_config(name: str, arch: str, *, L: int, d: int, H: int, Hkv: int, hd: int, V: int, ctx: int,
                   total: int, active: int, embedding: int, tied: bool, F: int | None = None,
                   window: int | None = None, experts: tuple[int, int] = (0, 0)) -> CountedConfig:
    """A :class:`CountedConfig` from a checkpoint's shapes and counts (the head is V·d, once if tied)."""
    counts = {"total": total, "active": active, "embedding": embedding, "non_embedding": total - embedding,
              "lm_head": V * d, "tied": V * d if tied else 0, "experts": experts[0], "experts_active": experts[1]}
    try:
        return CountedConfig(name=name, arch=arch, n_layers=L, emb_dim=d, n_heads=H, n_kv_heads=Hkv, head_dim=hd,
                             vocab_size=V, context_length=ctx, hidden_dim=F, tie_embeddings=tied,
                             sliding_window=window or None, counts=counts)
    except ConfigError as e:
        raise GptlabError(f"{name}: {e}") from None


# ---------------------------------------------------------------- HF config.json
def _get(cfg: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def spec_from_hf_config(cfg: dict, name: str = "hf-model", path: str | None = None) -> ModelSpec:
    """Count parameters exactly from a Hugging Face ``config.json`` dict.

    Covers GPT-2 (``n_embd``...) and the Llama-style decoders (Llama, Mistral,
    Mixtral, Qwen2/3, Gemma, SmolLM ...): gated MLP, optional q/k/v bias
    (``attention_bias``; Qwen2 always), Qwen3's per-head q/k norms, and
    mixture-of-experts (``num_local_experts``/``num_experts`` with
    ``num_experts_per_tok``; ``moe_intermediate_size`` and a shared expert if given).
    """
    if "text_config" in cfg:  # multimodal wrappers keep the language model here
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    mtype = str(cfg.get("model_type", "")).lower()
    where = path or name
    try:
        if mtype == "gpt2" or "n_embd" in cfg:
            return _hf_gpt2(cfg, name, path)
        return _hf_llama_like(cfg, mtype, name, path)
    except KeyError as e:
        raise GptlabError(f"{where}: config.json lacks key {e}; is it a decoder-only LM config?") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise GptlabError(f"{where}: config.json has an invalid size ({e})") from None


def _hf_gpt2(cfg: dict, name: str, path: str | None) -> ModelSpec:
    d, L, H, V = cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["vocab_size"]
    ctx = _get(cfg, "n_positions", "n_ctx")
    F = cfg.get("n_inner") or 4 * d
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * F + F + F * d + d) + 4 * d
    tied = cfg.get("tie_word_embeddings", True)
    total = V * d + ctx * d + L * block + 2 * d + (0 if tied else V * d)
    counted = counted_config(name, "gpt2", L=L, d=d, H=H, Hkv=H, hd=d // H, V=V, ctx=ctx, total=total,
                             active=total, embedding=V * d + ctx * d, tied=tied, F=F)
    return spec_from_config(counted, "hf", path, native_quant=_hf_dtype(cfg, "F32"))


def _hf_dtype(cfg: dict, default: str) -> str:
    dt = str(_get(cfg, "torch_dtype", "dtype", default="")).lower()
    return {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(dt, default)


def _hf_llama_like(cfg: dict, mtype: str, name: str, path: str | None) -> ModelSpec:
    d, L, H, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["vocab_size"]
    Hkv = _get(cfg, "num_key_value_heads", default=H)
    hd = _get(cfg, "head_dim", default=d // H)
    F = cfg["intermediate_size"]
    q, kv = H * hd, Hkv * hd
    attn = d * q + 2 * d * kv + q * d
    if mtype.startswith("qwen2"):
        attn += q + 2 * kv  # Qwen2: q/k/v biases, unconditionally; none on o_proj
    elif cfg.get("attention_bias"):
        attn += q + 2 * kv + d  # Llama-style attention_bias: all four projections
    if mtype.startswith("qwen3"):
        attn += 2 * hd  # per-head RMSNorm on q and k
    mlp_bias = 2 * F + d if cfg.get("mlp_bias") else 0
    E = _get(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0
    k = _get(cfg, "num_experts_per_tok", default=0) or 0
    if E:
        Fe = _get(cfg, "moe_intermediate_size", default=F)
        Fs = _get(cfg, "shared_expert_intermediate_size", default=0) or 0
        shared = 3 * d * Fs + (d if Fs else 0)  # shared expert + its sigmoid gate (Qwen2-MoE)
        router = d * E
        mlp_total = router + E * 3 * d * Fe + shared
        mlp_active = router + k * 3 * d * Fe + shared
    else:
        mlp_total = mlp_active = 3 * d * F + mlp_bias
    norms = 2 * d
    tied = bool(cfg.get("tie_word_embeddings", False))
    emb = V * d
    head = 0 if tied else V * d
    total = emb + L * (attn + mlp_total + norms) + d + head
    active = emb + L * (attn + mlp_active + norms) + d + head
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    counted = counted_config(name, mtype or "llama", L=L, d=d, H=H, Hkv=Hkv, hd=hd, V=V,
                             ctx=_get(cfg, "max_position_embeddings", default=4096), total=total, active=active,
                             embedding=emb, tied=tied, F=F, window=window, experts=(E, k))
    return spec_from_config(counted, "hf", path, native_quant=_hf_dtype(cfg, "BF16"))


# ---------------------------------------------------------------- GGUF files
def spec_from_gguf(path: str | Path) -> ModelSpec:
    """Sizes from a GGUF file: metadata for shapes, every tensor for exact counts and bytes.

    Parsed once per (path, size, mtime): the metadata holds the whole vocabulary.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise GptlabError(f"{path} cannot be read ({e})") from None
    return _spec_from_gguf_cached(str(path), st.st_size, st.st_mtime_ns)


def file_type_name(meta: dict[str, Any]) -> str | None:
    """The file's format from ``general.file_type`` (llama.cpp's ``LLAMA_FTYPE``): ``Q4_1``, ``Q4_K_M`` ...

    None when the key is absent or says "guessed": the caller then names the
    tensor type holding most weights.
    """
    from gguf import LlamaFileType

    try:
        ftype = LlamaFileType(int(meta["general.file_type"]))
    except (KeyError, TypeError, ValueError):
        return None
    if ftype == LlamaFileType.GUESSED:
        return None
    return ftype.name.removeprefix("MOSTLY_").removeprefix("ALL_")


@functools.lru_cache(maxsize=32)
def _spec_from_gguf_cached(path_str: str, _size: int, _mtime: int) -> ModelSpec:
    from gptlab.weights.gguf import read_gguf

    path = Path(path_str)
    f = read_gguf(path)  # header, metadata and tensor table only; the data stays unread

    def meta(key: str, default: Any = None) -> Any:
        v = f.meta.get(key)
        return default if v is None else v

    arch = meta("general.architecture")
    if arch is None:
        raise GptlabError(f"{path}: GGUF file has no general.architecture; is it a model file?")
    L = meta(f"{arch}.block_count")
    d = meta(f"{arch}.embedding_length")
    H = meta(f"{arch}.attention.head_count")
    if None in (L, d, H):
        raise GptlabError(f"{path}: GGUF metadata lacks {arch}.block_count/embedding_length/head_count")
    Hkv = meta(f"{arch}.attention.head_count_kv", H)
    hd = meta(f"{arch}.attention.key_length", d // H)
    E = meta(f"{arch}.expert_count", 0) or 0
    k = meta(f"{arch}.expert_used_count", 0) or 0
    total = expert = emb = 0  # elements
    nbytes = emb_bytes = tok_bytes = expert_bytes = 0
    vocab, has_output, types = None, False, {}
    for name, t in f.tensors.items():
        n = math.prod(t.shape)
        total += n
        nbytes += t.nbytes
        types[t.type_name] = types.get(t.type_name, 0) + n
        if name == "token_embd.weight":
            emb += n
            emb_bytes += t.nbytes
            tok_bytes = t.nbytes
            vocab = n // d
        elif name == "position_embd.weight":
            emb += n
            emb_bytes += t.nbytes
        elif name == "output.weight":
            has_output = True
        if "_exps." in name:
            expert += n
            expert_bytes += t.nbytes
    vocab = vocab or meta(f"{arch}.vocab_size") or len(meta("tokenizer.ggml.tokens", []))
    active = total - (expert - expert * k // E if E else 0)
    tied = not has_output
    # A decode step reads every tensor but the input lookup tables (one row each), the
    # tied head in full, and k of E experts: the same split as params_active - embedding.
    read = nbytes - emb_bytes + (tok_bytes if tied else 0) - (expert_bytes - expert_bytes * k // E if E else 0)
    main = file_type_name(f.meta) or (max(types, key=types.get) if types else "F32")
    counted = counted_config(path.name, arch, L=L, d=d, H=H, Hkv=Hkv, hd=hd, V=vocab,
                             ctx=meta(f"{arch}.context_length", 2048), total=total, active=active, embedding=emb,
                             tied=tied, window=meta(f"{arch}.attention.sliding_window"), experts=(E, k))
    return spec_from_config(counted, "gguf", str(path), native_quant=main, native_weight_bytes=nbytes,
                            native_read_bytes=read)


# ---------------------------------------------------------------- references
def resolve_path(ref: str) -> Path | None:
    """``pkg:PACKAGE/FILE`` or a filesystem path -> an existing Path (None if not a path)."""
    if ref.startswith("pkg:"):
        from gptlab.refs import package_path

        return package_path(ref)
    p = Path(ref).expanduser()
    return p if p.exists() else None


def spec_from_ref(ref: str) -> ModelSpec:
    """Resolve a model reference (preset name, directory, config.json, GGUF, pkg:...) to a spec."""
    path = resolve_path(ref)
    if path is None:
        if ref in list_presets():
            return spec_from_config(get_preset(ref), "preset")
        raise GptlabError(
            f"model {ref!r} is neither a gptlab preset nor an existing file or directory; "
            f"presets: {', '.join(list_presets())}"
        )
    if path.is_file() and path.suffix.lower() == ".gguf":
        return spec_from_gguf(path)
    if path.is_dir():
        if (path / "model" / "config.json").is_file() and not (path / "config.json").is_file():
            path = path / "model"  # a training run directory
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return spec_from_gguf(ggufs[0])
            raise GptlabError(f"{path} has no config.json (or single .gguf); point at a model directory or file")
    elif path.name.endswith(".json"):
        cfg_path = path
    else:
        raise GptlabError(f"{path}: expected a .gguf file, a config.json or a model directory")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GptlabError(f"{cfg_path} is not valid JSON ({e})") from None
    name = cfg_path.parent.name or cfg_path.stem
    if raw.get("format") == "gptlab":
        try:
            cfg = ModelConfig.from_dict(raw["model"])
        except (ConfigError, KeyError, TypeError) as e:
            raise GptlabError(f"{cfg_path}: invalid gptlab model config ({e})") from None
        cfg.name = name
        return spec_from_config(cfg, "gptlab", str(cfg_path.parent))
    return spec_from_hf_config(raw, name, str(cfg_path))


def catalog(extra_refs: list[str] | None = None) -> list[ModelSpec]:
    """Every gptlab preset plus the given extra references, one spec each."""
    specs = []
    for name in list_presets():
        try:
            specs.append(spec_from_config(get_preset(name), "preset"))
        except GptlabError:
            continue  # a family without param_counts yet
    specs += [spec_from_ref(r) for r in extra_refs or []]
    return specs
