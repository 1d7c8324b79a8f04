# Every target that needs Python creates its venv first; a fresh machine needs nothing but python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch lies on disk on our machines; a range would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

# timm needs torchvision, and PyPI's torchvision does not load beside the CPU torch wheel, so the timm tests
# run in a second venv with a matching torch/torchvision pair (both on disk on our machines).
TIMM_VENV := .venv-timm
TIMM_STAMP := $(TIMM_VENV)/.installed
ifeq ($(shell uname -m),aarch64)
TIMM_TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TIMM_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: venv test test-main test-timm demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

$(TIMM_STAMP): pyproject.toml
	test -x $(TIMM_VENV)/bin/python || $(PY) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TIMM_VENV)/bin/python -m pip install --quiet $(TIMM_TORCH_SPEC)
	$(TIMM_VENV)/bin/python -m pip install --quiet -e ".[timm]" pytest pytest-timeout hypothesis
	touch $(TIMM_STAMP)

venv: $(STAMP)

# SKIP_TIMM=1 runs only the main suite (no second venv).
test: test-main
ifndef SKIP_TIMM
test: test-timm
endif

# Docstring examples run too; the timm one runs in the timm venv.
test-main: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --doctest-modules tests src/thetascope \
		--ignore=src/thetascope/capture/timm_vit.py

test-timm: $(TIMM_STAMP)
	$(TIMM_VENV)/bin/python -m pytest -q -p no:cacheprovider --doctest-modules tests/capture/test_timm.py \
		src/thetascope/capture/timm_vit.py

demo: $(STAMP)
	$(BIN)/thetascope demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts examples
	$(BIN)/ruff format --check src tests benchmarks scripts examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) $(TIMM_VENV) build dist src/*.egg-info runs .pytest_cache .mypy_cache .ruff_cache
