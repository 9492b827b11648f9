PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench-ingest bench-train bench-load bench-faults clean

venv: $(STAMP)

# Rebuilds the venv when the dependency declarations change.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[train,test]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/prospect demo

bench-ingest: venv
	$(PY) bench/ingest.py

# KTO training throughput against TRL (issue 4). On a GPU: make bench-train BENCH_ARGS="--size 0.5b";
# the default is the CPU smoke run (tiny model, about a minute).
BENCH_ARGS ?= --size tiny --device cpu
bench-train: venv
	$(PY) bench/train_throughput.py $(BENCH_ARGS)

# Several minutes of mixed ingestion + dashboard reads (docs/benchmarks.md).
bench-load: venv
	$(PY) bench/load.py $(LOAD_ARGS)

# Fault scenarios on throw-away servers (docs/reliability.md); disk-full and pg-restart need root.
bench-faults: venv
	$(PY) bench/faults/run.py all

clean:
	rm -rf $(VENV) var *.egg-info
