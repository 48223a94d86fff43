# fairbalance: `make test` and `make demo` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fairbalance-setup
export FIFTYONE_DATABASE_VALIDATION ?= false
export FIFTYONE_DO_NOT_TRACK ?= true

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# the demo's small models: one thread per process does the same work without the spin-waits of a second one
# (10 diffusion training steps on a busy 2-core machine: 6 s of CPU with 1 thread, 21 s with 2)
DEMO_THREADS ?= 1
demo: setup
	OMP_NUM_THREADS=$(DEMO_THREADS) MKL_NUM_THREADS=$(DEMO_THREADS) $(PY) -m fairbalance.ops.demo $(DEMO_ARGS)

bench: setup
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info python_lib/*.egg-info
