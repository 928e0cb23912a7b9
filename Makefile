# Two set-up commands: `make test` and `make demo`. Both create .venv and install
# everything from this repository's own files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Local CPU wheel; GPU users install their own CUDA torch before `make`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo clean

$(STAMP): requirements.txt requirements-dev.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements.txt -r requirements-dev.txt
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests

# The unit tests, stopping at the first failure. tests/ has no "slow" marker, so the end-to-end
# files are left out by name: the demo, training/pretraining/search runs through the apps in
# subprocesses, torchrun/horovod launches (test_shards_training.py: four of them, 1.5 minutes),
# the web server and browser test, the benchmark subprocesses (test_cuda.py stays: its CPU runs
# take seconds). `make test` runs them all.
SLOW_TESTS := test_demo.py test_retrieval_app.py test_pretrain_app.py test_search_trained.py \
	test_search_server.py test_distributed.py test_horovod.py test_bench.py test_e2e_bench.py test_bad_samples.py \
	test_shards_training.py
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -x $(addprefix --ignore=tests/,$(SLOW_TESTS)) tests

# The demo's own time (results.json "wall_seconds") excludes this set-up; docs/demo.md.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m clipvip demo --out demo_output

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
