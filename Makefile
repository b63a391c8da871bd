# Two commands on a fresh machine: `make demo` and `make test`. Everything lives in .venv/.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch lies on the development machines; pinning and installing it first
# keeps pip from pulling a multi-GB CUDA build as a dependency of diffusers.
TORCH := torch==2.13.0
# Without its declared deps: they are the GUI opencv-python and an unpinned torch (pyproject.toml).
WATERMARK := invisible-watermark==0.2.0
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP := $(PY) -m pip install -q --disable-pip-version-check $(FIND_LINKS)

.PHONY: setup demo test test-fast faults bench bench-gpu load browser faketime clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e '.[test]'
	$(PIP) --no-deps $(WATERMARK)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/instabatch run examples/products.csv --out out/demo
	$(VENV)/bin/instabatch run examples/catalogue.csv --template examples/catalogue-template.json --out out/catalogue

# Debian's chromium drives the browser tests (Playwright with executable_path, no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# libfaketime skews one host's clock in tests/test_several_hosts.py (skipped without it).
faketime:
	@test -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 || { \
	  echo "installing Debian faketime for the several-hosts clock test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null; }

test: setup browser faketime
	$(PY) -m pytest -q --durations=40

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The fault suite (tests/faults): the real stack as processes, nine faults mid-batch, an invariant
# check after each, RESULT lines at the end. Sizes: FAULTS_ITEMS items per batch; FAULTS_ONLY picks
# scenarios by pytest -k, e.g. the Done-when's 1,000-item runs:
#   make faults FAULTS_ITEMS=1000 FAULTS_ONLY="kill_solo_worker or redis_restart"
# `make test` runs its short form (scenarios 2, 3 and 6 on small batches).
FAULTS_ITEMS ?= 120
FAULTS_ONLY ?=
faults: setup
	INSTABATCH_FAULTS=full INSTABATCH_FAULTS_ITEMS=$(FAULTS_ITEMS) $(PY) -m pytest -m faults tests/faults -p no:cacheprovider -s -q $(if $(FAULTS_ONLY),-k "$(FAULTS_ONLY)")

# The worker path's throughput (docs/performance.md): model only, end to end through API, Redis,
# Celery, QC, S3 (moto) and PostgreSQL, naive, the simulated GPU at 512², submit_10k; ~10 minutes.
bench: setup
	$(PY) -m bench.main

# On a machine with one CUDA GPU, under 8 minutes: eager / compile / CUDA graphs, TFLOP/s, the worker on CUDA.
bench-gpu: setup
	bash bench/gpu.sh

# API load, not part of `make test`: 60 s each at 1, 10, 50 and 200 concurrent clients submitting and
# polling against one `instabatch serve` on PostgreSQL + Redis (fresh database, Redis db 15).
load: setup
	$(PY) -m bench.load --clients 1,10,50,200 --duration 60

clean:
	rm -rf var out .pytest_cache
