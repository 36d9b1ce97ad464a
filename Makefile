# cocomix: `make demo` runs the whole method on the embedded corpus; `make test` runs the test suite.
# Both create .venv and install everything on first use (torch pinned to the CPU wheel; see README).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
COCOMIX := $(BIN)/cocomix
OUT    ?= out/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast lint demo bench tokens extract-concepts train clean

setup: $(VENV)/.installed

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# pytest exit code 5 (nothing collected) is a failure, never a silent pass.
test: setup
	@$(BIN)/pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m bench

# ---- the demo chain on the embedded corpus (data/corpus) -------------------------------------------------
tokens: setup
	$(COCOMIX) tokenize --input data/corpus --train-tokenizer 8192 --out $(OUT)/tokens --seed 0

demo: tokens
	$(COCOMIX) shards info $(OUT)/tokens

clean:
	rm -rf out
