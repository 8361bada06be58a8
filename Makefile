# The two front-door commands: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DAGSTER_HOME := $(CURDIR)/.dagster_home

.PHONY: install demo test lint ui bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME)
	printf 'telemetry:\n  enabled: false\n' > $@

demo: install $(DAGSTER_HOME)/dagster.yaml
	test -f demo/shop.db || $(BIN)/python -m conduit_dagster.demo build --rows 300000 --path demo/shop.db
	DAGSTER_HOME=$(DAGSTER_HOME) $(BIN)/dagster job execute -m conduit_dagster.definitions -j ingest_all
	$(BIN)/python -m conduit_dagster.demo summary --file ingest.yml

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check conduit_dagster conduit_dagster_tests bench
	$(BIN)/ruff format --check conduit_dagster conduit_dagster_tests bench
	$(BIN)/mypy

ui: install $(DAGSTER_HOME)/dagster.yaml
	DAGSTER_HOME=$(DAGSTER_HOME) $(BIN)/dagster dev -w workspace.yaml

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/pg_to_parquet.py --rows 1000000,5000000 --repeat 3

clean:
	rm -rf demo_output .checkpoints demo/shop.db $(DAGSTER_HOME)
