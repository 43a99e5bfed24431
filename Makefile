# Two entry points a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test test-fast lint demo up bench clean constraints

# constraints.txt holds the versions the suite was last run green with (`make constraints` renews it).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP)
	scripts/ensure-chromium
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	# One worker per core (pytest-xdist): each test holds its own stack, so they run side by side.
	$(BIN)/pytest -n auto

# The edit loop: no browser, nothing marked slow, stop at the first failure.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -x -q -m "not browser and not slow"

constraints:
	$(BIN)/pip freeze --exclude-editable | grep -v '^flowscope' > constraints.txt

demo: $(STAMP)
	$(BIN)/flowscope demo

up: $(STAMP)
	$(BIN)/flowscope up

bench: $(STAMP)
	$(BIN)/python bench/engine_overhead.py

clean:
	rm -rf $(VENV) .flowscope .mypy_cache .pytest_cache .ruff_cache
