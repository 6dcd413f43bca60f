# make repro: build the environment when missing or stale, then run the whole pipeline.
# make test:  same environment, then the whole test suite.
# VENV=/some/path reuses an existing environment.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.requirements-installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: repro test lint venv

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

repro: $(STAMP)
	dvc repro

test: $(STAMP)
	python -m pytest

lint: $(STAMP)
	ruff check .
