# enpcg: `make demo` runs the whole pipeline, `make test` the test suite. Both create .venv on first use
# (about 7 GB: torch 2.9.1 with its CUDA libraries, which the openmmtorch wheel links) and reuse it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.enpcg-installed

.PHONY: all demo test bench venv clean

all: test

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/enpcg demo --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

bench: $(STAMP)
	$(PY) bench/run_bench.py --platform CPU

clean:
	rm -rf out .pytest_cache
