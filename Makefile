# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing (torch==2.13.0 first and explicitly, so that nothing
# later pulls a CUDA build) and reuse it otherwise.
# PyTorch CPU threads for both commands: one thread is as fast as two on this project's small kernels when
# the machine is idle, and 2-5x faster when another process is busy (thread oversubscription).
# `make test THREADS=2` overrides it.
PYTHON ?= python3
THREADS ?= 1
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradmetanet-installed

.PHONY: demo test bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(VENV)/bin/gradmetanet run curvature --preset quick --threads $(THREADS) \
		--out runs/curvature-quick --overwrite

test: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/capture.py

clean-venv:
	rm -rf $(VENV)
