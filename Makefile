# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test train train-instrument export bench eval clean

# Runtime only: no torch, no music21.
$(BIN)/.runtime: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e .
	touch $@

# Runtime + dev + train extras (torch pinned to the local CPU build).
$(BIN)/.dev: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev,train]"
	touch $@ $(BIN)/.runtime

demo: $(BIN)/.runtime
	$(BIN)/coplayer demo --out out/demo

test: $(BIN)/.dev
	$(BIN)/python -m pytest -q

# Training, export and benchmarks are never part of `make test`.
train: train-instrument

train-instrument: $(BIN)/.dev
	$(BIN)/coplayer train instrument

eval: $(BIN)/.dev
	$(BIN)/coplayer eval instrument

bench: $(BIN)/.dev
	$(BIN)/python benchmarks/instrument_step.py

clean:
	rm -rf $(VENV) out build *.egg-info
