# The two commands of the README's quick start, and what they need.
# `make demo`: set up, then run the controller on the built-in simulated host.
# `make test`: set up, then run every test (integration tests need QEMU, libvirtd, Prometheus:
#              on a machine without them they skip; `.ci/run` installs and starts them).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,libvirt,plot]' || $(BIN)/pip install --quiet -e '.[dev,plot]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/adaptive-pin topology

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
