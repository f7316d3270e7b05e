# brainalign: every target that needs the environment depends on the install stamp, so a
# fresh clone needs nothing but `make sweep` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STUDY ?= jobs/mini_study.toml
MINI := data/sim-mini

export BRAINALIGN_HOME ?= $(CURDIR)
export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK ?= true
export PYTHONUNBUFFERED := 1

.PHONY: install test test-fast train sweep mlflow-ui lint lock bench cluster-up cluster-down clean

$(STAMP): requirements.txt requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt -c requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)  ## create .venv with the pinned dependencies

train: $(STAMP)  ## one NICE run on the simulated mini dataset (simulated first if missing)
	$(BIN)/brainalign data simulate --preset mini --out $(MINI) --seed 0
	$(BIN)/brainalign train --config jobs/train_mini.toml $(ARGS)

sweep: $(STAMP)  ## the study in $(STUDY): searches, finals, aligned-vs-base report
	$(BIN)/brainalign study run $(STUDY) $(ARGS)

test: $(STAMP)  ## everything CI runs (unit + real Ray/MLflow/Optuna integration)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)  ## unit tests only
	$(BIN)/python -m pytest -q -m "not integration" $(PYTEST_ARGS)

bench: $(STAMP)  ## performance ratios against baselines run side by side
	$(BIN)/python benchmarks/run_all.py

mlflow-ui: $(STAMP)  ## serve the local MLflow store on http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(BRAINALIGN_HOME)/mlruns/mlflow.db \
		--host 127.0.0.1 --port $${MLFLOW_PORT:-5000}

cluster-up: $(STAMP)  ## local Ray head + MLflow server on 127.0.0.1
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/cluster_up.sh

cluster-down:  ## stop only what cluster-up started
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/cluster_down.sh

lint: $(STAMP)
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check platform tests jobs benchmarks
	! git grep -nE 'sys\.path\.(append|insert)' -- platform tests jobs
	test ! -e platform/__init__.py && test ! -e mlflow/__init__.py

lock: $(STAMP)  ## refresh requirements.lock from the installed environment
	$(BIN)/pip freeze --exclude-editable | grep -v '^#' > requirements.lock

clean:
	rm -rf cache ray_results .pytest_cache
