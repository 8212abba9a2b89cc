# hbat developer commands. `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# re-run the install when the build inputs change
STAMP  := $(VENV)/.hbat-installed
BUILD_INPUTS := setup.py $(wildcard csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
NVCC   ?= $(shell command -v nvcc 2>/dev/null)

.PHONY: setup demo compare ops-demo test bench compile-cuda info clean

setup: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	# the local CPU wheel; never let pip resolve another torch
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet ninja numpy
	$(BIN)/pip install --quiet --no-build-isolation -e '.[test]'
	@touch $(STAMP)
	@$(BIN)/python -m hbat.info | sed -n '/extensions:/,$$p'

# the main job on the embedded default: two-stage SFT -> DPO and HBAT side by side (CPU, a few minutes)
demo: setup
	$(BIN)/python -m hbat.demo

# the paper-style comparison of every method on the embedded task (CPU, about 15 minutes)
compare: setup
	$(BIN)/hbat compare

# the fused ops on a Llama-shaped list of tensors against the naive penalty
ops-demo: setup
	$(BIN)/python -m hbat.ops_demo

test: setup
	$(BIN)/python -m pytest -q tests

info: setup
	$(BIN)/python -m hbat.info

# compile-only check of every CUDA source (no GPU needed): sm_80 and sm_90
compile-cuda:
	@if [ -z "$(NVCC)" ]; then echo "nvcc not found: skipping the CUDA compile check"; else \
	  for f in csrc/cuda/*.cu; do echo "nvcc -c $$f"; \
	    $(NVCC) -std=c++17 -O3 --expt-relaxed-constexpr -Icsrc \
	      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	      -c $$f -o /tmp/hbat-$$(basename $$f).o || exit 1; done; fi

bench: setup
	$(BIN)/python benchmarks/bench_ops.py
	$(BIN)/python benchmarks/bench_importance.py
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf build *.egg-info hbat/*.so .pytest_cache
