# CollaFuse: `make run` runs the federation, `make test` runs every test. Both install what they
# need first (a venv in .venv with torch==2.13.0, Debian's dataset-fashion-mnist and prometheus
# when root).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= runs/latest
RUN_ARGS ?=
# OpenMP threads that spin while waiting make a busy 2-core machine 10-20x slower.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install run simulate test test-core lint bench clean help
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

$(STAMP): pyproject.toml constraints.txt scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	touch $@

install: $(STAMP)  ## create .venv and install everything (idempotent)

run: $(STAMP)  ## the main job: the federation on the local service stack (see README)
	$(VENV)/bin/collafuse stack run --out $(OUT) --overwrite $(RUN_ARGS)

simulate: $(STAMP)  ## the same federation in one process (experiments)
	$(VENV)/bin/collafuse simulate --out $(OUT)-simulate --overwrite $(RUN_ARGS)

test: $(STAMP) deploy-tools  ## every test: core, services, deployment
	$(PY) -m pytest -q tests --ignore=tests/deploy
	$(MAKE) --no-print-directory test-deploy

test-core: $(STAMP)  ## the Python tests only (no deployment checks)
	$(PY) -m pytest -q tests --ignore=tests/deploy

lint: $(STAMP)  ## ruff and mypy
	$(VENV)/bin/ruff check src services tests scripts
	$(VENV)/bin/ruff format --check src services tests scripts
	$(VENV)/bin/mypy src services

bench: $(STAMP)  ## measured throughput of the server model and the services
	$(PY) scripts/bench_services.py

clean:  ## remove build outputs and runs (keeps .venv)
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache

include mk/deploy.mk
include mk/experiments.mk
