# Set-up is part of every target: a fresh checkout needs only `make run` or `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The torch pair this project is tested with; override for another CUDA build, e.g.
# make test TORCH_SPEC="torch==2.5.1 torchvision==0.20.1".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test,peers,launchers,robust

.PHONY: install run test test-unit test-all bench gpu-check lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

run: $(STAMP)  ## the main job on the embedded default (pass ARGS="key=value ...")
	$(PY) -m pse_lightning $(ARGS)

# Two workers (pytest-xdist), one per core; each test's torch uses one thread there.
# worksteal: an idle worker takes queued tests from the busy one, so a few long tests left
# at the end of one worker's share do not decide the wall time.
test: $(STAMP)  ## the fast test suite
	$(PY) -m pytest -n 2 --dist worksteal $(ARGS)

# Tests marked unit (tests/conftest.py says how a test is marked, and fails a unit test that
# starts a process or runs a Lightning loop): no training, no test loop, no subprocess.
test-unit: $(STAMP)  ## the unit tests only: no training, no test loop, no subprocess
	$(PY) -m pytest -n 2 --dist worksteal -m "unit and not slow" $(ARGS)

test-all: $(STAMP)  ## every test, the slow ones (DDP, multirun, cross-checks) included
	$(PY) -m pytest -m "slow or not slow" $(ARGS)

bench: $(STAMP)  ## benchmarks: ratios to the forward+backward floor and to peer libraries
	$(PY) -m pse_lightning.bench $(ARGS)

gpu-check: $(STAMP)  ## on a GPU machine: the GPU path measured (JSON + table); exits 0 without a GPU
	$(PY) -m pse_lightning.gpu_check $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check pse_lightning tests examples
	$(VENV)/bin/ruff format --check pse_lightning tests examples

format: $(STAMP)
	$(VENV)/bin/ruff format pse_lightning tests
	$(VENV)/bin/ruff check --fix pse_lightning tests

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
