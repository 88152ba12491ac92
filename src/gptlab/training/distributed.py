"""Where this process stands in a multi-process run: torchrun's environment -> rank, world, device, backend.

``torchrun --nproc_per_node=N -m gptlab train ...`` (or ``gptlab train --nproc N``, which starts
``torch.distributed.run`` itself, see :func:`launch`) runs N copies of the same command. Each reads its
place from the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``);
:func:`setup` turns them into a :class:`Dist` and joins the process group:

    device      cuda -> cuda:LOCAL_RANK with NCCL; cpu -> gloo (MPS has no collective backend)
    is_main     rank 0: the only process that prints and writes the run's files
    failures    an error on any rank is raised as one line naming the rank (``rank 1: ...``); torchrun
                then stops the others, and :func:`launch` answers a killed rank in one line too

A process started without torchrun gets ``Dist()`` (rank 0 of 1, no process group), so library code
never needs to ask whether it runs distributed.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

from gptlab.errors import GptlabError

TIMEOUT_S = 600  # a collective waiting this long for a silent rank fails (torch's default is 30 min)
LAUNCHED = "GPTLAB_LAUNCHED"  # set by :func:`launch` for its workers: it reports a failed rank itself
LOST_PEER_EXIT = 75  # a worker that lost contact with a failed rank exits with this, silently, under launch


class LostPeer(GptlabError):
    """A collective failed because another rank is gone: that rank's failure is the one to report."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (the default: a single process, no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # "gloo" / "nccl" once the process group is joined; None: one plain process

    @property
    def is_main(self) -> bool:
        """Rank 0: prints and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group is joined (torchrun started this process), even at world size 1."""
        return self.backend is not None


def under_torchrun(environ=None) -> bool:
    """Whether torchrun (or a launcher like it, e.g. Slurm + torchrun) started this process."""
    environ = os.environ if environ is None else environ
    return all(v in environ for v in ("RANK", "WORLD_SIZE"))


def read_env(environ=None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, each checked."""
    environ = os.environ if environ is None else environ
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as e:
        raise GptlabError(f"the torchrun variables RANK/WORLD_SIZE/LOCAL_RANK are missing or not numbers ({e}); "
                          "start the run with torchrun or gptlab train --nproc N") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise GptlabError(f"RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local} do not describe a run "
                          "(need 0 <= RANK < WORLD_SIZE); start it with torchrun or gptlab train --nproc N")
    return rank, world, local


def backend_for(device: torch.device) -> str:
    """NCCL on CUDA, gloo on CPU."""
    if device.type == "cuda":
        return "nccl"
    if device.type == "cpu":
        return "gloo"
    raise GptlabError(f"distributed training on {device.type} is not supported (no collective backend); "
                      "use --device cpu or a CUDA GPU")


def setup(device: str = "auto", environ=None) -> Dist:
    """Join the run torchrun started (once per process), or return the single-process :class:`Dist`."""
    from gptlab.device import pick_device

    dev = pick_device(device)
    if not under_torchrun(environ):
        return Dist(device=dev)
    rank, world, local = read_env(environ)
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise GptlabError(f"rank {rank}: LOCAL_RANK {local} but this node has {torch.cuda.device_count()} "
                              "CUDA GPUs; start at most one process per GPU (--nproc_per_node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    backend = backend_for(dev)
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S), **kwargs)
    return Dist(rank, world, local, dev, backend)


def wait_for_all(d: Dist) -> None:
    """Every rank waits here until all have arrived (a no-op for a single process).

    A run's ranks finish at different times (rank 0 writes the report and a
    sample); one that destroyed its gloo process group while a peer was still
    inside it was seen to die with SIGABRT ("terminate called without an active
    exception"), so ranks meet here before :func:`teardown`.
    """
    if d.active and dist.is_initialized():
        dist.barrier()


def teardown(d: Dist) -> None:
    """Leave the process group (a no-op for a single process)."""
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: Sequence[float], d: Dist) -> list[float]:
    """The sum of ``values`` over every rank (the values themselves for a single process)."""
    if not d.active or d.world == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier(d: Dist) -> None:
    """Wait for every rank (a no-op for a single process)."""
    if d.active and d.world > 1:
        dist.barrier()


def broadcast_object(obj, d: Dist):
    """Rank 0's ``obj`` on every rank."""
    if not d.active or d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(value, d: Dist, needed: bool = True):
    """Rank 0's ``value`` on every rank, when ``needed`` (a decision each rank could make differently,
    such as a time limit read from its own clock); otherwise ``value`` as it is."""
    return broadcast_object(value, d) if needed else value


def rank_error(e: BaseException, d: Dist) -> GptlabError:
    """``e`` as one line naming the rank it happened on (a :class:`LostPeer` when another rank is gone)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, GptlabError):
        text = f"{type(e).__name__}: {text}"
    if d.world > 1 and isinstance(e, (RuntimeError, dist.DistError)) and _looks_like_lost_peer(text):
        return LostPeer(f"rank {d.rank} of {d.world}: lost contact with another rank ({text[:200]}); "
                        "that rank failed first, see its line")
    return GptlabError(f"rank {d.rank} of {d.world}: {text}")


def tell_launcher(err: GptlabError) -> bool:
    """Under :func:`launch`, hand ``err``'s line to it through torchrun's error file (every rank of a run
    usually fails alike: the launcher prints the first one, once); False when not launched by it."""
    import json
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not os.environ.get(LAUNCHED) or not path:
        return False
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"message": " ".join(str(err).split()), "timestamp": int(time.time())}, f)
    return True


def _looks_like_lost_peer(text: str) -> bool:
    return any(w in text.lower() for w in ("connection closed", "connection reset", "broken pipe", "timed out",
                                           "timeout", "gloo", "nccl"))


# ---- launching torch.distributed.run for the user (gptlab train --nproc N) ---------------------------

LAUNCH_FIELDS = ("nproc", "nnodes", "rdzv_endpoint")  # the launcher's settings, not the workers'


def launch(command: Sequence[str], settings: dict, *, nproc: int, nnodes: str = "1",
           rdzv_endpoint: str | None = None) -> int:
    """Run ``python -m gptlab COMMAND --config SETTINGS.yaml`` in ``nproc`` processes per node with
    ``torch.distributed.run`` (torchrun); returns 0, or raises one line naming the rank that failed."""
    import tempfile

    import yaml
    from torch.distributed.run import parse_args

    argv = ["--nproc_per_node", str(nproc), "--nnodes", str(nnodes), "--max_restarts", "0"]
    if rdzv_endpoint:
        argv += ["--rdzv_backend", "c10d", "--rdzv_endpoint", rdzv_endpoint]
    elif str(nnodes) != "1":
        raise GptlabError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node, e.g. the "
                          "first node's address and a free port)")
    else:
        argv += ["--standalone"]
    os.environ[LAUNCHED] = "1"  # the workers inherit it
    with tempfile.TemporaryDirectory(prefix="gptlab-launch-") as tmp:
        cfg_file = os.path.join(tmp, "settings.yaml")
        with open(cfg_file, "w", encoding="utf-8") as f:
            yaml.safe_dump(settings, f, sort_keys=False)
        argv += ["-m", "gptlab", *command, "--config", cfg_file]
        return _run_agent(parse_args(argv), settings.get("resume") or settings.get("out") or "RUN_DIR")


def _run_agent(args, run_dir: str = "RUN_DIR") -> int:
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run as torchrun

    for name in ("torch.distributed.elastic", "torch.distributed.run"):  # their tables repeat our one line
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        torchrun(args)
    except ChildFailedError as e:
        rank, failure = first_failure(e.failures)
        if failure.exitcode == 1 and str(failure.message).startswith("rank "):  # from tell_launcher
            raise GptlabError(failure.message) from None
        raise GptlabError(f"rank {rank} {_describe_exit(failure.exitcode)}; the other ranks were stopped. "
                          f"The last complete checkpoint is kept: continue with --resume {run_dir}") from None
    return 0


def first_failure(failures: dict) -> tuple[int, Any]:
    """(rank, failure) of the rank whose failure stopped the run: not one that merely lost contact with
    it (:data:`LOST_PEER_EXIT`) or was stopped by the launcher (SIGTERM), unless there is no other."""
    order = sorted(failures.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
    causes = [kv for kv in order if kv[1].exitcode not in (LOST_PEER_EXIT, -signal.SIGTERM)]
    return (causes or order)[0]


def _describe_exit(code: int) -> str:
    if code == LOST_PEER_EXIT:
        return "lost contact with the other ranks (a collective failed)"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"failed (exit status {code})"


def settings_for_workers(values: dict, drop: Iterable[str] = LAUNCH_FIELDS) -> dict:
    """The settings every worker runs with: the launcher's own fields removed."""
    return {k: v for k, v in values.items() if k not in set(drop)}

