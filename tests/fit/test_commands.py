"""`gptlab fit` end to end through the CLI: table, plan, JSON, errors."""

import json

import pytest

from gptlab.cli import run
from gptlab.fit import calibration, hardware

from test_hardware import FIGURES


@pytest.fixture(autouse=True)
def cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "_nvml_gpus", lambda notes: [])
    monkeypatch.setattr(hardware, "_amd_gpus", lambda: [])
    (tmp_path / "fit-calibration.json").write_text(json.dumps({calibration._fingerprint([]): FIGURES}))


def test_table_text(capsys):
    assert run(["fit", "--ram", "16", "--family", "smollm2", "--sort", "params"]) == 0
    out = capsys.readouterr().out
    assert "RAM: 16.0 GiB avail" in out and "[simulated]" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("smollm2")]
    assert [ln.split()[0] for ln in lines] == ["smollm2-1.7b", "smollm2-360m", "smollm2-135m"]


def test_table_json(capsys):
    assert run(["fit", "--json", "true", "--ram", "16", "--vram", "8", "--search", "llama-3", "--limit", "2"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["models"]) == 2 and d["hardware"]["gpus"][0]["vram_total"] == 8 * 2**30
    for m in d["models"]:
        assert {"kv_cache_gib", "weights_gib", "total_gib", "decode_tokens_per_s", "fit"} <= m.keys()


def test_plan_json_and_text(capsys):
    assert run(["fit", "--model", "llama-2-7b", "--context", "4096", "--quant", "F16", "--json", "true",
                "--ram", "64"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kv_cache_gib"] == 2.0 and d["weights_gib"] == pytest.approx(6_738_415_616 * 2 / 2**30)
    assert d["fit"] in ("Perfect", "Good") and d["decode_tokens_per_s"] > 0
    assert run(["fit", "--model", "mistral-7b", "--vram", "8", "--train", "true", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    for text in ("Run paths:", "GPU: yes", "Minimum hardware", "Recommended hardware", "Largest context",
                 "Training (batch 1", "bf16-mixed"):
        assert text in out


def test_bad_input_is_one_line(capsys):
    assert run(["fit", "--model", "llama-2-7b", "--quant", "Q9_9"]) == 1
    assert "error: unknown quant 'Q9_9'" in capsys.readouterr().err
    assert run(["fit", "--model", "no-such-model"]) == 1
    assert "neither a gptlab preset" in capsys.readouterr().err
    assert run(["fit", "--sort", "vibes"]) == 1
    assert "--sort 'vibes' must be one of" in capsys.readouterr().err
    assert run(["fit", "--ram", "0"]) == 1
    assert "--ram 0" in capsys.readouterr().err
    assert run(["fit", "--model", "llama-3-8b", "--engine", "gptlab", "--quant", "Q4_K_M"]) == 1
    assert "dequantizes" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["fit", "--context", "0"], ["fit", "--model", "gpt2-nano", "--context", "0"]])
def test_zero_context_is_refused_not_planned_at_8192(argv, capsys):
    assert run(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --context 0 must be at least 1") and err.count("\n") == 1


class _Stream:
    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("stdin_tty,stdout_tty,which", [(False, True, "stdin is"), (True, False, "stdout is"),
                                                         (False, False, "stdin and stdout are")])
def test_tui_needs_a_terminal(stdin_tty, stdout_tty, which, capsys, monkeypatch):
    import gptlab.fit.tui as tui

    monkeypatch.setattr(tui, "run_tui", lambda *a, **k: pytest.fail("the TUI must not start"))
    monkeypatch.setattr("sys.stdin", _Stream(stdin_tty))
    real_stdout = __import__("sys").stdout
    monkeypatch.setattr("sys.stdout", _Stream(stdout_tty))
    try:
        code = run(["fit", "--tui"])
    finally:
        monkeypatch.setattr("sys.stdout", real_stdout)
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: --tui needs an interactive terminal, but {which} not one")
    assert err.count("\n") == 1


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        run(["fit", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--quant", "--kv-quant", "--train", "--verify", "--tui", "--calibrate", "--vram"):
        assert flag in out


def test_table_header_says_the_context_is_capped(capsys):
    assert run(["fit", "--ram", "16", "--family", "smollm2", "--context", "100000000"]) == 0
    out = capsys.readouterr().out
    assert "Models (3), engine llama.cpp, context 100000000 tokens (capped at the model's maximum for 3 of 3" in out
    assert run(["fit", "--ram", "16", "--family", "smollm2", "--context", "1024"]) == 0
    out = capsys.readouterr().out
    assert "context 1024 tokens:" in out and "capped" not in out


def test_verify_outside_its_targets_exits_3_not_the_usage_code_2(monkeypatch, capsys):
    import gptlab.fit.verify as verify

    res = {"within_targets": False}
    monkeypatch.setattr(verify, "verify_model", lambda *a, **k: res)
    monkeypatch.setattr(verify, "render_verify", lambda r: "OUTSIDE targets")
    assert run(["fit", "--verify", "gpt2-nano"]) == 3
    res["within_targets"] = True
    assert run(["fit", "--verify", "gpt2-nano"]) == 0
