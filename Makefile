# Two commands matter on a fresh machine: `make serve` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The environment comes from a lock (requirements/, docs/deploy.md): `make install` installs it, `make lock` writes it.
# FLAVOR picks torch's build: cpu (requirements/cpu.lock, torch +cpu) unless nvidia-smi is found; FLAVOR=cuda or
# FLAVOR=cpu to choose. TORCH_VERSION is the torch `make lock` pins (the locks hold it; installing reads the lock).
TORCH_VERSION ?= 2.13.0
FLAVOR ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
LOCK := requirements/$(FLAVOR).lock
STAMP := $(VENV)/.installed-$(FLAVOR)
ifeq ($(filter $(FLAVOR),cpu cuda),)
$(error FLAVOR=$(FLAVOR): cpu or cuda (requirements/cpu.lock, requirements/cuda.lock))
endif

.PHONY: serve test test-maxima test-autoscale unit integration bench install lock clean system-deps

# Exactly the lock's pins, hashes required, nothing resolved (requirements/install.sh, the step the images run too):
# torch is the lock's build (+cpu in cpu.lock: a CPU machine never gets the multi-GB CUDA stack); inference-sdk comes
# from requirements/no-deps.lock without its dependencies (it pins opencv-python, a second cv2 over the headless one,
# and an older numpy; what it uses is in the test extra, docs/sdks.md); then the project itself, --no-deps.
# Reinstalls when pyproject.toml, a lock or the script changes; otherwise `make install` does nothing.
$(STAMP): pyproject.toml $(LOCK) requirements/no-deps.lock requirements/install.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	sh requirements/install.sh deps $(PY) $(LOCK)
	sh requirements/install.sh project $(PY) -e .
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# The one command that refreshes requirements/cpu.lock, cuda.lock and no-deps.lock from pyproject.toml (and
# requirements/no-deps.in), with uv (in the test extra) and pip's own indexes. Pins still allowed are kept;
# UPGRADE=1 takes the newest releases instead; LOCK_ARGS passes more uv arguments (e.g. LOCK_ARGS="-c FILE").
# tests/unit/test_lock.py fails while pyproject.toml and the locks disagree.
lock:
	test -x $(VENV)/bin/uv || $(MAKE) install
	$(PY) requirements/lock.py --torch $(TORCH_VERSION) $(if $(UPGRADE),--upgrade) -- $(LOCK_ARGS)

# the `sam3-serve` console script (serve_app/cli.py): `make serve ARGS="--port 8011"` passes flags to it
serve: $(STAMP)
	$(VENV)/bin/sam3-serve $(ARGS)

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
