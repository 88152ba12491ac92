"""Bits per weight derived from the block layouts, checked against llama.cpp's own table."""

import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from gptlab.errors import GptlabError
from gptlab.fit.quant import BLOCKS, QUANTS, block_bits, get_quant, kv_bytes_per_element


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_layout_matches_llama_cpp(name):
    weights, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    n, fields = BLOCKS[name]
    assert (n, sum(fields.values())) == (weights, type_size)
    assert block_bits(name) == pytest.approx(8 * type_size / weights)


def test_published_bits_per_weight():
    exact = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.5625, "Q4_0": 4.5, "Q4_1": 5.0}
    for name, bits in exact.items():
        assert QUANTS[name].bits == bits and QUANTS[name].exact
    # Mixes are approximations of llama.cpp's published averages.
    assert 4.8 <= QUANTS["Q4_K_M"].bits <= 4.9 and not QUANTS["Q4_K_M"].exact
    assert 5.5 <= QUANTS["Q5_K_M"].bits <= 5.7
    assert 3.85 <= QUANTS["Q3_K_M"].bits <= 3.95
    assert QUANTS["Q2_K"].bits == pytest.approx(2.625)


def test_lookup_and_errors():
    assert get_quant("q4_k_m").name == "Q4_K_M"
    assert get_quant("fp32").name == "F32" and get_quant("bfloat16").name == "BF16"
    assert kv_bytes_per_element("f16") == 2 and kv_bytes_per_element("q8_0") == pytest.approx(34 / 32)
    with pytest.raises(GptlabError, match="unknown quant 'Q7'.*Q4_K_M"):
        get_quant("Q7")
    with pytest.raises(GptlabError, match="unknown KV-cache format 'int3'"):
        kv_bytes_per_element("int3")
