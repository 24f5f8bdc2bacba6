# enpcg: `make demo` runs the whole pipeline, `make test` the test suite. Both create .venv on first use
# (about 7 GB: torch 2.9.1 with its CUDA libraries, which the openmmtorch wheel links) and reuse it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.enpcg-installed

.PHONY: all demo test bench bench-votca bench-lmax bench-oriented oriented-example glass-examples enp-model venv clean

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

# Spline force matching vs VOTCA's csg_fmatch on the demo's CG data (needs `make demo` and `apt-get install votca`).
bench-votca: $(STAMP)
	$(PY) bench/votca_fmatch.py --data out/demo/cg/cg.h5 --topology out/demo/cg/cg_topology.json --work out/bench_votca

# The equivariant potential of the bundled melt: training frames (seed 1) and an independent validation
# trajectory (seed 2) from the classical reference, then 10 minutes of training on the CPU.
ENP_DATA := out/enp/train.h5 out/enp/validation.h5

out/enp/train.h5: | $(STAMP)
	$(VENV)/bin/enpcg sample --out $@ --n-frames 200 --interval-steps 500 --seed 1

out/enp/validation.h5: | $(STAMP)
	$(VENV)/bin/enpcg sample --out $@ --n-frames 40 --interval-steps 500 --equilibration-steps 20000 --seed 2

enp-model: $(ENP_DATA)
	$(VENV)/bin/enpcg train --config systems/models/train_enp.yaml

# l_max = 0..3 cost and accuracy (about 25 minutes on 2 cores); outside `make bench` and `make test`.
bench-lmax: $(ENP_DATA)
	$(PY) bench/lmax.py

# Oriented beads: CG ortho-terphenyl vs the native atomistic model (bench/gpu_oriented.sh on a GPU machine),
# and the 3-methylpentane example end to end (about 5 minutes on 2 cores).
bench-oriented: $(STAMP)
	$(PY) bench/oriented.py --platform CPU --fit

oriented-example: $(STAMP)
	$(PY) examples/oriented_methylpentane.py --out out/oriented_methylpentane

# Glasses: the bead-spring polymer's T_g at two cooling rates (CPU; bench/gpu_glass.sh runs a larger one on a
# GPU machine) and 3-methylpentane CG dynamics in atomistic time (about 40 minutes on 2 cores).
glass-examples: $(STAMP)
	$(PY) examples/polymer_glass_transition.py --out out/polymer_tg
	$(PY) examples/glass_dynamics_methylpentane.py --out out/glass_dynamics

clean:
	rm -rf out .pytest_cache
