# make demo  - install what the demo uses (no reference venv, no Redis, no root) and run it
# make test  - set up everything and run ruff, mypy --strict and the test suite
# make liboqs SRC=path/to/liboqs-0.16.0.tar.xz - build liboqs into .liboqs/ for the [liboqs] backend
PYTHON ?= python3
VENV := .venv
REFVENV := .venv-ref
PY := $(VENV)/bin/python
PIP_FLAGS := --disable-pip-version-check -q

.PHONY: demo test lint typecheck pytest bench fuzz setup redis chromium liboqs liboqs-auto clis clean

# liboqs (the fastest ML-KEM backend) is on no package registry here. setup (so test, demo and
# bench) builds it from LIBOQS_SRC into .liboqs/ unless the backend already loads (a system
# liboqs); `make liboqs SRC=...` always builds it there. Both are no-ops once built (.stamp).
LIBOQS_SRC ?= ../shared/liboqs/liboqs-0.16.0.tar.xz
ifeq ($(origin SRC),command line)
LIBOQS_SRC := $(SRC)
endif
LIBOQS_PREFIX := $(CURDIR)/.liboqs
# How the commands that load the backends find the local build (liboqs-python reads it); expanded
# when their recipe runs, after setup (not $(wildcard): make caches directory listings).
OQS_ENV = $(shell test -f '$(LIBOQS_PREFIX)/.stamp' && echo 'OQS_INSTALL_PATH=$(LIBOQS_PREFIX)')

$(VENV)/.stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) -e '.[all,dev]'
	touch $@

# The demo's own needs: the servers, the proxy, the httpx transports and the two SDKs it runs.
# A no-op when the full .venv is already there.
$(VENV)/.demo-stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[server,proxy,httpx]' 'openai>=2' 'anthropic>=0.40'
	touch $@

# The published reference client lives in its own venv: it needs pqcrypto<1 and openai<3.
$(REFVENV)/.stamp:
	test -x $(REFVENV)/bin/python || $(PYTHON) -m venv $(REFVENV)
	$(REFVENV)/bin/python -m pip install $(PIP_FLAGS) 'chutes-e2ee==0.1.0' 'pqcrypto<1' 'openai<3' httpx
	touch $@

redis:
	@command -v redis-server >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; }

# A real headless browser for the proxy's status page and web-page tests
# (tests/test_proxy_status.py, tests/test_proxy_browser.py).
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

liboqs:
	scripts/build_liboqs.sh '$(LIBOQS_SRC)' '$(LIBOQS_PREFIX)'

liboqs-auto: $(VENV)/.stamp
	PYTHON=$(PY) scripts/build_liboqs.sh --if-missing '$(LIBOQS_SRC)' '$(LIBOQS_PREFIX)'

# The agent CLIs (Claude Code, Codex) tests/test_real_clis.py drives: pinned, from npm, into
# .clis/ (git-ignored); skipped (and those tests with them) only when npm is missing.
clis:
	scripts/install_clis.sh .clis

setup: $(VENV)/.stamp $(REFVENV)/.stamp redis chromium liboqs-auto clis

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check src tests benchmarks examples scripts fuzz
	$(VENV)/bin/ruff format --check src tests benchmarks examples scripts fuzz

typecheck: $(VENV)/.stamp
	$(VENV)/bin/mypy --strict src

# setup made liboqs load, so a liboqs test that would skip fails instead (tests/test_liboqs_build.py).
pytest: setup
	$(OQS_ENV) PQE2EE_REQUIRE_LIBOQS=1 $(VENV)/bin/pytest -q

test: setup lint typecheck pytest

demo: $(VENV)/.demo-stamp
	$(OQS_ENV) $(PY) examples/demo.py

# Every benchmark, one after the other (about 10 minutes on 2 cores); each prints its tables.
BENCHES := core overhead client stream instance relay server proxy v2
bench: setup
	for b in $(BENCHES); do echo "== benchmarks/bench_$$b.py"; \
		$(OQS_ENV) $(PY) benchmarks/bench_$$b.py || exit 1; done

# Every fuzz target (fuzz/targets.py) under atheris for FUZZ_SECONDS each, from its saved corpus
# (fuzz/corpus/<target>/, grown in place). `make test` runs a short smoke (tests/test_fuzz_smoke.py).
FUZZ_SECONDS ?= 60
fuzz: $(VENV)/.stamp
	@for t in $$(PYTHONPATH=src $(PY) fuzz/run.py --list); do \
		echo "== fuzz $$t ($(FUZZ_SECONDS) s)"; \
		log=$${TMPDIR:-/tmp}/pqe2ee-fuzz-$$t.log; \
		PYTHONPATH=src $(PY) fuzz/run.py $$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
			>$$log 2>&1 || { tail -n 40 $$log; exit 1; }; \
		grep -E 'DONE|stat::number_of_executed_units' $$log; \
	done

clean:
	rm -rf $(VENV) $(REFVENV) $(LIBOQS_PREFIX) .clis .mypy_cache .ruff_cache .pytest_cache
