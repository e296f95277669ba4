# Two commands on a fresh machine (Linux x86_64, Python 3.11; see README.md "Set up"):
#   make demo   set up whatever is missing, then `shusheng demo` (the app at http://127.0.0.1:7860)
#   make test   set up whatever is missing, then README's test command `python -m pytest -q`
# Also: make test-browser (the opt-in `browser` tests in Debian's headless Chromium), make setup.
# scripts/setup.sh creates .venv and installs torch and the extras the first time (a few minutes); afterwards
# it checks the venv in about a second and installs nothing. Extra pytest arguments: make test PYTEST_ARGS="-n 2".

SHELL := /bin/bash
VENV ?= .venv
ACTIVATE := . $(VENV)/bin/activate
PYTEST_ARGS ?=
DEMO_ARGS ?=

# nothing may reach a model hub; no Gradio analytics
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export VENV

.PHONY: setup demo test test-browser chromium

setup:
	@bash scripts/setup.sh

demo: setup
	$(ACTIVATE) && shusheng demo $(DEMO_ARGS)

test: setup
	$(ACTIVATE) && python -m pytest -q $(PYTEST_ARGS)

test-browser: setup chromium
	$(ACTIVATE) && python -m pytest -q -m browser $(PYTEST_ARGS)

# Debian's chromium, driven by Playwright's Python package (never `playwright install`, which downloads a browser)
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  sudo=; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
	  echo "installing Debian's chromium with apt-get"; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; \
	fi
