"""This machine's measured speeds: cached per machine, checked before they are trusted.

The cache is ``$GPTLAB_CACHE/fit-calibration.json`` (default
``~/.cache/gptlab``), keyed by CPU, core count, torch version and GPU names;
``gptlab fit --calibrate`` re-measures (``benchmarks``). Figures are cached only
when they pass ``calibration_check`` (measured under heavy load they can
contradict each other); a set that fails is measured again, up to
``CALIBRATION_TRIES`` times, and then the defaults are used and the rejection
is cached instead. ``detect_hardware`` puts the detected devices
(``hardware``) and these speeds into one ``Hardware``.

Messages go to the ``gptlab.fit`` logger; with no handler configured by the
application, ``_StderrLines`` writes them to stderr as one ``warning: ...`` /
``note: ...`` line each.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_json, cache_root
from gptlab.fit.benchmarks import calibrate, measure_runtime_rss
from gptlab.fit.calibration_check import LIMITS, calibration_problems
from gptlab.fit.hardware import (DEFAULT_SPEEDS, GPU, Hardware, apply_gpu_speeds, cpu_name, detect_devices,
                                 native_int4_packs, ollama_running, simulate, speeds_from, usable_cores)
from gptlab.logs import get_logger

# Measurements per calibration before its figures are given up on.
CALIBRATION_TRIES = 3

log = get_logger("gptlab.fit")


def cache_dir() -> Path:
    """Where gptlab caches things (the machine calibration lives here)."""
    return cache_root()


def _fingerprint(gpus: list[GPU]) -> str:
    import torch

    return "|".join([cpu_name(), str(usable_cores()), torch.__version__, *sorted(g.name for g in gpus)])


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def usable_entry(entry: dict | None) -> bool:
    """True for cached figures that can be used: measured, not a rejection, passing the check today."""
    return bool(entry) and "rejected" not in entry and not calibration_problems(entry)


def load_calibration(gpus: list[GPU], refresh: bool = False, tries: int = CALIBRATION_TRIES) -> tuple[dict, bool]:
    """Cached figures for this machine, measuring (and caching atomically) if absent or ``refresh``.

    Returns (entry, freshly_measured). Measured figures that fail
    ``calibration_problems`` are measured again, at most ``tries`` times in
    all; if every set fails, one warning line goes to stderr and the entry
    returned (and cached, so later runs do not re-measure until ``--calibrate``)
    is ``{"rejected": first problem, "tries": n, "measured_at": ...}``, which
    ``detect_hardware`` answers with the default speeds (the measured runtime RSS,
    when plausible, is kept in it and used: a memory figure, not a timing). A cached set that fails
    the check (from before it existed) is measured again.
    """
    path = cache_dir() / "fit-calibration.json"
    key = _fingerprint(gpus)
    cache = _read_cache(path)
    entry = cache.get(key)
    if not refresh and entry:
        if "rejected" in entry:
            if "runtime_rss" not in entry:  # cached before a rejection kept it: a second to measure now
                entry = {**entry, **_runtime_rss_only()}
                cache[key] = entry
                _write_cache(path, cache)
            return entry, False
        problems = calibration_problems(entry)
        if not problems:
            return entry, False
        log.info("gptlab fit: the cached calibration fails the check (%s); measuring again", problems[0])
    for _ in range(max(1, tries)):
        figures = calibrate(gpus)
        problems = calibration_problems(figures)
        if not problems:
            break
    if problems:
        rejected = {"rejected": problems[0], "tries": max(1, tries),
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        figures = {**rejected, **_plausible_rss(figures)}  # a memory figure: load does not spoil it
        log.warning("gptlab fit: calibration rejected after %d tries (%s); using default speeds",
                    figures["tries"], problems[0])
    cache[key] = figures
    _write_cache(path, cache)
    return figures, True


def _write_cache(path: Path, cache: dict) -> None:
    try:
        atomic_write_json(path, cache)
    except OSError:
        pass  # a read-only home still gets the figures, just not cached


def _runtime_rss_only() -> dict:
    """``{"runtime_rss": bytes}`` measured now, or {} where it cannot be or is implausible."""
    try:
        return _plausible_rss({"runtime_rss": measure_runtime_rss()})
    except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired):
        return {}


def _plausible_rss(figures: dict) -> dict:
    """``{"runtime_rss": ...}`` of ``figures`` when it is a plausible byte count, else {}."""
    rss, (lo, hi) = figures.get("runtime_rss"), LIMITS["runtime_rss"]
    return {"runtime_rss": rss} if isinstance(rss, int) and lo <= rss <= hi else {}


def _defaults_note(entry: dict) -> str:
    """The assumption line for a machine whose speeds are the defaults, saying why."""
    d = DEFAULT_SPEEDS
    rss = f"{entry['runtime_rss'] / 2**20:.0f} MiB runtime (measured)" if "runtime_rss" in entry and \
        "rejected" in entry else f"{d['runtime_rss'] / 2**20:.0f} MiB runtime"
    assumed = (f"assuming {d['cpu_bandwidth'] / 1e9:.0f} GB/s memory, {d['cpu_matmul_fp32'] / 1e9:.0f} GFLOP/s, "
               f"{d['op_latency'] * 1e6:.0f} us/op, {rss}")
    if "rejected" in entry:
        return (f"speeds measured here failed the sanity check {entry.get('tries', 1)} times at "
                f"{entry.get('measured_at', '?')} ({entry['rejected']}); {assumed}; "
                "run `gptlab fit --calibrate` when the machine is quieter")
    if entry:
        return (f"the cached speeds fail the sanity check ({calibration_problems(entry)[0]}); {assumed}; "
                "run `gptlab fit --calibrate`")
    return f"speeds not measured on this machine (run `gptlab fit --calibrate`); {assumed}"


# ---------------------------------------------------------------- the entry point
def detect_hardware(calibrate_now: bool = False, measure: bool = True, ram: float | None = None,
                    vram: float | None = None, cores: int | None = None) -> Hardware:
    """Detect this machine; optionally simulate another with ``ram``/``vram`` (GiB) and ``cores``.

    ``measure=False`` skips the microbenchmark when nothing is cached and uses
    stated conservative defaults instead (for quick listings and tests).
    """
    for flag, v in (("--ram", ram), ("--vram", vram), ("--cores", cores)):
        if v is not None and v <= 0:
            raise GptlabError(f"{flag} {v} must be positive (GiB for memory, a count for cores)")
    notes: list[str] = []
    vm = psutil.virtual_memory()
    gpus, unified = detect_devices(notes)
    entry: dict = {}
    if measure or calibrate_now:
        try:
            entry, _ = load_calibration(gpus, refresh=calibrate_now)
        except Exception as e:  # measurement must never crash a plan
            notes.append(f"calibration failed ({e}); using conservative default speeds")
    else:
        entry = _read_cache(cache_dir() / "fit-calibration.json").get(_fingerprint(gpus)) or {}
    calibrated = usable_entry(entry)
    # a rejected set keeps its runtime RSS (measured, not timed): only the speeds fall back to the defaults
    figures = entry if calibrated else {k: v for k, v in entry.items() if k == "runtime_rss"}
    if not calibrated:
        notes.append(_defaults_note(entry))
    n_cores = usable_cores()
    hw = Hardware(
        cpu_name=cpu_name(), cores=n_cores, ram_total=vm.total, ram_available=vm.available, gpus=gpus,
        unified_memory=unified, ollama=ollama_running(),
        **speeds_from(figures), calibrated=calibrated, assumptions=notes, int4_packed=native_int4_packs(),
    )
    apply_gpu_speeds(hw, figures.get("gpus", {}))
    return simulate(hw, ram=ram, vram=vram, cores=cores)
