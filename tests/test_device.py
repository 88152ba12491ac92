"""Device choice: valid names pass, anything else is one GptlabError naming the valid values."""

import pytest
import torch

from gptlab.cli import run
from gptlab.device import pick_device
from gptlab.errors import GptlabError


def test_valid_devices():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("CPU") == torch.device("cpu")
    assert pick_device("cpu:0") == torch.device("cpu:0")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")


@pytest.mark.parametrize("bad", ["tpu", "cpu:zz", "cuda:-1", "gpu", ""])
def test_invalid_device_lists_the_valid_values(bad):
    with pytest.raises(GptlabError, match=r"is not a device; choose auto, cpu, cuda, cuda:N, mig:N, mig:UUID or mps"):
        pick_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_named():
    with pytest.raises(GptlabError, match="no CUDA GPU is available here"):
        pick_device("cuda:0")


@pytest.mark.parametrize("argv", [
    ["generate", "gpt2-nano", "--max-new-tokens", "1"],
    ["eval", "--model", "no-such-model"],
    ["train", "--max-steps", "1"],
    ["classify", "--model", "no-such-model", "--text", "hi"],
])
def test_bad_device_is_one_line_on_every_command(argv, capsys):
    assert run([*argv, "--device", "tpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --device 'tpu' is not a device; choose auto, cpu, cuda, cuda:N, mig:N, mig:UUID or mps")
    assert err.count("\n") == 1 and "Traceback" not in err
