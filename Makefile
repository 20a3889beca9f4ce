# Image classifier: train with Lightning, track with MLflow, serve with BentoML.
# `make help` lists the targets; variables: DATA, OUTLIERS, MODELS, EPOCHS, RESUME, PROFILE, ARGS.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?=
MODELS ?=
EPOCHS ?=
RESUME ?=
OUTLIERS ?=
PROFILE ?= auto
ARGS ?=
MODEL ?= models:/cifar4-classifier@champion
MLFLOW_PORT ?= 5000
PORT ?= 3000
OUT ?= predictions.csv
FAMILY ?= vgg
TRIALS ?= 20
# BentoML's model and bento store lives in the project (git-ignored), not in ~/bentoml.
export BENTOML_HOME ?= $(CURDIR)/bentoml_home
export BENTOML_DO_NOT_TRACK ?= true

.DEFAULT_GOAL := help
.PHONY: help install config train sweep evaluate predict download package serve mlflow-ui test test-fast bench clean wheels image docker-build docker-up docker-down

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

# uv installs the pinned set in parallel and from its cache: 4x faster than pip here (bench/install_time.sh).
$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -c constraints.txt -e ".[serve,dev]"
	touch $@

install: $(BIN)/.installed ## create .venv and install the package with its dev tools (uv, constraints.txt)

config: install ## print FAMILY's resolved config (PROFILE=cpu|gpu): every key, its value and where it came from
	$(BIN)/pipeline config $(FAMILY) --profile $(if $(filter gpu,$(PROFILE)),gpu,cpu) $(ARGS)

train: install ## train the families (DATA=dir[,dir2] OUTLIERS=dir MODELS=lenet,vgg,resnet EPOCHS=n RESUME=1), register the champion
	$(BIN)/pipeline train --profile $(PROFILE) $(if $(DATA),--data $(DATA)) $(if $(OUTLIERS),--outliers $(OUTLIERS)) $(if $(MODELS),--models $(MODELS)) \
		$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(RESUME),--resume) $(ARGS)

sweep: install ## Optuna sweep: FAMILY=vgg TRIALS=20 [EPOCHS=n] (DATA=dir); trials are nested MLflow runs; kills resume
	$(BIN)/pipeline sweep --family $(FAMILY) --trials $(TRIALS) --profile $(PROFILE) $(if $(DATA),--data $(DATA)) \
		$(if $(EPOCHS),--epochs $(EPOCHS)) $(ARGS)

evaluate: install ## score MODEL (default: the champion) on DATA
	$(BIN)/pipeline evaluate --data $(DATA) --model "$(MODEL)" $(ARGS)

package: install ## champion from MLflow -> BentoML model -> bento (MODEL=models:/NAME@ALIAS or /VERSION)
	$(BIN)/pipeline package --model "$(MODEL)"

serve: install ## serve the packaged bento on 127.0.0.1:$(PORT) (PORT=...)
	$(BIN)/bentoml serve cifar4_classifier:latest --host 127.0.0.1 --port $(PORT) --timeout-keep-alive 75

predict: install ## classify every image under DATA with MODEL, offline, into OUT (CSV; default predictions.csv)
	$(if $(DATA),,$(error make predict needs DATA=folder of images))
	$(BIN)/pipeline predict "$(DATA)" --model "$(MODEL)" --out "$(OUT)" $(ARGS)

download: install ## download CIFAR-10 and write data/cifar4/{train,test}/{bird,boat,cat,dog}
	$(BIN)/pipeline download

mlflow-ui: install ## browse the runs: MLflow UI on http://127.0.0.1:5000 (MLFLOW_PORT=...)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

test: install ## run the test suite (CPU, 5 to 11 minutes on 2 cores; the 12 slowest are listed at the end)
	$(BIN)/python -m pytest --durations=12

test-fast: install ## the tests that take seconds
	$(BIN)/python -m pytest -m "not slow"

bench: install ## Lightning vs plain PyTorch training throughput (DATA=dir)
	$(BIN)/python bench/train_overhead.py --data $(DATA)

wheels: install ## download the container images' wheels into docker/wheels (builds then need no network)
	$(BIN)/pip download --quiet --only-binary=:all: -d docker/wheels/serve -r docker/requirements-serve.txt
	$(BIN)/pip download --quiet --only-binary=:all: -d docker/wheels/mlflow -r docker/requirements-mlflow.txt

image: install ## the packaged bento and its model in one image: cifar4-classifier:vN and :latest (no mounts needed)
	bash docker/make-image.sh

docker-build: ## build the classifier and MLflow images (BASE_IMAGE=... to change the base)
	docker compose build

docker-up: ## docker compose up -d, then wait until both services are healthy (MLflow runs as you)
	HOST_UID=$$(id -u) HOST_GID=$$(id -g) docker compose up -d --wait

docker-down: ## stop the stack (the MLflow store and BentoML store are host folders: they stay)
	docker compose down

clean: ## remove checkpoints and caches (keeps mlflow.db and mlartifacts)
	rm -rf checkpoints .pytest_cache lightning_logs
