# Two commands matter on a fresh machine: `make serve` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: serve test unit integration bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first: a bare `torch` requirement would pull the multi-GB CUDA stack on a CPU machine.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m serve_app.main

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP)
	$(PY) -m pytest -q tests/integration

bench: $(STAMP)
	$(PY) load_tests/bench_image.py

clean:
	rm -rf $(VENV) .pytest_cache
