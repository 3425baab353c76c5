# LineInspect: the two commands in the README are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test check lint typecheck bench clean system-runtime system-test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train,dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

system-runtime:
	bash scripts/setup-system.sh runtime

system-test:
	bash scripts/setup-system.sh test

## Set up and run the appliance on its embedded default (synthetic line).
demo: system-runtime $(STAMP)
	$(BIN)/lineinspect demo

## Set up and run the whole test suite (what .ci/run calls).
test: system-test $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
