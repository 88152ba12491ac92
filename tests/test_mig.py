"""MIG slices: parsing recorded ``nvidia-smi -L`` outputs of partitioned A100 and H100 machines, and
turning --device mig:N / mig:UUID / cuda:N into CUDA_VISIBLE_DEVICES before CUDA starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptlab import mig
from gptlab.device import pick_device
from gptlab.errors import GptlabError

GiB = 2**30
RECORDED = Path(__file__).parent / "assets" / "nvidia-smi"
A100 = (RECORDED / "a100-40gb-mig.txt").read_text()  # one A100 40GB: 3g.20gb + 2g.10gb + 1g.5gb + 1g.5gb
H100 = (RECORDED / "h100-80gb-mixed.txt").read_text()  # GPU 0: 4g.40gb + 2g.20gb + 1g.10gb; GPU 1 whole
R450 = (RECORDED / "a100-r450-mig.txt").read_text()  # the older MIG-GPU-<uuid>/<gi>/<ci> UUIDs
WHOLE = (RECORDED / "h200-whole.txt").read_text()  # no MIG


def test_parse_partitioned_a100():
    (gpu,) = mig.parse_nvidia_smi_l(A100)
    assert (gpu.index, gpu.name, gpu.uuid) == (0, "NVIDIA A100-SXM4-40GB", "GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77")
    assert [s.profile for s in gpu.slices] == ["3g.20gb", "2g.10gb", "1g.5gb", "1g.5gb"]
    assert [s.index for s in gpu.slices] == [0, 1, 2, 3]
    assert [s.memory for s in gpu.slices] == [20 * GiB, 10 * GiB, 5 * GiB, 5 * GiB]
    assert gpu.slices[1].uuid == "MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb"


def test_parse_mixed_h100_and_old_driver_uuids():
    gpus = mig.parse_nvidia_smi_l(H100)
    assert [len(g.slices) for g in gpus] == [3, 0] and gpus[1].name == "NVIDIA H100 80GB HBM3"
    assert [s.memory // GiB for s in mig.slices(gpus)] == [40, 20, 10]
    assert [u for u, _ in mig.cuda_units(gpus)] == [s.uuid for s in gpus[0].slices] + [gpus[1].uuid]
    old = mig.slices(mig.parse_nvidia_smi_l(R450))
    assert [s.uuid for s in old] == ["MIG-GPU-e91edf3b-b297-37c1-a2a7-7601c7e6b5f0/7/0",
                                     "MIG-GPU-e91edf3b-b297-37c1-a2a7-7601c7e6b5f0/8/0"]
    assert mig.parse_nvidia_smi_l(WHOLE)[0].slices == () and mig.parse_nvidia_smi_l("") == []


def test_mig_device_sets_cuda_visible_devices():
    env: dict[str, str] = {}
    assert mig.visible_device("mig:1", A100, env, started=False) == "cuda:0"
    assert env["CUDA_VISIBLE_DEVICES"] == "MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb"
    env = {}
    assert mig.visible_device("mig:1d099e0e", A100, env, started=False) == "cuda:0"  # a unique UUID start
    assert env["CUDA_VISIBLE_DEVICES"] == "MIG-1d099e0e-1e8e-5d0c-8e22-5c4a3d1a0b6e"
    env = {"CUDA_VISIBLE_DEVICES": "0"}  # an explicit mig: choice replaces the user's own, before CUDA starts
    assert mig.visible_device("MIG:MIG-8f0b5a2e-7c1d-5e3f-9a4b-2d6c8e1f0a3b", A100, env, started=False) == "cuda:0"
    assert env["CUDA_VISIBLE_DEVICES"] == "MIG-8f0b5a2e-7c1d-5e3f-9a4b-2d6c8e1f0a3b"
    # the same choice again in a process where CUDA has started: nothing to change
    assert mig.visible_device("mig:3", A100, env, started=True) == "cuda:0"


def test_cuda_n_counts_slices_on_a_partitioned_machine():
    env: dict[str, str] = {}
    assert mig.visible_device("cuda:2", H100, env, started=False) == "cuda:0"
    assert env["CUDA_VISIBLE_DEVICES"] == "MIG-7f6e5d4c-3b2a-5190-8f7e-6d5c4b3a2f1e"  # GPU 0's third slice
    assert mig.visible_device("cuda:2", H100, env, started=True) == "cuda:0"  # asked again: still that one
    env = {}
    assert mig.visible_device("cuda:3", H100, env, started=False) == "cuda:0"
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-e2d1c0b9-a8f7-e6d5-c4b3-a2f1e0d9c8b7"  # the whole GPU 1
    with pytest.raises(GptlabError, match=r"cuda:N counts slices; this machine has 4 \(cuda:0 to cuda:3: GPU 0 MIG"):
        mig.visible_device("cuda:4", H100, {}, started=False)


def test_left_alone_without_mig_or_when_the_user_chose():
    env: dict[str, str] = {}
    assert mig.visible_device("cuda:1", WHOLE, env, started=False) == "cuda:1" and env == {}
    env = {"CUDA_VISIBLE_DEVICES": "1"}
    assert mig.visible_device("cuda:0", H100, env, started=False) == "cuda:0" and env == {"CUDA_VISIBLE_DEVICES": "1"}
    for name in ("cpu", "auto", "cuda", "mps"):
        assert mig.visible_device(name, A100, env, started=False) == name


def test_bad_mig_choices_say_what_is_there():
    with pytest.raises(GptlabError, match=r"mig:7'.*has 4 MIG slices \(mig:0 = GPU 0 3g.20gb MIG-c6d4f1ef"):
        mig.visible_device("mig:7", A100, {}, started=False)
    with pytest.raises(GptlabError, match="mig:feed' matches no MIG slice; pick one of: mig:0 = "):
        mig.visible_device("mig:feed", A100, {}, started=False)
    with pytest.raises(GptlabError, match="no MIG slices here"):
        mig.visible_device("mig:0", WHOLE, {}, started=False)
    with pytest.raises(GptlabError, match="CUDA has already started in this process .*CUDA_VISIBLE_DEVICES=MIG-c6d4"):
        mig.visible_device("mig:0", A100, {"CUDA_VISIBLE_DEVICES": "0"}, started=True)


def test_pick_device_does_the_set_up_before_cuda(monkeypatch):
    """Through the one device entry: the variable is set from the (recorded) listing, then checked."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("GPTLAB_MIG_SELECTED", raising=False)
    monkeypatch.setattr(mig, "nvidia_smi_listing", lambda timeout=5.0: A100)
    monkeypatch.setattr(mig, "cuda_started", lambda: False)
    import os

    import torch

    if torch.cuda.is_available():
        pytest.skip("a real CUDA machine: its own GPUs, not the recorded A100")
    with pytest.raises(GptlabError, match="no CUDA GPU is available here"):
        pick_device("mig:0")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f"
    assert str(pick_device("cpu")) == "cpu"
