# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv, install torch==2.13.0 (CPU build) first, then the project.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test check test-slow lint typecheck protos protos-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedlens demo

test: check

check: $(STAMP)
	$(BIN)/python protos/generate.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow || [ $$? -eq 5 ]  # 5: no slow test selected

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

protos: $(STAMP)
	$(BIN)/python protos/generate.py

protos-check: $(STAMP)
	$(BIN)/python protos/generate.py --check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
