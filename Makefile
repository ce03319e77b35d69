# Two commands on a fresh machine (Python 3.11+ and pip are all it needs):
#   make run    set up .venv if needed, then run the main job: the model-families comparison on
#               the built-in dataset (no download), ending with a table; its runs train side by
#               side, one per CPU core
#   make test   set up .venv if needed, then lint and run the whole test suite
# Running either again reuses .venv; it is reinstalled only when pyproject.toml, setup.py or the
# C++ extension (csrc/) changes.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
RUN_DIR ?= runs

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml setup.py csrc/onednn_conv.cc
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $(BENCH_STAMP)

run: $(STAMP)
	$(PY) -m experiments run families:small --output=$(RUN_DIR)/families_small

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.throughput
	$(PY) -m benchmarks.compile_time
	$(PY) -m benchmarks.conv_parts --step_times=benchmarks/results/throughput.json

clean:
	rm -rf $(VENV) $(RUN_DIR) .pytest_cache .ruff_cache .hypothesis
