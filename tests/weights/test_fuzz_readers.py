"""Damaged checkpoints: every truncation, bit flip or absurd header field is a clean GptlabError (or a load).

Hypothesis mutates a valid tiny GGUF file, a valid gptlab model directory (safetensors + config.json) and a
Hugging Face directory; ``load_model`` must either load the file or raise GptlabError — never an
OverflowError, MemoryError, IndexError, KeyError or a traceback from deep inside a reader.
"""

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_helpers import hf_llama_to_gguf  # noqa: E402

from gptlab.errors import GptlabError
from gptlab.models import build_model
from gptlab.models.gpt2 import GPT2Config
from gptlab.weights import load_model
from gptlab.weights.native import save_model_dir

transformers = pytest.importorskip("transformers")
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32)).eval()
    gguf = hf_llama_to_gguf(hf, root / "m.gguf")
    hf.save_pretrained(root / "hf")
    native = save_model_dir(build_model(GPT2Config(vocab_size=50, context_length=8, emb_dim=16, n_layers=1,
                                                   n_heads=2)), root / "native")
    return {"gguf": gguf, "native": native, "hf": root / "hf"}


def _loads_or_refuses(path) -> None:
    try:
        load_model(str(path))
    except GptlabError as e:
        assert "\n" not in str(e).strip(), str(e)  # one line


def _mutate(data: bytes, cut: int | None, flips: list[tuple[int, int]], field: tuple[int, int] | None,
            header: int) -> bytes:
    b = bytearray(data)
    for pos, bit in flips:  # bit flips, mostly in the header where the counts and lengths live
        b[pos % header] ^= 1 << bit
    if field is not None:  # an absurd 8-byte header field (a count, a length, an offset)
        pos, value = field
        pos %= max(1, header - 8)
        b[pos:pos + 8] = struct.pack("<Q", value)
    if cut is not None:
        b = b[:cut % (len(b) + 1)]
    return bytes(b)


flips = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 7)), max_size=4)
fields = st.none() | st.tuples(st.integers(0, 1 << 20), st.sampled_from([0, 1, 2 ** 31, 2 ** 40, 10 ** 12, 2 ** 64 - 1]))
cuts = st.none() | st.integers(0, 1 << 20)


@FUZZ
@given(cut=cuts, flip=flips, field=fields)
def test_gguf_mutations(originals, tmp_path, cut, flip, field):
    data = originals["gguf"].read_bytes()
    p = tmp_path / "m.gguf"
    p.write_bytes(_mutate(data, cut, flip, field, header=min(len(data), 4096)))
    _loads_or_refuses(p)


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


@FUZZ
@given(cut=cuts, flip=flips, field=fields)
def test_safetensors_mutations(originals, tmp_path, cut, flip, field):
    for kind, name in (("native", "model.safetensors"), ("hf", "model.safetensors")):
        d = _copy(originals[kind], tmp_path / kind)
        data = (d / name).read_bytes()
        header = 8 + struct.unpack("<Q", data[:8])[0]
        (d / name).write_bytes(_mutate(data, cut, flip, field, header=header))
        _loads_or_refuses(d)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=5),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                           max_leaves=6)


@FUZZ
@given(whole=st.booleans(), key_path=st.integers(0, 50), value=json_values)
def test_config_json_mutations(originals, tmp_path, whole, key_path, value):
    for kind in ("native", "hf"):
        d = _copy(originals[kind], tmp_path / kind)
        cfg = json.loads((d / "config.json").read_text())
        if whole:
            cfg = value  # e.g. a JSON list where an object belongs
        else:  # one field replaced by a value of any type, nested fields included
            target = cfg["model"] if kind == "native" else cfg
            keys = sorted(target)
            target[keys[key_path % len(keys)]] = value
        (d / "config.json").write_text(json.dumps(cfg))
        _loads_or_refuses(d)


def test_absurd_gguf_counts_and_a_short_file(tmp_path):
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10 ** 12, 10 ** 12))
    with pytest.raises(GptlabError, match="tensor count 1000000000000 .* cannot fit"):
        load_model(str(huge))
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF" + bytes(11))  # 15 bytes that start with the magic
    with pytest.raises(GptlabError, match="truncated: 15 bytes"):
        load_model(str(short))


@pytest.mark.parametrize("key, value", [("llama.block_count", 2 ** 31), ("llama.attention.head_count", 0)])
def test_absurd_header_values_are_refused_before_a_model_is_built(originals, tmp_path, key, value):
    """A block count of 2^31 once built 2^31 empty layers (24 GB) before any check; n_heads 0 divided by zero."""
    import gguf

    from gptlab.weights.gguf import read_gguf

    f = read_gguf(originals["gguf"])
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for k, v in f.meta.items():
        if k.startswith("general.architecture") or k.startswith("GGUF.") or k.startswith("__"):
            continue
        v = value if k == key else v
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v) if v >= 0 else w.add_int32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
    for name, t in f.tensors.items():
        w.add_tensor(name, f.to_torch(name).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GptlabError) as e:
        load_model(str(tmp_path / "bad.gguf"))
    assert "\n" not in str(e.value)
