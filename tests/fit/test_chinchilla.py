"""`gptlab fit --train`'s compute-optimal view: Chinchilla's tokens, 6ND FLOPs, and times from the formulas."""

import dataclasses
import json

import pytest

from fit_machines import make_hw
from gptlab.cli import run
from gptlab.fit import calibration, hardware
from gptlab.fit.catalog import spec_from_ref
from gptlab.fit.chinchilla import GPUS, PROCESS_COUNTS, compute_optimal, render_compute_optimal
from gptlab.fit.estimate import TRAIN_MFU, train_tokens_per_s

from test_hardware import FIGURES


def test_matches_the_chinchilla_paper_row():
    # Hoffmann et al. 2022, table 3: 1B parameters -> 1.21e20 FLOPs, 20.2B tokens
    spec = dataclasses.replace(spec_from_ref("llama-3.2-1b"), params_total=10**9)
    c = compute_optimal(spec, make_hw(), 2048)
    assert c["tokens"] == pytest.approx(20.2e9, rel=0.01) and c["flops"] == pytest.approx(1.21e20, rel=0.01)


def test_times_follow_from_the_flops_and_the_measured_throughput():
    spec, hw = spec_from_ref("gpt2-124m"), make_hw()
    c = compute_optimal(spec, hw, 1024)
    n = spec.params_total
    assert c["tokens"] == 20 * n and c["flops"] == 6 * n * 20 * n
    assert c["this_machine"]["seconds"] == pytest.approx(20 * n / train_tokens_per_s(spec, hw, 1024, "fp32"))
    a100 = next(g for g in c["gpus"] if g["gpu"] == "A100")
    for p in PROCESS_COUNTS:
        assert a100["seconds"][p] == pytest.approx(c["flops"] / (p * GPUS["A100"] * TRAIN_MFU["gpu"]))
    text = "\n".join(render_compute_optimal(c))
    assert "2.49B tokens" in text and "6·N·D = 1.86e+18 FLOPs" in text and "4.7 h" in text  # 1 x A100


def test_a_gpu_here_is_timed_on_the_gpu():
    c = compute_optimal(spec_from_ref("gpt2-124m"), make_hw(vram=24), 1024)
    assert c["this_machine"]["device"] == "test GPU" and c["this_machine"]["precision"] == "bf16"


def test_cli_plan_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "_nvml_gpus", lambda notes: [])
    monkeypatch.setattr(hardware, "_amd_gpus", lambda: [])
    (tmp_path / "fit-calibration.json").write_text(json.dumps({calibration._fingerprint([]): FIGURES}))
    assert run(["fit", "--model", "gpt2-mini", "--train"]) == 0
    assert "Compute-optimal training (Chinchilla, ~20 tokens/parameter)" in capsys.readouterr().out
    assert run(["fit", "--model", "gpt2-mini", "--train", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["compute_optimal"]
    assert c["tokens"] == 20 * c["params"] and len(c["gpus"]) == len(GPUS)
    assert run(["fit", "--model", "gpt2-mini"]) == 0
    assert "Compute-optimal" not in capsys.readouterr().out  # only with --train
