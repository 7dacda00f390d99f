# The two commands of the README. Both run the setup first; the setup creates .venv when
# missing, installs into it, and installs nothing when everything is already there.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo

setup:
	@bash tools/setup_env.sh

test: setup
	$(PY) -m pytest tests

demo: setup
	$(PY) tools/demo.py
