# Quick start: `make demo` and `make test`; both install into .venv first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-cpu.txt | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# The CPU build of torch first when no GPU is present: a plain `torch` requirement would pull
	@# a multi-GB CUDA build.
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q -r requirements-cpu.txt; fi
	$(PY) -m pip install -q -e ".[test,eval]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: setup
	$(VENV)/bin/dreambooth demo --output demo-output

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow and not browser"

clean:
	rm -rf demo-output .pytest_cache
