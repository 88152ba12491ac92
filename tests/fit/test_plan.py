"""Fit levels, run paths, max context, min/recommended hardware, upgrade deltas, the table."""

import pytest

from gptlab.errors import GptlabError
from gptlab.fit.catalog import catalog, spec_from_ref
from gptlab.fit.estimate import inference_memory
from gptlab.fit.plan import (LEVELS, THRESHOLDS, best_path, level_for, make_plan, max_context, parse_size, rank,
                             run_paths, table_row)

from fit_machines import make_hw

GiB = 2**30


def test_level_thresholds():
    assert [level_for(x, 100) for x in (70, 71, 85, 86, 100, 101)] == \
        ["Perfect", "Good", "Good", "Marginal", "Marginal", "Too tight"]
    assert level_for(1, 0) == "Too tight"


def test_gpu_path_and_cpu_cap():
    s = spec_from_ref("llama-3-8b")
    hw = make_hw(ram=64, vram=24)
    paths = {p.name: p for p in run_paths(s, hw, "Q4_K_M", 8192)}
    assert paths["GPU"].fit == "Perfect" and paths["GPU"].possible
    assert paths["CPU offload"].possible is False and "not needed" in paths["CPU offload"].note
    assert paths["CPU-only"].fit == "Marginal"  # capped: a GPU would be faster
    assert paths["GPU"].tokens_per_s > 10 * paths["CPU-only"].tokens_per_s
    assert best_path(list(paths.values())).name == "GPU"


def test_offload_when_the_gpu_is_too_small():
    s = spec_from_ref("llama-3-8b")
    hw = make_hw(ram=64, vram=4)
    paths = {p.name: p for p in run_paths(s, hw, "Q8_0", 4096)}
    assert paths["GPU"].fit == "Too tight"
    off = paths["CPU offload"]
    assert off.possible and off.fit == "Marginal" and "on the GPU" in off.note
    assert paths["CPU-only"].tokens_per_s < off.tokens_per_s < 1e9
    gptlab = {p.name: p for p in run_paths(s, hw, "BF16", 4096, engine="gptlab")}
    assert not gptlab["CPU offload"].possible and "one device" in gptlab["CPU offload"].note


def test_target_tps_caps_the_level():
    s = spec_from_ref("smollm2-135m")
    hw = make_hw(ram=64)
    free = best_path(run_paths(s, hw, "Q8_0", 2048))
    assert free.fit == "Perfect"
    capped = best_path(run_paths(s, hw, "Q8_0", 2048, target_tps=free.tokens_per_s * 2))
    assert capped.fit == "Marginal" and "below target" in capped.note


def test_max_context_is_the_largest_that_fits():
    s = spec_from_ref("llama-3-8b")
    hw = make_hw(ram=5.2)
    ctx = max_context(s, hw, "Q4_K_M")
    assert 0 < ctx < s.context_length

    def total(c):
        return inference_memory(s, hw, "Q4_K_M", c).total
    assert total(ctx) <= hw.ram_available < total(ctx + 1)
    assert max_context(s, make_hw(ram=64), "Q4_K_M") == s.context_length
    assert max_context(s, make_hw(ram=1), "Q4_K_M") == 0


def test_plan_requirements_and_upgrades():
    s = spec_from_ref("llama-3-8b")
    hw = make_hw(ram=64, vram=6)
    p = make_plan(s, hw, context=8192, quant="Q4_K_M")
    need = p.paths[0].needed_gib
    assert p.minimum["vram_gib"] == pytest.approx(need)
    assert p.recommended["vram_gib"] == pytest.approx(need / THRESHOLDS["Perfect"])
    ups = {u["fit"]: u for u in p.upgrades}
    assert set(ups) == {lv for lv in ("Marginal", "Good", "Perfect") if LEVELS.index(lv) < LEVELS.index(p.fit)}
    assert ups["Good"]["extra_gib"] == pytest.approx(need / 0.85 - 6)
    assert ups["Good"]["text"] == f"+{need / 0.85 - 6:.1f} GiB VRAM -> Good"
    # Adding exactly that much VRAM reaches the level.
    better = make_plan(s, make_hw(ram=64, vram=6 + ups["Good"]["extra_gib"] + 1e-6), context=8192, quant="Q4_K_M")
    assert better.fit == "Good" and better.mode == "GPU"
    d = p.to_dict()
    assert {"kv_cache_gib", "weights_gib", "total_gib", "decode_tokens_per_s", "fit"} <= d.keys()
    assert d["kv_cache_gib"] == 1.0


def test_plan_default_quant_and_training():
    s = spec_from_ref("llama-3-8b")
    p = make_plan(s, make_hw(ram=12), context=4096, train=True, train_batch=1)
    # BF16 (15 GiB) cannot fit 12 GiB; the best quality that does is chosen.
    assert p.inputs["quant"] != "BF16" and p.fit in ("Perfect", "Good")
    assert len(p.training) == 6 and all(t["fit"] == "Too tight" for t in p.training)
    with pytest.raises(GptlabError, match="exceeds llama-3-8b's maximum of 8192"):
        make_plan(s, make_hw(), context=10000)


def test_table_rank_filters_and_sorts():
    hw = make_hw(ram=16)
    rows = [table_row(s, hw) for s in catalog()]
    assert {r.fit for r in rows} <= set(LEVELS)
    by_fit = rank(rows)
    assert [LEVELS.index(r.fit) for r in by_fit] == sorted(LEVELS.index(r.fit) for r in by_fit)
    assert all(r.family == "gpt2" for r in rank(rows, family="gpt2"))
    assert [r.name for r in rank(rows, search="smollm2", sort="params")] == \
        ["smollm2-1.7b", "smollm2-360m", "smollm2-135m"]
    sized = rank(rows, min_size="1B", max_size="8B")
    assert sized and all(1e9 <= r.params <= 8e9 for r in sized)
    assert all(r.fit in ("Perfect", "Good") for r in rank(rows, fit="good"))
    too_big = [r for r in rows if r.name == "mistral-small-24b"][0]
    assert too_big.quant in ("Q4_K_M", "Q3_K_M", "Q2_K", "Q5_K_M")
    with pytest.raises(GptlabError, match="--sort 'speed' must be one of"):
        rank(rows, sort="speed")
    with pytest.raises(GptlabError, match="--fit 'great' must be one of"):
        rank(rows, fit="great")


def test_parse_size():
    assert parse_size("135M") == 135e6 and parse_size("7b") == 7e9 and parse_size("1000") == 1000
    with pytest.raises(GptlabError, match="not a parameter count"):
        parse_size("big")
