#!/usr/bin/env bash
# One GPU session's checks, in one call (the device tool lends ~15 minutes): the CUDA tests, the
# course's speed ladder and the captured decode step.
# Run from the repository root on the CUDA machine, with the python that holds PyTorch:
#     PY=python3 bash benchmarks/gpu_check.sh          # logs under $OUT (default /tmp/gpu_check)
# The GGUF file does not travel (over the transfer limit): the decode benchmark uses SmolLM2's shape
# with random weights. Each part has its own time limit so that one hang cannot eat the rest.
set -u
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
# every test that skips without CUDA, by file (their CUDA tests run here; the CPU ones run too, quickly)
timeout 240 "$PY" -m pytest -q -rs -p no:cacheprovider -x \
    tests/inference/test_decode_graph.py tests/training/test_speed.py tests/training/test_losses.py \
    tests/test_device.py tests/weights/test_native.py 2>&1 | tee "$OUT/tests.log" | tail -25
timeout 200 "$PY" benchmarks/speed_ladder.py 2>&1 | tee "$OUT/ladder.log"
timeout 120 "$PY" benchmarks/decode_cuda.py --random --new-tokens 128 2>&1 | tee "$OUT/decode.log"
