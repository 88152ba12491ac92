"""What this machine has: CPU, RAM, GPUs, Ollama — and how fast it really is.

Sizes are detected (psutil, NVML, sysfs, macOS sysctl); speeds are *measured*
by a few-second microbenchmark and cached per machine, because published peak
figures are what make fit estimates 3x off:

- memory bandwidth: the rate ``F.linear`` streams 256 MiB of fp32 weight
  matrices for one token's vector (what a decode step does), with all threads
  and with one (how many cores it takes to saturate memory), and as a curve
  over row length K = 512 ... 4096 (short rows stream slower: d = 576 reaches
  about 0.6 of d = 4096 here);
- matmul throughput: median of a few 2048x2048 fp32 and bf16 matmuls;
- per-op latency: the cost of one tiny PyTorch op (eager dispatch overhead);
- decode overhead: seconds per layer and per step of gptlab's eager decode on
  tiny models of each family (what dominates decoding of small models);
- runtime memory: RSS of a clean Python process after importing torch
  and gptlab (the fixed cost every gptlab process pays).

The cache is ``$GPTLAB_CACHE/fit-calibration.json`` (default
``~/.cache/gptlab``), keyed by CPU, core count, torch version and GPU names;
``gptlab fit --calibrate`` re-measures. Figures are cached only when they pass
``calibration_check`` (measured under heavy load they can contradict each
other); a set that fails is measured again, up to ``CALIBRATION_TRIES`` times,
and then the defaults are used and the rejection is cached instead. Anything
that cannot be detected or measured becomes a stated entry in
``Hardware.assumptions``, never a crash.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_json, cache_root

GiB = 2**30

# Used only when a GPU's speed cannot be measured (no CUDA-enabled torch, or a
# simulated --vram GPU). Stated in Hardware.assumptions whenever used.
ASSUMED_GPU_BANDWIDTH = 500e9  # bytes/s, a mid-range discrete GPU
ASSUMED_GPU_MATMUL = 50e12  # FLOP/s bf16

# CPU speeds used when this machine was not measured, or its figures failed the
# calibration check. Conservative; stated in Hardware.assumptions whenever used.
DEFAULT_SPEEDS: dict = {
    "cpu_bandwidth": 10e9, "cpu_bandwidth_1core": 10e9, "cpu_bandwidth_by_width": {},
    "cpu_matmul_fp32": 100e9, "cpu_matmul_bf16": 100e9, "op_latency": 10e-6, "decode_overhead": {},
    "runtime_rss": 300 * 2**20,
}
# Measurements per calibration before its figures are given up on.
CALIBRATION_TRIES = 3


@dataclass
class GPU:
    """One GPU (or MIG instance, or Apple unified-memory GPU)."""

    name: str
    vram_total: int  # bytes
    vram_free: int  # bytes
    backend: str  # "cuda" | "rocm" | "metal" | "simulated"
    bandwidth: float | None = None  # bytes/s, measured
    matmul_bf16: float | None = None  # FLOP/s, measured
    mig_uuids: list[str] = field(default_factory=list)

    @property
    def cuda_visible_devices(self) -> str | None:
        """The CUDA_VISIBLE_DEVICES value that selects this GPU's MIG instances."""
        return ",".join(self.mig_uuids) if self.mig_uuids else None


@dataclass
class Hardware:
    """The machine the planner sizes for (real, or simulated with --ram/--vram/--cores)."""

    cpu_name: str
    cores: int
    ram_total: int
    ram_available: int
    gpus: list[GPU]
    unified_memory: bool
    ollama: bool
    cpu_bandwidth: float  # bytes/s
    cpu_bandwidth_1core: float  # bytes/s with one thread
    cpu_bandwidth_by_width: dict  # {"512": bytes/s, ...}: decode GEMV bandwidth per row length
    cpu_matmul_fp32: float  # FLOP/s
    cpu_matmul_bf16: float  # FLOP/s
    op_latency: float  # seconds per small eager PyTorch op
    decode_overhead: dict  # {family: {"per_layer": s, "fixed": s}} of gptlab's eager decode step
    runtime_rss: int  # bytes: a fresh python + torch + gptlab process
    calibrated: bool = False
    simulated: bool = False
    assumptions: list[str] = field(default_factory=list)

    @property
    def gpu(self) -> GPU | None:
        """The biggest GPU (the planner places a model on one device)."""
        return max(self.gpus, key=lambda g: g.vram_total) if self.gpus else None

    def summary(self) -> str:
        """One status line: CPU | RAM | GPU | Ollama."""
        g = self.gpu
        if g is None:
            gpu = "none"
        elif g.backend == "metal":
            gpu = f"{g.name} ({g.vram_total / GiB:.1f} GiB shared, Metal)"
        else:
            gpu = f"{g.name} ({g.vram_free / GiB:.1f} GiB free / {g.vram_total / GiB:.1f} GiB)"
            if g.mig_uuids:
                gpu += f" MIG x{len(g.mig_uuids)}: CUDA_VISIBLE_DEVICES={g.cuda_visible_devices}"
        sim = " [simulated]" if self.simulated else ""
        return (f"CPU: {self.cpu_name} ({self.cores} cores) | RAM: {self.ram_available / GiB:.1f} GiB avail / "
                f"{self.ram_total / GiB:.1f} GiB total | GPU: {gpu} | Ollama: {'yes' if self.ollama else 'no'}"
                f"{sim}\n{'Measured' if self.calibrated else 'Assumed (not measured)'}: "
                f"{self.cpu_bandwidth / 1e9:.1f} GB/s memory, "
                f"{self.cpu_matmul_fp32 / 1e9:.0f} GFLOP/s fp32, {self.cpu_matmul_bf16 / 1e9:.0f} GFLOP/s bf16, "
                f"{self.op_latency * 1e6:.1f} us/op")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- detection
def cpu_name() -> str:
    """The CPU model name (Linux /proc/cpuinfo, macOS sysctl, else platform)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=2).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cores() -> int:
    """Cores this process may run on (affinity/cgroup aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def ollama_running(host: str = "127.0.0.1", port: int = 11434, timeout: float = 0.25) -> bool:
    """True when something accepts connections on Ollama's port (short timeout)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_MIG_RE = re.compile(r"MIG-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def parse_mig_uuids(nvidia_smi_l: str) -> list[str]:
    """MIG instance UUIDs from ``nvidia-smi -L`` output."""
    return _MIG_RE.findall(nvidia_smi_l)


def _nvml_gpus(notes: list[str]) -> list[GPU]:
    try:
        import pynvml  # from nvidia-ml-py; optional
    except ImportError:
        if shutil.which("nvidia-smi"):
            notes.append("nvidia-smi present but nvidia-ml-py is not installed; pip install nvidia-ml-py for GPU details")
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: not an error, just no NVIDIA GPU
        return []
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            migs = []
            try:
                current, _pending = pynvml.nvmlDeviceGetMigMode(h)
                if current:
                    for j in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(h)):
                        try:
                            mh = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
                        except pynvml.NVMLError:
                            continue
                        u = pynvml.nvmlDeviceGetUUID(mh)
                        migs.append(u.decode() if isinstance(u, bytes) else u)
            except pynvml.NVMLError:
                pass
            gpus.append(GPU(name, int(mem.total), int(mem.free), "cuda", mig_uuids=migs))
    finally:
        pynvml.nvmlShutdown()
    return gpus


def _amd_gpus() -> list[GPU]:
    """AMD GPUs from the amdgpu driver's sysfs files (best effort)."""
    gpus = []
    for dev in sorted(Path("/sys/class/drm").glob("card[0-9]*/device")):
        total, used = dev / "mem_info_vram_total", dev / "mem_info_vram_used"
        if not total.is_file():
            continue
        try:
            t = int(total.read_text())
            u = int(used.read_text()) if used.is_file() else 0
        except (OSError, ValueError):
            continue
        gpus.append(GPU(f"AMD GPU ({dev.parent.name})", t, t - u, "rocm"))
    return gpus


def _apple_gpu(ram_total: int) -> GPU | None:
    if sys.platform == "darwin" and platform.machine() == "arm64":
        # Unified memory: Metal may use about 2/3-3/4 of RAM by default; we report the total.
        return GPU(f"{cpu_name()} GPU", ram_total, ram_total, "metal")
    return None


# ---------------------------------------------------------------- calibration
def cache_dir() -> Path:
    """Where gptlab caches things (the machine calibration lives here)."""
    return cache_root()


def _fingerprint(gpus: list[GPU]) -> str:
    import torch

    return "|".join([cpu_name(), str(usable_cores()), torch.__version__, *sorted(g.name for g in gpus)])


def _median_time(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` runs after a warm-up.

    The median, not the best: decoding is a sustained stream, and on a shared
    machine the best run describes a moment nobody else was using the memory bus.
    """
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def measure_bandwidth(device: str = "cpu", mib: int = 256) -> float:
    """Bytes/s that decode-shaped matrix-vector products stream from fp32 weights.

    ``mib`` MiB of (4096 x 1024) and (1024 x 4096) matrices, each applied to one
    token's vector with ``F.linear`` — the kernel and shapes a decode step runs.
    """
    import torch
    import torch.nn.functional as F

    n = max(2, mib * 2**20 // (4096 * 1024 * 4))
    mats = [torch.randn(*((4096, 1024) if i % 2 else (1024, 4096)), device=device) for i in range(n)]
    xs = {1024: torch.randn(1, 1024, device=device), 4096: torch.randn(1, 4096, device=device)}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        for w in mats:
            F.linear(xs[w.shape[1]], w)
        sync()

    return sum(w.numel() * 4 for w in mats) / _median_time(run, 5)


WIDTHS = (512, 1024, 2048, 4096)


def measure_bandwidth_by_width(mib: int = 96) -> dict[str, float]:
    """Decode-GEMV bandwidth per row length K (bytes/s): short rows stream slower.

    For each K, ``mib`` MiB of (3K x K) fp32 matrices applied to a (1, K) vector
    with ``F.linear``. A model's projections have K = d (and K = F for the MLP
    down projection), so the estimator reads this curve at the model's width.
    """
    import torch
    import torch.nn.functional as F

    out = {}
    for K in WIDTHS:
        n = max(2, mib * 2**20 // (3 * K * K * 4))
        mats = [torch.randn(3 * K, K) for _ in range(n)]
        x = torch.randn(1, K)

        def run():
            for w in mats:
                F.linear(x, w)

        out[str(K)] = sum(w.numel() * 4 for w in mats) / _median_time(run, 5)
        del mats
    return out


def bandwidth_at_width(hw: "Hardware", width: int) -> float:
    """The measured GEMV bandwidth for rows of ``width`` (log-interpolated; the flat figure if unmeasured)."""
    import math

    curve = sorted((int(k), v) for k, v in (hw.cpu_bandwidth_by_width or {}).items())
    if not curve:
        return hw.cpu_bandwidth
    if width <= curve[0][0]:
        return curve[0][1]
    if width >= curve[-1][0]:
        return curve[-1][1]
    for (k0, v0), (k1, v1) in zip(curve, curve[1:]):
        if k0 <= width <= k1:
            t = (math.log(width) - math.log(k0)) / (math.log(k1) - math.log(k0))
            return v0 + t * (v1 - v0)
    return hw.cpu_bandwidth


def measure_matmul(dtype: str = "fp32", device: str = "cpu", n: int = 2048) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` (best of a few)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        a @ b
        sync()

    return 2 * n**3 / _median_time(run, 5)


def measure_op_latency() -> float:
    """Seconds per tiny eager op: the dispatch overhead of PyTorch on this CPU."""
    import torch

    x = torch.randn(1, 64)
    w = torch.randn(64, 64)

    def run():
        y = x
        for _ in range(200):
            y = torch.nn.functional.linear(y, w).add_(x)  # 2 ops per iteration
    return _median_time(run, 5) / 400


def measure_runtime_rss() -> int:
    """RSS (bytes) of a fresh process after importing what gptlab inference imports."""
    code = ("import gc, psutil, torch, gptlab.models.llama, gptlab.models.gpt2, gptlab.weights, gptlab.inference.generation\n"
            "gc.collect(); print(psutil.Process().memory_info().rss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed")
    return int(out.stdout.strip().splitlines()[-1])


def _one_thread(fn, *args):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(n)


def measure_decode_overhead(layers: tuple[int, int] = (1, 5), tokens: int = 12) -> dict[str, dict[str, float]]:
    """Seconds of eager overhead per decode step, per family: {family: {"per_layer", "fixed"}}.

    Times ``generate`` on two tiny models of each family (d=64, so the weights
    cost nothing) with different layer counts: the slope is the cost of running
    one layer's Python and kernel launches, the intercept the rest of a step
    (embedding, head, sampling). This is the runtime's overhead, not a model's.
    """
    import torch

    from gptlab.inference.generation import generate
    from gptlab.models import build_model, get_preset

    tiny = {"gpt2": get_preset("gpt2-nano").replace(emb_dim=64, n_heads=4, vocab_size=256, context_length=64),
            "llama": get_preset("llama-micro").replace(emb_dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128,
                                                      vocab_size=256, context_length=64)}
    out = {}
    for fam, cfg in tiny.items():
        per_step = []
        for L in layers:
            model = build_model(cfg.replace(n_layers=L)).eval()
            stamps: list[float] = []
            ids = torch.zeros(1, 4, dtype=torch.long)
            with torch.no_grad():
                generate(model, ids, 3)
                generate(model, ids, tokens, stream=lambda _t: stamps.append(time.perf_counter()))
            gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
            per_step.append(gaps[len(gaps) // 2])
        slope = max(0.0, (per_step[1] - per_step[0]) / (layers[1] - layers[0]))
        out[fam] = {"per_layer": slope, "fixed": max(0.0, per_step[0] - slope * layers[0])}
    return out


def measure_speeds() -> dict:
    """CPU bandwidth, matmul peaks, op latency and decode overhead with the current thread count."""
    return {
        "cpu_bandwidth": measure_bandwidth("cpu"),
        "cpu_bandwidth_by_width": measure_bandwidth_by_width(),
        "cpu_matmul_fp32": measure_matmul("fp32"),
        "cpu_matmul_bf16": measure_matmul("bf16"),
        "op_latency": measure_op_latency(),
        "decode_overhead": measure_decode_overhead(),
    }


def calibrate(gpus: list[GPU] | None = None) -> dict:
    """Run the microbenchmarks (a few seconds) and return the measured figures."""
    import torch

    res = {
        **measure_speeds(),
        "cpu_bandwidth_1core": _one_thread(measure_bandwidth, "cpu"),
        "cpu_matmul_fp32_1core": _one_thread(measure_matmul, "fp32"),  # for the check: all threads >= one
        "runtime_rss": measure_runtime_rss(),
        "torch_threads": torch.get_num_threads(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "gpus": {},
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            with torch.cuda.device(i):
                res["gpus"][torch.cuda.get_device_name(i)] = {
                    "bandwidth": measure_bandwidth("cuda", 1024),
                    "matmul_bf16": measure_matmul("bf16", "cuda", 4096),
                }
    return res


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def usable_entry(entry: dict | None) -> bool:
    """True for cached figures that can be used: measured, not a rejection, passing the check today."""
    # Imported here: the check runs the estimator, which imports this module.
    from gptlab.fit.calibration_check import calibration_problems

    return bool(entry) and "rejected" not in entry and not calibration_problems(entry)


def load_calibration(gpus: list[GPU], refresh: bool = False, tries: int = CALIBRATION_TRIES) -> tuple[dict, bool]:
    """Cached figures for this machine, measuring (and caching atomically) if absent or ``refresh``.

    Returns (entry, freshly_measured). Measured figures that fail
    ``calibration_problems`` are measured again, at most ``tries`` times in
    all; if every set fails, one warning line goes to stderr and the entry
    returned (and cached, so later runs do not re-measure until ``--calibrate``)
    is ``{"rejected": first problem, "tries": n, "measured_at": ...}``, which
    ``detect_hardware`` answers with the default speeds. A cached set that fails
    the check (from before it existed) is measured again.
    """
    from gptlab.fit.calibration_check import calibration_problems

    path = cache_dir() / "fit-calibration.json"
    key = _fingerprint(gpus)
    cache = _read_cache(path)
    entry = cache.get(key)
    if not refresh and entry:
        if "rejected" in entry:
            return entry, False
        problems = calibration_problems(entry)
        if not problems:
            return entry, False
        print(f"note: gptlab fit: the cached calibration fails the check ({problems[0]}); measuring again",
              file=sys.stderr)
    for _ in range(max(1, tries)):
        figures = calibrate(gpus)
        problems = calibration_problems(figures)
        if not problems:
            break
    if problems:
        figures = {"rejected": problems[0], "tries": max(1, tries),
                   "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        print(f"warning: gptlab fit: calibration rejected after {figures['tries']} tries ({problems[0]}); "
              "using default speeds", file=sys.stderr)
    cache[key] = figures
    try:
        atomic_write_json(path, cache)
    except OSError:
        pass  # a read-only home still gets the figures, just not cached
    return figures, True


def _defaults_note(entry: dict) -> str:
    """The assumption line for a machine whose speeds are the defaults, saying why."""
    from gptlab.fit.calibration_check import calibration_problems

    d = DEFAULT_SPEEDS
    assumed = (f"assuming {d['cpu_bandwidth'] / 1e9:.0f} GB/s memory, {d['cpu_matmul_fp32'] / 1e9:.0f} GFLOP/s, "
               f"{d['op_latency'] * 1e6:.0f} us/op, {d['runtime_rss'] / 2**20:.0f} MiB runtime")
    if "rejected" in entry:
        return (f"speeds measured here failed the sanity check {entry.get('tries', 1)} times at "
                f"{entry.get('measured_at', '?')} ({entry['rejected']}); {assumed}; "
                "run `gptlab fit --calibrate` when the machine is quieter")
    if entry:
        return (f"the cached speeds fail the sanity check ({calibration_problems(entry)[0]}); {assumed}; "
                "run `gptlab fit --calibrate`")
    return f"speeds not measured on this machine (run `gptlab fit --calibrate`); {assumed}"


def speeds_from(figures: dict) -> dict:
    """The Hardware speed fields from calibration figures; ``DEFAULT_SPEEDS`` for any missing one."""
    out = {k: figures.get(k, v) for k, v in DEFAULT_SPEEDS.items()}
    out["runtime_rss"] = int(out["runtime_rss"])
    return out


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
    gpus = _nvml_gpus(notes) or _amd_gpus()
    apple = _apple_gpu(vm.total)
    if apple is not None:
        gpus = [apple]
    if not gpus:
        try:
            import torch

            if torch.cuda.is_available():  # CUDA torch without NVML
                for i in range(torch.cuda.device_count()):
                    free, total = torch.cuda.mem_get_info(i)
                    gpus.append(GPU(torch.cuda.get_device_name(i), total, free, "cuda"))
        except Exception as e:  # a broken driver must not stop a CPU plan
            notes.append(f"CUDA query failed ({e}); planning for CPU only")
    if gpus and any(g.backend == "cuda" for g in gpus) and not any(g.mig_uuids for g in gpus) \
            and shutil.which("nvidia-smi"):
        try:
            migs = parse_mig_uuids(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                                  timeout=5).stdout)
            if migs:
                gpus[0].mig_uuids = migs
        except (OSError, subprocess.SubprocessError):
            pass

    entry: dict = {}
    if measure or calibrate_now:
        try:
            entry, _ = load_calibration(gpus, refresh=calibrate_now)
        except Exception as e:  # measurement must never crash a plan
            notes.append(f"calibration failed ({e}); using conservative default speeds")
    else:
        entry = _read_cache(cache_dir() / "fit-calibration.json").get(_fingerprint(gpus)) or {}
    calibrated = usable_entry(entry)
    figures = entry if calibrated else {}
    if not calibrated:
        notes.append(_defaults_note(entry))
    n_cores = usable_cores()
    hw = Hardware(
        cpu_name=cpu_name(), cores=n_cores, ram_total=vm.total, ram_available=vm.available, gpus=gpus,
        unified_memory=apple is not None, ollama=ollama_running(),
        **speeds_from(figures), calibrated=calibrated, assumptions=notes,
    )
    for g in hw.gpus:
        m = figures.get("gpus", {}).get(g.name)
        if m:
            g.bandwidth, g.matmul_bf16 = m["bandwidth"], m["matmul_bf16"]
        elif g.backend == "metal":
            g.bandwidth, g.matmul_bf16 = hw.cpu_bandwidth, hw.cpu_matmul_bf16
            notes.append("Apple GPU speed taken from the CPU measurement of the same unified memory")
        else:
            g.bandwidth, g.matmul_bf16 = ASSUMED_GPU_BANDWIDTH, ASSUMED_GPU_MATMUL
            notes.append(f"{g.name}: speed not measured (needs CUDA-enabled torch); assuming "
                         f"{ASSUMED_GPU_BANDWIDTH / 1e9:.0f} GB/s, {ASSUMED_GPU_MATMUL / 1e12:.0f} TFLOP/s bf16")
    return simulate(hw, ram=ram, vram=vram, cores=cores)


def simulate(hw: Hardware, ram: float | None = None, vram: float | None = None,
             cores: int | None = None) -> Hardware:
    """A copy of ``hw`` with other RAM/VRAM (GiB, all of it free) or core count."""
    if ram is None and vram is None and cores is None:
        return hw
    notes = list(hw.assumptions)
    hw = replace(hw, gpus=[replace(g) for g in hw.gpus], simulated=True, assumptions=notes)
    if ram is not None:
        hw.ram_total = hw.ram_available = int(ram * GiB)
    if vram is not None:
        if hw.gpus:
            g = hw.gpu
            hw.gpus = [replace(g, vram_total=int(vram * GiB), vram_free=int(vram * GiB))]
        else:
            hw.gpus = [GPU("simulated GPU", int(vram * GiB), int(vram * GiB), "simulated",
                           ASSUMED_GPU_BANDWIDTH, ASSUMED_GPU_MATMUL)]
            notes.append(f"simulated GPU speed assumed: {ASSUMED_GPU_BANDWIDTH / 1e9:.0f} GB/s, "
                         f"{ASSUMED_GPU_MATMUL / 1e12:.0f} TFLOP/s bf16")
    if cores is not None:
        scale = cores / hw.cores
        hw.cpu_matmul_fp32 *= scale
        hw.cpu_matmul_bf16 *= scale
        hw.cores = int(cores)
        notes.append("--cores scales measured matmul throughput linearly; memory bandwidth kept as measured")
    return hw
