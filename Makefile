# Two commands matter on a fresh machine: `make serve` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: serve test test-maxima test-autoscale unit integration bench install clean system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first: a bare `torch` requirement would pull the multi-GB CUDA stack on a CPU machine.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e ".[test]"
	# inference-sdk pins opencv-python (a second cv2 over the headless one) and an older numpy: its own
	# dependencies are in the test extra, the package itself goes in without them (docs/sdks.md)
	$(PIP) install --quiet --no-deps inference-sdk==1.8.3
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m serve_app.main

# Debian packages the tests use for real (never mocks): redis-server for the Redis state backend, jq for the docs'
# curl examples, chromium for the web UI's browser test (Playwright cannot download browsers here). Installed with apt when missing and we are root; otherwise those tests skip and say why.
SYSTEM_TOOLS := redis-server:redis-server jq:jq chromium:chromium
system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do tool=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$tool >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing with apt-get"; \
	    (apt-get install -y -qq $$missing >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq $$missing >/dev/null)) \
	      || echo "could not install$$missing: the tests that need them will skip"; \
	  else echo "missing$$missing (not root or no apt-get): the tests that need them will skip"; fi; fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q -p no:cacheprovider --durations=40 tests

# The documented maxima that take many minutes of CPU (16 prompts x 100 instances on 40 MP: ~9 min on 2 cores).
test-maxima: $(STAMP)
	SAM3_TEST_MAXIMA=1 $(PY) -m pytest -q -s -p no:cacheprovider -m maxima tests

# The Locust autoscaling load test (~4 min): not in make test yet, it does not pass on 2 cores (docs/cluster.md).
test-autoscale: $(STAMP)
	$(PY) -m pytest -q -s -p no:cacheprovider -m autoscale tests

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP)
	$(PY) -m pytest -q tests/integration

bench: $(STAMP)
	$(PY) load_tests/bench_image.py

clean:
	rm -rf $(VENV) .pytest_cache
