"""Our GGUF dequantizers against llama.cpp's reference (``gguf.quants.dequantize``)."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from gptlab.errors import GptlabError
from gptlab.weights.dequant import FORMATS, dequantize

# byte offsets of the f16 scale fields inside one block, per format
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw blocks whose f16 scale fields hold finite, moderate values."""
    per_block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    assert (per_block, nbytes) == FORMATS[name][:2]
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        raw[:, off:off + 2] = rng.normal(0, 0.05, size=(n_blocks, 1)).astype("<f2").view(np.uint8)
    return raw


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_blocks_match_reference(name):
    rng = np.random.default_rng(0)
    rows, per_row_blocks = 6, 3
    raw = random_blocks(name, rows * per_row_blocks, rng)
    per_block, nbytes = FORMATS[name][:2]
    shape = (rows, per_row_blocks * per_block)
    ours = dequantize(raw, name, shape)
    ref = ref_dequantize(raw.reshape(rows, per_row_blocks * nbytes), GGMLQuantizationType[name])
    assert ours.shape == ref.shape == shape
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1"])
def test_roundtrip_through_reference_quantizer(name):
    # Quantize real-looking weights with llama.cpp's quantizer, dequantize with ours.
    w = np.random.default_rng(1).normal(0, 0.02, size=(8, 128)).astype(np.float32)
    q = ref_quantize(w, GGMLQuantizationType[name])
    ours = dequantize(q, name, w.shape)
    np.testing.assert_allclose(ours, ref_dequantize(q, GGMLQuantizationType[name]), rtol=1e-6, atol=1e-8)
    assert np.abs(ours - w).max() < (0.01 if name == "Q8_0" else 0.03)


@pytest.mark.parametrize("name,np_dtype", [("F32", "<f4"), ("F16", "<f2")])
def test_float_types(name, np_dtype):
    w = np.random.default_rng(2).normal(size=(3, 5)).astype(np_dtype)
    np.testing.assert_array_equal(dequantize(w, name, (3, 5)), w.astype(np.float32))


def test_bf16():
    w = np.random.default_rng(3).normal(size=(4, 7)).astype(np.float32)
    q = ref_quantize(w, GGMLQuantizationType.BF16)
    ours = dequantize(q, "BF16", (4, 7))
    np.testing.assert_array_equal(ours, ref_dequantize(q, GGMLQuantizationType.BF16))
    assert np.abs(ours - w).max() < 0.02


def test_chunking_does_not_change_result():
    raw = random_blocks("Q6_K", 10, np.random.default_rng(4))
    a = dequantize(raw, "Q6_K", (10, 256))
    b = dequantize(raw, "Q6_K", (10, 256), chunk_blocks=3)
    np.testing.assert_array_equal(a, b)


def test_bad_input():
    with pytest.raises(GptlabError, match="IQ2_XS is not supported"):
        dequantize(np.zeros(74, np.uint8), "IQ2_XS", (256,))
    with pytest.raises(GptlabError, match="corrupt or truncated"):
        dequantize(np.zeros(33, np.uint8), "Q8_0", (32,))
