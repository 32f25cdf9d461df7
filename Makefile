# misp-dpo: every target creates .venv itself when it is missing or older than pyproject.toml.
# Only python3 and make are needed on a fresh machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DASK_STAMP := $(VENV)/.dask-stamp
DAGSTER_HOME := $(CURDIR)/.dagster_home
UI_HOST ?= 127.0.0.1
UI_PORT ?= 3000
SHARDS ?= $(or $(MISP_SHARDS),4)
# `make mine VERBOSE=1`: Dagster's DEBUG log; `IN_PROCESS=1`: every step in one process (default: the executor of
# assets/definitions.py, multiprocess or MISP_EXECUTOR=dask).
MINE_FLAGS = $(if $(VERBOSE),--verbose) $(if $(IN_PROCESS),--in-process)
DAGSTER_DASK := 0.29.27

# Nothing may reach a model hub at run time: a miss fails at once instead of hanging.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Processes sharing cores must not busy-wait in OpenMP (see assets/__init__.py).
export OMP_WAIT_POLICY ?= PASSIVE
export DAGSTER_HOME
export MISP_SHARDS := $(SHARDS)

.PHONY: help venv dask test ui validate world embed mine base train eval experiment ablations bench clean-data clean-venv

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)  ## Create or update .venv from pyproject.toml

$(DASK_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,dask]'
	$(PY) -m pip install --quiet --no-deps 'dagster-dask==$(DAGSTER_DASK)'
	@touch $(DASK_STAMP)

dask: $(DASK_STAMP)  ## Add the Dask executor to .venv (the `dask` extra + dagster-dask, see pyproject.toml)

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	@mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml

test: $(DASK_STAMP)  ## Run the test suite (CPU only, offline; installs the Dask executor for its test)
	$(PY) -m pytest -q

validate: $(STAMP) $(DAGSTER_HOME)/dagster.yaml  ## Check that the Dagster definitions load
	$(VENV)/bin/dagster definitions validate

ui: $(STAMP) $(DAGSTER_HOME)/dagster.yaml  ## Serve the Dagster UI on $(UI_HOST):$(UI_PORT)
	$(VENV)/bin/dagster dev -h $(UI_HOST) -p $(UI_PORT)

world: $(STAMP)  ## Generate the scene world (MISP_WORLD_PRESET, default 'default') under the data root
	$(PY) -m world --preset $(or $(MISP_WORLD_PRESET),default) --seed $(or $(MISP_WORLD_SEED),0) \
		--out $(or $(MISP_DATA_ROOT),data)/world/$(or $(MISP_WORLD_PRESET),default)-seed$(or $(MISP_WORLD_SEED),0)

embed: $(STAMP) $(DAGSTER_HOME)/dagster.yaml  ## Source -> CLIP -> per-shard ingest and embeddings (VERBOSE=1, IN_PROCESS=1)
	$(PY) -m assets.run_pipeline --until embeddings $(MINE_FLAGS)

mine: $(STAMP) $(DAGSTER_HOME)/dagster.yaml  ## The whole mining chain -> preference shards under <data root>/shards (VERBOSE=1, IN_PROCESS=1)
	$(PY) -m assets.run_pipeline --until shards $(MINE_FLAGS)

WORLD_DIR = $(or $(MISP_DATA_ROOT),data)/world/$(or $(MISP_WORLD_PRESET),default)-seed$(or $(MISP_WORLD_SEED),0)

base: $(STAMP)  ## Build the world base VLM once (reused) into <data root>/models/base (+ models/base-encoder for `prior`)
	@test -f $(WORLD_DIR)/world.json || $(MAKE) world
	$(PY) -m world.base_model --world $(WORLD_DIR) --out $(or $(MISP_DATA_ROOT),data)/models/base \
		--preset $(if $(filter tiny prior prior_tiny,$(MISP_WORLD_PRESET)),$(MISP_WORLD_PRESET),default)

train: $(STAMP) base  ## Train the `misp` preset on the mined shards from the base VLM (configs/world.yaml; TRAIN_ARGS="--max_steps 50")
	@test -f $(or $(MISP_DATA_ROOT),data)/shards/manifest.json || (echo "no shards yet: run 'make mine' first" && exit 1)
	$(PY) -m trainer --config configs/world.yaml $(TRAIN_ARGS)

MODEL ?= $(or $(MISP_DATA_ROOT),data)/models/base

eval: $(STAMP)  ## Hallucination benchmarks (POPE-style, CHAIR) of MODEL (default: the base VLM) on the world's test split
	@test -f $(WORLD_DIR)/world.json || $(MAKE) world
	@test -f $(MODEL)/config.json || (echo "no model in $(MODEL): run 'make base' or give MODEL=<folder>" && exit 1)
	$(PY) -m eval --model $(MODEL) --world $(WORLD_DIR) $(EVAL_ARGS)

experiment: $(STAMP) $(DAGSTER_HOME)/dagster.yaml  ## Base, SFT control and every preset x 5 seeds (low SFT weight too; paper form x 3) -> reports/experiment.md (EXPERIMENT_ARGS="--quick")
	$(PY) -m experiment $(EXPERIMENT_ARGS)

ablations: $(STAMP) $(DAGSTER_HOME)/dagster.yaml  ## K, selection rule, SAE space, beta, IS K' vs full pool x 3 seeds -> reports/ablations.md
	$(PY) -m experiment --ablations $(EXPERIMENT_ARGS)

bench: $(STAMP)  ## Run the benchmarks serially (tables printed, JSON under reports/bench/)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) bench/embed.py
	$(PY) bench/sae_score.py
	$(PY) bench/mine.py
	$(PY) bench/train.py
	$(PY) bench/is_bias.py
	$(PY) bench/world_gen.py
	$(PY) bench/gpu.py

clean-data:  ## Delete the data root and the Dagster instance (asks first)
	@read -p "delete $(or $(MISP_DATA_ROOT),data) and $(DAGSTER_HOME)? [y/N] " ok && [ "$$ok" = y ] && \
		rm -rf $(or $(MISP_DATA_ROOT),data) $(DAGSTER_HOME) || echo kept

clean-venv:  ## Delete .venv
	rm -rf $(VENV)
