# Two commands do all the set-up (both idempotent):
#   make demo   - create .venv, install anomalens, train PaDiM on the built-in demo data
#   make test   - create .venv, install anomalens with test tools, run the whole test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/anomalens train --config configs/padim.yaml

# The MLflow UI test loads the page in headless Chromium: install it when absent (root here and in CI).
test: setup
	command -v chromium || (apt-get update && apt-get install -y chromium) || echo "chromium unavailable"
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
