# make demo: set up .venv if needed, then run the federated demo end to end on built-in data.
# make test: set up .venv and .venv-flower if needed (and the system tools some tests need, see make test-tools),
#   then run the test suite in each (make test-fast: without the slow end-to-end tests, OpenFL's environment only).
# ENGINE=flower make demo   runs the same demo on Flower (make flower-install: its environment, .venv-flower).
# ENGINE=flower SECAGG=1 make demo   the same on Flower with secure aggregation (SecAgg+).
# make lint: ruff (lint and format check) and mypy.
# DATA_ROOT=/path/to/mvtec CATEGORY=bottle make demo   runs the same demo on real MVTec AD data.

# OpenFL 1.7.1 (the last release with the director/envoy API) installs on Python 3.10-3.12 only: take
# python3 when it is one of those, else python3.12, python3.11 or python3.10 (PYTHON=... to choose).
PYTHON ?= $(shell for p in python3 python3.12 python3.11 python3.10; do \
	$$p -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))' >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The Flower engine lives in an environment of its own (flwr 1.42 and OpenFL 1.7.1 need grpcio versions that
# exclude each other): the newest of Python 3.13, 3.12, 3.11 (PYTHON_FLOWER=... to choose).
PYTHON_FLOWER ?= $(shell for p in python3.13 $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) python3.12 \
	python3.11 python3; do \
	$$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' >/dev/null 2>&1 && { echo $$p; break; }; done)
FLOWER_VENV ?= .venv-flower
FLOWER_PY := $(FLOWER_VENV)/bin/python
FLOWER_STAMP := $(FLOWER_VENV)/.installed
ENGINE ?= openfl

.PHONY: install flower-install data demo demo-learn test-tools test test-fast lint bench clean

$(STAMP): requirements.txt $(wildcard requirements/*.txt) pyproject.toml
	@test -x $(PY) || test -n "$(PYTHON)" || { echo "make: no Python 3.10, 3.11 or 3.12 found (python3 is" \
	  "$$(python3 --version 2>&1 || echo absent)); OpenFL 1.7.1 needs one of them: install python3.12 (or 3.11," \
	  "3.10), or name one with PYTHON=/path/to/python3.12" >&2; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements/test.txt \
	  -r requirements/lint.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

$(FLOWER_STAMP): requirements/core.txt requirements/flower.txt requirements/notebook.txt requirements/test.txt \
  pyproject.toml
	@test -x $(FLOWER_PY) || test -n "$(PYTHON_FLOWER)" || { echo "make: no Python 3.11, 3.12 or 3.13 found for" \
	  "Flower: install one, or name it with PYTHON_FLOWER=/path/to/python3.13" >&2; exit 2; }
	test -x $(FLOWER_PY) || $(PYTHON_FLOWER) -m venv $(FLOWER_VENV)
	$(FLOWER_PY) -m pip install --quiet --disable-pip-version-check -r requirements/core.txt -r requirements/flower.txt \
	  -r requirements/notebook.txt -r requirements/test.txt
	$(FLOWER_PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(FLOWER_STAMP)

# the Flower engine's environment (ENGINE=flower make demo; make test runs its tests there too)
flower-install: $(FLOWER_STAMP)
	$(FLOWER_PY) -m patchsvdd.cli.demo --data-only

# the install also makes the built-in demo data that envoy_folder/shard_config*.yaml point at (data/demo/washer)
install: $(STAMP) data

data: $(STAMP)
	$(PY) -m patchsvdd.cli.demo --data-only

# ENGINE=flower: the same demo on Flower, from the Flower environment
ifeq ($(ENGINE),flower)
demo: flower-install
	$(FLOWER_PY) -m patchsvdd.cli.demo --engine flower
else
demo: install
	$(PY) -m patchsvdd.cli.demo
endif

# the budget at which the model clearly beats the untrained encoder (settings.LEARN_BUDGET)
demo-learn: install
	$(PY) -m patchsvdd.cli.demo --learn

# headless Chromium for the station page's test, iproute2 and nftables for the test hosts in network namespaces
# (Debian packages; those tests skip with a reason where they cannot be installed)
test-tools:
	@scripts/install-test-tools

# two workers (pytest-xdist), each taking whole test files, the longest files first (tests/conftest.py; xdist would
# otherwise start the files with the most tests first); each federation takes ports of its own (only the three
# steps as written take 50050/50051). Beside them, tests/flower in the Flower environment; its output follows.
# One thread per process (OMP_NUM_THREADS=1, which the sites and envoys the tests start inherit): the workers, the
# sites and the Flower suite together keep every core busy, and more threads than cores only slow each other.
test: install flower-install test-tools
	@export OMP_NUM_THREADS=1; log="$$(mktemp)"; $(FLOWER_PY) -m pytest tests/flower > "$$log" 2>&1 & flower=$$!; \
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder; main=$$?; \
	wait $$flower; status=$$?; echo "--- tests/flower in $(FLOWER_VENV):"; cat "$$log"; rm -f "$$log"; \
	test $$main -eq 0 && test $$status -eq 0

test-fast: install
	$(PY) -m pytest -m "not slow"

# lint, format and types (configured in pyproject.toml); .ci/run runs it before the tests
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: install
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_step_limit.py
	$(PY) benchmarks/bench_evaluate.py
	$(PY) benchmarks/bench_exact_search.py
	$(PY) benchmarks/bench_serve.py

clean:
	rm -rf runs data .pytest_cache
