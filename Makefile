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

# the suite in two pytest-xdist workers, one test file per worker at a time (a file's fixtures are
# built once); JOBS=1 runs it in this process
JOBS ?= 2
test: setup
	$(PY) -m pytest -n $(JOBS) --dist loadfile tests

demo: setup-core
	$(PY) tools/demo.py
