# The two commands of the README. Both run the setup first; the setup creates .venv when
# missing, installs into it, and installs nothing when everything is already there. The demo
# needs only the package (--core); the tests also need the optional extras and the test-only
# reference implementations.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-core test demo

setup:
	@bash tools/setup_env.sh

setup-core:
	@bash tools/setup_env.sh --core

test: setup
	$(PY) -m pytest tests

demo: setup-core
	$(PY) tools/demo.py
