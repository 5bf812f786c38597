# Quick start: `make demo` and `make test`; both install into .venv first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-cpu.txt | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-fast lint browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# The CPU build of torch first when no GPU is present: a plain `torch` requirement would pull
	@# a multi-GB CUDA build.
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q -r requirements-cpu.txt; fi
	$(PY) -m pip install -q -e ".[test,eval,lean,ui,ray]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: setup
	$(VENV)/bin/dreambooth demo --output demo-output

test: setup browser lint
	$(PY) -m pytest

# pyflakes, import order and line length (pyproject.toml [tool.ruff])
lint: setup
	$(VENV)/bin/ruff check .

# Debian's Chromium for the web app's browser test (never `playwright install`: it downloads
# browsers). Needs root or sudo; without either the browser test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends chromium; \
	  else echo "chromium not installed and no root: the browser test will skip"; fi; }

test-fast: setup
	$(PY) -m pytest -m "not slow and not browser"

clean:
	rm -rf demo-output .pytest_cache
