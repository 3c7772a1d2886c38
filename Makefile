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

# The controller on the built-in simulated host (a 2-socket Xeon with six VMs): daemon mode,
# live table on the terminal, Prometheus metrics on 127.0.0.1:19650, logs in .demo/log.
DEMO_TICKS ?= 90
demo: $(STAMP)
	mkdir -p .demo
	$(BIN)/adaptive-pin run --driver sim --scenario demo --interval 1 --ticks $(DEMO_TICKS) --watch \
	    --metrics-address 127.0.0.1:19650 --log-format plain \
	    --state-file $(CURDIR)/.demo/state.json --lock-file $(CURDIR)/.demo/lock 2>.demo/log
	@echo "demo done: decisions in .demo/log; 'adaptive-pin simulate demo --policy cache-aware' scores it"

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
