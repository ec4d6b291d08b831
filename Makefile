# capplug: make demo · make test · make bench (each installs what it needs first)
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.capplug-installed
TORCH  := 2.13.0

.PHONY: install demo test test-unit test-integration bench lint clean

install: $(STAMP)

# Idempotent: re-runs only when the venv is missing or pyproject.toml changed.
$(STAMP): pyproject.toml integrations/langchain/pyproject.toml integrations/llamaindex/pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@sh scripts/install_torch.sh $(PY) $(TORCH)
	$(PY) -m pip install -q -e ".[dev,train]" -e "integrations/langchain[test]" \
		-e "integrations/llamaindex[test]"
	@touch $@

demo: install
	$(PY) examples/demo.py

LC     := integrations/langchain
LI     := integrations/llamaindex

test: test-unit test-integration

test-unit: install
	$(PY) -m pytest -q -n auto --maxprocesses 4 --durations 10 tests/unit $(LC)/tests/unit_tests \
		$(LI)/tests/unit_tests --disable-socket --allow-unix-socket

test-integration: install
	$(PY) -m pytest -q -n 2 --dist loadfile --durations 10 tests/integration $(LC)/tests/integration_tests \
		$(LI)/tests/integration_tests -m integration

bench: install
	$(PY) -m benchmarks.scoring_speed

lint: install
	$(PY) -m ruff check src tests benchmarks examples $(LC) $(LI)
	$(PY) -m ruff format --check src tests benchmarks examples $(LC) $(LI)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
