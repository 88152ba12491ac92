"""What this machine has: CPU, RAM, GPUs, Ollama — and the record of how fast it is.

Sizes are detected here (psutil, NVML, sysfs, macOS sysctl); speeds are
measured by ``benchmarks`` and cached by ``calibration``, whose
``detect_hardware`` puts both into one :class:`Hardware`. This module is the
ground floor of ``fit/``: the estimator and the calibration check read a
``Hardware`` without importing anything that measures.

Anything that cannot be detected becomes a stated entry in
``Hardware.assumptions``, never a crash.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil

from gptlab import mig
from gptlab.ccompile import compiler, cpu_flags

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
    device: str | None = None  # a MIG slice: the --device value that selects it (mig:N)

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
    int4_packed: bool = False  # gptlab's int4 layers keep a second, VNNI-packed copy here (native_int4_packs)

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
            if g.mig_uuids and g.device is None:
                gpu += f" MIG x{len(g.mig_uuids)}: CUDA_VISIBLE_DEVICES={g.cuda_visible_devices}"
        sim = " [simulated]" if self.simulated else ""
        if mig := mig_line(self.gpus, g):
            sim += "\n" + mig
        return (f"CPU: {self.cpu_name} ({self.cores} cores) | RAM: {self.ram_available / GiB:.1f} GiB avail / "
                f"{self.ram_total / GiB:.1f} GiB total | GPU: {gpu} | Ollama: {'yes' if self.ollama else 'no'}"
                f"{sim}\n{'Measured' if self.calibrated else 'Assumed (not measured)'}: "
                f"{self.cpu_bandwidth / 1e9:.1f} GB/s memory, "
                f"{self.cpu_matmul_fp32 / 1e9:.0f} GFLOP/s fp32, {self.cpu_matmul_bf16 / 1e9:.0f} GFLOP/s bf16, "
                f"{self.op_latency * 1e6:.1f} us/op")

    def to_dict(self) -> dict:
        return asdict(self)


def mig_line(gpus: list[GPU], chosen: GPU | None) -> str:
    """``MIG slices: mig:0 ... 20.0 GiB (MIG-...), ...`` and which one the plan is for ('' without MIG)."""
    parts = [f"{g.device} {g.name} {g.vram_total / GiB:.1f} GiB ({g.mig_uuids[0]})"
             for g in gpus if g.device and g.mig_uuids]
    if not parts or chosen is None:
        return ""
    pick = (f"the plan is for {chosen.device}, the largest; --device {chosen.device} sets "
            f"CUDA_VISIBLE_DEVICES={chosen.mig_uuids[0]}") if chosen.device else "the plan is for a whole GPU"
    return f"MIG slices: {', '.join(parts)}; {pick}"


# ---------------------------------------------------------------- detection
def native_int4_packs() -> bool:
    """Whether gptlab's native kernels pack a second copy of int4 weights on this machine: an x86-64 CPU
    with AVX-512 (F, BW) and VNNI, a C compiler, native code on (``GPTLAB_NATIVE``) and int4 activations
    rounded to int8 (``GPTLAB_INT4_ACTIVATIONS``), as ``inference/kernels.c`` decides it (read from
    /proc/cpuinfo rather than by building the kernels)."""
    if compiler() is None or os.environ.get("GPTLAB_INT4_ACTIVATIONS", "int8").strip().lower() == "float":
        return False
    return {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags()


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


def parse_mig_uuids(nvidia_smi_l: str) -> list[str]:
    """MIG instance UUIDs from ``nvidia-smi -L`` output."""
    return [s.uuid for s in mig.slices(mig.parse_nvidia_smi_l(nvidia_smi_l))]


def slice_gpus(gpus: list[mig.NvidiaGpu]) -> list[GPU]:
    """One GPU entry per MIG slice (a process uses one slice; its memory is what a model can use)."""
    return [GPU(f"{s.gpu_name} MIG {s.profile}", s.memory,
                s.memory_free if s.memory_free is not None else s.memory, "cuda",
                mig_uuids=[s.uuid], device=f"mig:{k}") for k, s in enumerate(mig.slices(gpus))]


def _nvml_slices(pynvml, h, i: int, name: str, uuid: str) -> mig.NvidiaGpu:
    """The MIG slices of NVML device ``h`` (none when MIG mode is off), with NVML's memory figures."""
    found = []
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(h)
    except pynvml.NVMLError:  # a GPU without MIG support
        return mig.NvidiaGpu(i, name, uuid)
    if not current:
        return mig.NvidiaGpu(i, name, uuid)
    for j in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(h)):
        try:
            mh = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
        except pynvml.NVMLError:
            continue
        mem = pynvml.nvmlDeviceGetMemoryInfo(mh)
        mig_name = _text(pynvml.nvmlDeviceGetName(mh))  # "NVIDIA A100-SXM4-40GB MIG 3g.20gb" (older drivers: no profile)
        profile = mig_name.split("MIG")[-1].strip() if "MIG" in mig_name else f"slice {j}"
        found.append(mig.MigSlice(i, name, j, profile, _text(pynvml.nvmlDeviceGetUUID(mh)),
                                  int(mem.total), int(mem.free)))
    return mig.NvidiaGpu(i, name, uuid, tuple(found))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
    gpus, physical = [], []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = _text(pynvml.nvmlDeviceGetName(h))
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            physical.append(_nvml_slices(pynvml, h, i, name, _text(pynvml.nvmlDeviceGetUUID(h))))
            if not physical[-1].slices:
                gpus.append(GPU(name, int(mem.total), int(mem.free), "cuda"))
    finally:
        pynvml.nvmlShutdown()
    return slice_gpus(physical) + gpus


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

def detect_devices(notes: list[str]) -> tuple[list[GPU], bool]:
    """The GPUs here (NVIDIA via NVML, AMD via sysfs, Apple unified memory, else CUDA torch) and
    whether memory is unified; problems are appended to ``notes``."""
    gpus = _nvml_gpus(notes) or _amd_gpus()
    apple = _apple_gpu(psutil.virtual_memory().total)
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
    if not any(g.device for g in gpus) and apple is None:  # no NVML: MIG slices from nvidia-smi -L
        listed = mig.parse_nvidia_smi_l(mig.nvidia_smi_listing())
        if mig.slices(listed):
            whole = [g for g in listed if not g.slices]  # torch lists these (by name) besides one slice
            gpus = slice_gpus(listed) + [g for g in gpus if g.backend == "cuda" and g.device is None
                                          and any(w.name == g.name for w in whole)]
            notes.append("MIG slice memory taken from the profile names (3g.20gb = 20 GiB); "
                         "pip install nvidia-ml-py for the exact free memory")
    return gpus, apple is not None


def apply_gpu_speeds(hw: Hardware, measured: dict) -> None:
    """Give each GPU of ``hw`` its measured speed (``measured``: name -> figures), else a stated assumption."""
    for g in hw.gpus:
        m = measured.get(g.name)
        if m:
            g.bandwidth, g.matmul_bf16 = m["bandwidth"], m["matmul_bf16"]
        elif g.backend == "metal":
            g.bandwidth, g.matmul_bf16 = hw.cpu_bandwidth, hw.cpu_matmul_bf16
            hw.assumptions.append("Apple GPU speed taken from the CPU measurement of the same unified memory")
        else:
            g.bandwidth, g.matmul_bf16 = ASSUMED_GPU_BANDWIDTH, ASSUMED_GPU_MATMUL
            hw.assumptions.append(f"{g.name}: speed not measured (needs CUDA-enabled torch); assuming "
                                  f"{ASSUMED_GPU_BANDWIDTH / 1e9:.0f} GB/s, {ASSUMED_GPU_MATMUL / 1e12:.0f} "
                                  "TFLOP/s bf16")


# ---------------------------------------------------------------- speeds
def speeds_from(figures: dict) -> dict:
    """The Hardware speed fields from calibration figures; ``DEFAULT_SPEEDS`` for any missing one."""
    out = {k: figures.get(k, v) for k, v in DEFAULT_SPEEDS.items()}
    out["runtime_rss"] = int(out["runtime_rss"])
    return out


def bandwidth_at_width(hw: "Hardware", width: int) -> float:
    """The measured GEMV bandwidth for rows of ``width`` (log-interpolated; the flat figure if unmeasured)."""
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
