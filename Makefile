# One command each, on a fresh machine: `make demo` (the main job) and `make test`.
# Both install what they need first into .venv (pinned versions from requirements.lock).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint demo demo-quick bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

lint: install
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/jestkit demo $(DEMO_ARGS)

demo-quick: install
	$(BIN)/jestkit demo --quick $(DEMO_ARGS)

bench: install
	$(BIN)/python benchmarks/selection_speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache .hypothesis
