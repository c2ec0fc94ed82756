# make demo  - set up everything and run the end-to-end demo
# make test  - set up everything and run ruff, mypy --strict and the test suite
PYTHON ?= python3
VENV := .venv
REFVENV := .venv-ref
PY := $(VENV)/bin/python
PIP_FLAGS := --disable-pip-version-check -q

.PHONY: demo test lint typecheck pytest bench setup redis clean

$(VENV)/.stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) -e '.[all,dev]'
	touch $@

# The published reference client lives in its own venv: it needs pqcrypto<1 and openai<3.
$(REFVENV)/.stamp:
	test -x $(REFVENV)/bin/python || $(PYTHON) -m venv $(REFVENV)
	$(REFVENV)/bin/python -m pip install $(PIP_FLAGS) 'chutes-e2ee==0.1.0' 'pqcrypto<1' 'openai<3' httpx
	touch $@

redis:
	@command -v redis-server >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; }

setup: $(VENV)/.stamp $(REFVENV)/.stamp redis

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check src tests benchmarks examples scripts
	$(VENV)/bin/ruff format --check src tests benchmarks examples scripts

typecheck: $(VENV)/.stamp
	$(VENV)/bin/mypy --strict src

pytest: setup
	$(VENV)/bin/pytest -q

test: setup lint typecheck pytest

demo: setup
	$(PY) examples/demo.py

bench: setup
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) $(REFVENV) .mypy_cache .ruff_cache .pytest_cache
