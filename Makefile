# hbat developer commands. `make demo` and `make test` set up .venv on first use, from the pinned lock.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCK   := requirements/lock.txt
# re-run the install when the build inputs or the lock change
STAMP  := $(VENV)/.hbat-installed
BUILD_INPUTS := setup.py $(LOCK) requirements/venv.sh $(wildcard csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
NVCC   ?= $(shell command -v nvcc 2>/dev/null)
# `make test-latest` / `make test-oldest`: a subset (about 3 minutes) that imports and runs every integration:
# transformers and the trainer end to end (README run), TRL and accelerate (callback, examples), peft (LoRA),
# datasets (data sources), DeepSpeed (hbat train under torchrun), Triton (ops under the interpreter)
RANGE_TESTS := tests/test_packaging.py tests/test_integrations.py tests/test_examples.py tests/test_data_sources.py \
	tests/test_trainer_readme.py tests/test_ops.py tests/test_optim.py \
	tests/test_trainer_models.py::test_lora_trains_only_adapters_against_the_base_and_saves_for_peft \
	tests/test_trainer_deepspeed.py::test_cli_train_under_torchrun

.PHONY: setup lock docs demo compare ops-demo test test-latest test-oldest bench bench-check compile-cuda info clean

setup: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	@PYTHON=$(PYTHON) bash requirements/venv.sh locked $(VENV)
	@touch $(STAMP)
	@$(BIN)/python -m hbat.info | sed -n '/extensions:/,$$p'

# regenerate the lock from setup.py's ranges and requirements/lock.in (the newest versions today)
lock: setup
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --no-build-isolation --extra test --extra docs \
	  --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links -o $(LOCK) setup.py requirements/lock.in

# the documentation (docs/, mkdocs.yml) as a static site in site/; any warning fails the build
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# the main job on the embedded default: two-stage SFT -> DPO and HBAT side by side (CPU, a few minutes)
demo: setup
	$(BIN)/python -m hbat.demo

# the default comparison on the embedded task at one seed (CPU, about 10 minutes; 5 seeds: docs/results/make_results.py)
compare: setup
	$(BIN)/hbat compare

# the fused ops on a Llama-shaped list of tensors against the naive penalty
ops-demo: setup
	$(BIN)/python -m hbat.ops_demo

test: setup
	$(BIN)/python -m pytest -q tests

# the newest versions setup.py's ranges allow, in .venv-latest (torch stays the machine's 2.13.0 CPU wheel)
test-latest:
	@PYTHON=$(PYTHON) bash requirements/venv.sh latest .venv-latest
	HBAT_UNLOCKED=1 .venv-latest/bin/python -m pytest -q -p no:cacheprovider $(RANGE_TESTS)

# the lower bounds of those ranges (requirements/bounds.py), in .venv-oldest
test-oldest:
	@PYTHON=$(PYTHON) bash requirements/venv.sh oldest .venv-oldest
	HBAT_UNLOCKED=1 .venv-oldest/bin/python -m pytest -q -p no:cacheprovider $(RANGE_TESTS)

info: setup
	$(BIN)/python -m hbat.info

# compile-only check of every CUDA source (no GPU needed): sm_80 and sm_90
compile-cuda:
	@if [ -z "$(NVCC)" ]; then echo "nvcc not found: skipping the CUDA compile check"; else \
	  for f in csrc/cuda/*.cu; do echo "nvcc -c $$f"; \
	    $(NVCC) -std=c++17 -O3 --expt-relaxed-constexpr -Icsrc \
	      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	      -c $$f -o /tmp/hbat-$$(basename $$f).o || exit 1; done; fi

# the benchmark gate (about 10 s): every op and the fused optimizer step against the committed baseline
bench-check: setup
	$(BIN)/python benchmarks/bench_check.py

bench: setup
	$(BIN)/python benchmarks/bench_ops.py
	$(BIN)/python benchmarks/bench_importance.py
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf build site *.egg-info hbat/*.so .pytest_cache .venv-latest .venv-oldest
