# make demo: set up .venv if needed, then run the federated demo end to end on built-in data.
# make test: set up .venv if needed, then run the test suite (make test-fast: without the slow end-to-end tests).
# DATA_ROOT=/path/to/mvtec CATEGORY=bottle make demo   runs the same demo on real MVTec AD data.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(PY) -m pip install --quiet --disable-pip-version-check 'pytest>=7.4' 'pytest-timeout>=2.1' 'httpx>=0.24'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m patchsvdd.demo

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

bench: install
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_evaluate.py
	$(PY) benchmarks/bench_serve.py

clean:
	rm -rf runs data .pytest_cache
