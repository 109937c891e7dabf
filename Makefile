# The two README commands live here: `make demo` (main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo walkthrough test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'

# The runaway agent stopped by its budget (a real LiteLLM proxy on loopback; no key, no network).
# Options: make demo ARGS="--mode shadow" (or --quick, --budget 50usd, --max-iterations N).
demo: setup
	$(BIN)/python examples/runaway_agent.py $(ARGS)

# The ledger step by step with the `cycles` CLI on a fresh SQLite file.
walkthrough: setup
	$(BIN)/python examples/ledger_walkthrough.py

test: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

bench: setup
	$(BIN)/python bench/ledger.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
