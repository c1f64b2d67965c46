# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing (torch==2.13.0 first and explicitly, so that nothing
# later pulls a CUDA build) and reuse it otherwise.
PYTHON ?= python3
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
	$(VENV)/bin/gradmetanet run curvature --preset quick --out runs/curvature-quick

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/capture.py

clean-venv:
	rm -rf $(VENV)
