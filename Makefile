# Everything installs into ./.venv; nothing else on the machine is touched.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: install, then start two built-in model servers with the gateway in front
##       (other ports: make demo PORT=8081 ADMIN_PORT=9091; more: ARGS='--error-rate 0.2')
PORT       ?= 8080
ADMIN_PORT ?= 9090
ARGS       ?=
demo: $(STAMP)
	$(BIN)/gateway demo --port $(PORT) --admin-port $(ADMIN_PORT) $(ARGS)

## run: install, then run the gateway with CONFIG (default config/gateway.yaml)
CONFIG ?= config/gateway.yaml
run: $(STAMP)
	$(BIN)/gateway run -c $(CONFIG)

## test: install, then run the test suite
test: $(STAMP)
	$(BIN)/pytest

## lint: ruff on the package, tests and bench; mypy (strict) on the package
lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/mypy gateway

## bench: the benchmark harness (see bench/README.md; wrk and nginx are optional)
bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
