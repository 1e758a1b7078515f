# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first and pinned: this release resolves to a CPU wheel, whereas an
# unpinned torch pulls several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test install install-test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/mdetr demo --output-dir runs/demo

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/pip install --quiet ruff
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
