"""NVIDIA GPUs shared as MIG slices: what is here, and choosing one before CUDA starts.

A GPU partitioned with Multi-Instance GPU (A100, H100, H200, ...) shows up as several slices, each
with its own memory and its own UUID (``MIG-...``). A CUDA process uses one slice, the one
``CUDA_VISIBLE_DEVICES`` names, and the driver reads that variable once, when CUDA initialises;
setting it later does nothing. :func:`visible_device` does this set-up for the user: it turns
``--device mig:N`` / ``mig:UUID`` (and ``cuda:N`` on a partitioned machine, which then counts slices)
into ``CUDA_VISIBLE_DEVICES=MIG-...`` plus ``cuda:0``, before torch touches CUDA, and refuses in one
line when CUDA has already started in this process.

Slices are read from NVML (``pynvml``, from nvidia-ml-py, when installed: exact memory) or parsed
from ``nvidia-smi -L``::

    GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5ba0d6-...)
      MIG 3g.20gb     Device  0: (UUID: MIG-c6d4f1ef-...)

where a slice's memory comes from its profile name (``3g.20gb``: 3 compute slices, 20 GB).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import MutableMapping

from gptlab.errors import GptlabError
from gptlab.logs import get_logger

GiB = 2**30

log = get_logger(__name__)

_GPU_LINE = re.compile(r"^GPU (\d+): (.+?) \(UUID: (GPU-[0-9A-Za-z-]+)\)\s*$")
# new drivers: MIG-<uuid>; R450-era drivers: MIG-GPU-<gpu uuid>/<gi>/<ci>
_MIG_LINE = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (MIG-[^)\s]+)\)\s*$")
_PROFILE_MEMORY = re.compile(r"\.(\d+)gb", re.I)


@dataclass(frozen=True)
class MigSlice:
    """One MIG instance of a GPU."""

    gpu: int  # index of the physical GPU (nvidia-smi's GPU N)
    gpu_name: str
    index: int  # the slice's MIG device index on that GPU
    profile: str  # e.g. "3g.20gb"
    uuid: str  # MIG-...
    memory_total: int | None = None  # bytes, from NVML; None: only the profile's nominal size is known
    memory_free: int | None = None

    @property
    def memory(self) -> int:
        """Bytes of memory: NVML's figure, else the profile's (``3g.20gb`` -> 20 GiB)."""
        if self.memory_total is not None:
            return self.memory_total
        m = _PROFILE_MEMORY.search(self.profile)
        return int(m.group(1)) * GiB if m else 0


@dataclass(frozen=True)
class NvidiaGpu:
    """One physical NVIDIA GPU and its MIG slices (none when it is not partitioned)."""

    index: int
    name: str
    uuid: str
    slices: tuple[MigSlice, ...] = field(default=())


def parse_nvidia_smi_l(text: str) -> list[NvidiaGpu]:
    """The GPUs and MIG slices in ``nvidia-smi -L`` output (lines it does not know are skipped)."""
    gpus: list[NvidiaGpu] = []
    for line in text.splitlines():
        if m := _GPU_LINE.match(line):
            gpus.append(NvidiaGpu(int(m.group(1)), m.group(2).strip(), m.group(3)))
        elif (m := _MIG_LINE.match(line)) and gpus:
            g = gpus[-1]
            s = MigSlice(g.index, g.name, int(m.group(2)), m.group(1), m.group(3))
            gpus[-1] = NvidiaGpu(g.index, g.name, g.uuid, g.slices + (s,))
    return gpus


def nvidia_smi_listing(timeout: float = 5.0) -> str:
    """``nvidia-smi -L`` output ('' when nvidia-smi is not installed or fails)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ""
    try:
        return subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def slices(gpus: list[NvidiaGpu]) -> list[MigSlice]:
    """Every MIG slice, numbered as ``mig:N`` counts them: GPU by GPU, in device order."""
    return [s for g in gpus for s in g.slices]


def cuda_units(gpus: list[NvidiaGpu]) -> list[tuple[str, str]]:
    """(UUID, label) of what ``cuda:N`` counts on a partitioned machine: the slices of a partitioned
    GPU, and each GPU that is not partitioned as itself."""
    units = []
    for g in gpus:
        if g.slices:
            units += [(s.uuid, f"GPU {g.index} MIG {s.profile} ({s.uuid})") for s in g.slices]
        else:
            units.append((g.uuid, f"GPU {g.index} {g.name} ({g.uuid})"))
    return units


def find_slice(spec: str, gpus: list[NvidiaGpu]) -> MigSlice:
    """The slice ``spec`` names: ``N`` (its place in :func:`slices`), a full ``MIG-...`` UUID, or a
    unique start of one (with or without ``MIG-``)."""
    all_slices = slices(gpus)
    if not all_slices:
        raise GptlabError(f"device='mig:{spec}': no MIG slices here (nvidia-smi -L lists none); "
                          "use --device cuda, cuda:N or cpu")
    listed = ", ".join(f"mig:{i} = GPU {s.gpu} {s.profile} {s.uuid}" for i, s in enumerate(all_slices))
    if spec.isdigit():
        if int(spec) >= len(all_slices):
            raise GptlabError(f"device='mig:{spec}': this machine has {len(all_slices)} MIG slices ({listed})")
        return all_slices[int(spec)]
    want = spec if spec.upper().startswith("MIG-") else f"MIG-{spec}"
    hits = [s for s in all_slices if s.uuid.lower() == want.lower()] or \
        [s for s in all_slices if s.uuid.lower().startswith(want.lower())]
    if len(hits) != 1:
        why = "matches no MIG slice" if not hits else f"matches {len(hits)} slices"
        raise GptlabError(f"device='mig:{spec}' {why}; pick one of: {listed}")
    return hits[0]


def cuda_started() -> bool:
    """True when CUDA has already initialised in this process (CUDA_VISIBLE_DEVICES is then fixed)."""
    import torch

    if torch.cuda.is_initialized():
        return True
    try:  # the driver answers CUDA_ERROR_NOT_INITIALIZED (3) until cuInit has run
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False  # no NVIDIA driver: nothing has started
    count = ctypes.c_int(0)
    return lib.cuDeviceGetCount(ctypes.byref(count)) != 3


def _make_visible(uuid: str, device: str, env: MutableMapping[str, str], started: bool) -> str:
    """Set ``CUDA_VISIBLE_DEVICES=uuid`` (unless it already is); the torch device then meant: cuda:0."""
    current = env.get("CUDA_VISIBLE_DEVICES")
    if current == uuid:
        return "cuda:0"
    if started:
        raise GptlabError(f"device={device!r} needs CUDA_VISIBLE_DEVICES={uuid}, but CUDA has already started in "
                          f"this process (with CUDA_VISIBLE_DEVICES={current or 'unset'}); set it before starting: "
                          f"CUDA_VISIBLE_DEVICES={uuid} gptlab ...")
    if current:
        log.info("--device %s replaces CUDA_VISIBLE_DEVICES=%s with %s", device, current, uuid)
    env["CUDA_VISIBLE_DEVICES"] = uuid
    return "cuda:0"


def visible_device(device: str, listing: str | None = None, env: MutableMapping[str, str] | None = None,
                   started: bool | None = None) -> str:
    """Do the MIG set-up a device choice asks for; returns the torch device name to use.

    - ``mig:N`` / ``mig:UUID``: sets ``CUDA_VISIBLE_DEVICES`` to that slice's UUID, returns ``cuda:0``;
    - ``cuda:N`` when a GPU here is partitioned and ``CUDA_VISIBLE_DEVICES`` is not set: N counts
      slices (see :func:`cuda_units`), and that one is made visible the same way;
    - anything else is returned unchanged.

    ``listing`` (``nvidia-smi -L`` text), ``env`` and ``started`` default to this machine's; tests
    pass recorded ones.
    """
    name = device.strip()
    env = os.environ if env is None else env
    is_mig = name.lower().startswith("mig:")
    m = re.fullmatch(r"cuda:(\d+)", name.lower())
    if not is_mig and m is None:
        return device
    if m is not None and env.get("CUDA_VISIBLE_DEVICES") and not _set_by_us(env):
        return device  # the user chose what CUDA sees: cuda:N counts those devices
    gpus = parse_nvidia_smi_l(nvidia_smi_listing() if listing is None else listing)
    if is_mig:
        uuid = find_slice(name[4:].strip(), gpus).uuid
    else:
        if not slices(gpus):
            return device  # no partitioned GPU: cuda:N is torch's own numbering
        units = cuda_units(gpus)
        n = int(m.group(1))
        if n >= len(units):
            raise GptlabError(f"device={device!r}: with MIG, cuda:N counts slices; this machine has {len(units)} "
                              f"(cuda:0 to cuda:{len(units) - 1}: {'; '.join(label for _, label in units)})")
        uuid = units[n][0]
    out = _make_visible(uuid, device, env, cuda_started() if started is None else started)
    env["GPTLAB_MIG_SELECTED"] = uuid  # so a second choice in this process knows the variable is ours
    return out


def _set_by_us(env: MutableMapping[str, str]) -> bool:
    return env.get("GPTLAB_MIG_SELECTED") == env.get("CUDA_VISIBLE_DEVICES")


__all__ = ["MigSlice", "NvidiaGpu", "cuda_started", "cuda_units", "find_slice", "nvidia_smi_listing",
           "parse_nvidia_smi_l", "slices", "visible_device"]
