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
export HF_DATASETS_OFFLINE := 1

.PHONY: setup test test-fast lint demo bench tokens extract-concepts train students downstream tasks study study-report study-keep gpu-check teacher sae clean

setup: $(VENV)/.installed

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
# The .pth file lets lm-eval's own `lm_eval` command see the `cocomix` model (trainer/lm_eval_hook.py).
$(VENV)/.installed: pyproject.toml trainer/cocomix_lm_eval.pth
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,eval]'
	cp trainer/cocomix_lm_eval.pth "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
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

# ---- the demo chain on the embedded default --------------------------------------------------------------
# The teacher (demo-teacher preset, exported as a HF GPT-2 folder) and its SAE are trained by `make teacher`
# and `make sae` with this project's own code, and shipped in data/demo/ (bf16), so that `make demo` spends
# its 30-minute budget on extraction and the students. Each stage below skips itself when its output exists
# with the same fingerprint, and make reruns a stage (and what depends on it) when its inputs are newer.
ASSETS   := data/demo
TEACHER  := $(ASSETS)/teacher
SAE      := $(ASSETS)/sae
LAYER    := 1
WINDOW   := 256
TOKENS   := $(OUT)/tokens
LABELS   := $(OUT)/labels
RUNS     := $(OUT)/runs
# The students see a share of the corpus's train documents (val unchanged) once, as the paper's students
# see their data (about 1.0 epoch of 1.24M tokens): the most a 30-minute budget on 2 cores allows four
# students. The teacher and SAE saw the whole train split. `make study` runs the full-corpus experiment.
TRAIN_FRACTION ?= 0.45
STUDENT_TOKENS ?= 1250000
SEED     ?= 0
# one thread per process and two students at a time: tiny models scale badly across threads
TRAIN    := $(COCOMIX) train --tokens $(TOKENS) --max-tokens $(STUDENT_TOKENS) --seed $(SEED) --set threads=1

tokens: $(TOKENS)/manifest.json
$(TOKENS)/manifest.json: data/corpus/*.jsonl.gz $(TEACHER)/tokenizer.json | setup
	rm -rf $(TOKENS)
	TOKENIZERS_PARALLELISM=true $(COCOMIX) tokenize --input data/corpus --tokenizer $(TEACHER) --seed 0 \
	  --train-fraction $(TRAIN_FRACTION) --out $(TOKENS)

# The target is a stamp written after the extraction returns: the store's manifest exists from its first
# moment, so a killed extraction would otherwise look finished (a rerun resumes it instead).
LABELS_DONE := $(LABELS).done
extract-concepts: $(LABELS_DONE)
$(LABELS_DONE): $(TOKENS)/manifest.json $(TEACHER)/model.safetensors $(SAE)/sae.safetensors
	if [ -f $(LABELS)/manifest.json ] && [ $(LABELS)/manifest.json -ot $(TOKENS)/manifest.json ]; then rm -rf $(LABELS); fi
	$(COCOMIX) extract --tokens $(TOKENS) --teacher $(TEACHER) --sae $(SAE) --layer $(LAYER) --window $(WINDOW) \
	  --store-teacher-topk 32 --workers 2 --threads 1 --out $(LABELS)
	touch $@

# pause is left to the study (its runs there show what it does); dropping it buys the others tokens
STUDENTS := ntp ntp-wide cocomix kd
# started slowest first, so that two at a time finish close together
SLOWEST_FIRST := kd cocomix ntp-wide ntp
$(RUNS)/ntp/run.json:      $(TOKENS)/manifest.json ; $(TRAIN) --preset demo --mode ntp --out $(@D) > $(@D).log 2>&1
$(RUNS)/ntp-wide/run.json: $(TOKENS)/manifest.json ; $(TRAIN) --preset demo-ntp-wide --out $(@D) > $(@D).log 2>&1
$(RUNS)/pause/run.json:    $(TOKENS)/manifest.json ; $(TRAIN) --preset demo --mode pause --out $(@D) > $(@D).log 2>&1
$(RUNS)/cocomix/run.json:  $(LABELS_DONE) ; $(TRAIN) --preset demo --labels $(LABELS) --out $(@D) > $(@D).log 2>&1
$(RUNS)/kd/run.json:       $(LABELS_DONE) ; $(TRAIN) --preset demo --mode kd --labels $(LABELS) --out $(@D) > $(@D).log 2>&1
$(RUNS)/%/run.json: | $(RUNS)

$(RUNS):
	mkdir -p $@

train: $(RUNS)/cocomix/run.json

students: $(LABELS_DONE) | $(RUNS)
	@echo "training $(STUDENTS) ($(STUDENT_TOKENS) tokens each, two at a time; logs in $(RUNS)/*.log)"
	$(MAKE) --no-print-directory -j2 $(foreach s,$(SLOWEST_FIRST),$(RUNS)/$(s)/run.json)

demo: extract-concepts students downstream
	@echo "seeds: train/val split 0, students $(SEED), teacher and SAE 0 (see make teacher / make sae)"
	$(COCOMIX) sae info $(SAE)
	$(COCOMIX) compare $(foreach s,$(STUDENTS),$(RUNS)/$(s)) --out $(OUT)/report
	@echo "report: $(OUT)/report/report.md"

# ---- downstream tasks (lm-evaluation-harness) --------------------------------------------------------------
# The students on the offline stand-ins in data/tasks (LAMBADA-, HellaSwag- and WikiText-style, built from the
# corpus's validation documents); results go to <run>/downstream.json, which `cocomix compare` tables.
# About 35 s per demo student; DOWNSTREAM_LIMIT=N scores only N items per task.
DOWNSTREAM_LIMIT ?=
$(RUNS)/%/downstream.json: $(RUNS)/%/run.json
	$(COCOMIX) downstream $(RUNS)/$* $(if $(DOWNSTREAM_LIMIT),--limit $(DOWNSTREAM_LIMIT))
downstream: students
	$(MAKE) --no-print-directory -j2 $(foreach s,$(STUDENTS),$(RUNS)/$(s)/downstream.json)

# rebuilds the shipped tasks (deterministic: the same files unless the corpus or the tokenizer changed)
tasks: setup
	$(BIN)/python -m pipeline.tasks --out data/tasks --tokenizer $(TEACHER)

# ---- the study (not part of `make test` or `make demo`): every arm x seed, resumable ----------------------
# `make study` prints its plan (arms x seeds, tokens, estimated hours) and runs what is not finished yet;
# kill it and run it again to resume. Each finished run's config, metrics and run.json are copied to
# STUDY_KEEP (data/study, in the repository) with the report over them; commit that folder and a fresh
# checkout's `make study` trains only the runs it lacks. STUDY_HOURS=H starts no run that would end past
# H hours (a session or machine with a deadline).
STUDY_OUT    ?= out/study
STUDY_KEEP   ?= data/study
STUDY_SEEDS  ?= 3
STUDY_TOKENS ?= 2760000
STUDY_ARMS   ?=
STUDY_HOURS  ?=
study: setup
	$(COCOMIX) study --out $(STUDY_OUT) --keep $(STUDY_KEEP) --seeds $(STUDY_SEEDS) --student-tokens $(STUDY_TOKENS) \
	  --teacher $(TEACHER) --sae $(SAE) --layer $(LAYER) --window $(WINDOW) $(if $(STUDY_ARMS),--arms $(STUDY_ARMS)) \
	  $(if $(STUDY_HOURS),--hours $(STUDY_HOURS))

# the report over the kept runs alone (what the README's study table is made from)
study-report: setup
	$(COCOMIX) compare $(STUDY_KEEP)/runs/*/ --out $(STUDY_KEEP)/report \
	  $(if $(wildcard $(STUDY_KEEP)/runs/cocomix-seed*),--against cocomix)

# copies the finished runs of a study folder run without a keep folder (older studies), then the report
study-keep: setup
	@for f in $(STUDY_OUT)/runs/*/run.json; do d=$$(dirname $$f); n=$$(basename $$d); \
	  mkdir -p $(STUDY_KEEP)/runs/$$n && cp $$d/config.json $$d/metrics.jsonl $$d/run.json $(STUDY_KEEP)/runs/$$n/; done
	$(MAKE) --no-print-directory study-report

# ---- one GPU (not part of make bench): the figures `cocomix plan` needs, measured; about 5 minutes ----------
# `make setup` pins the CPU torch wheel: on a GPU machine install torch 2.13 for CUDA first. Without a GPU the
# check runs reduced shapes on the CPU and says so ("device": "cpu").
gpu-check: setup
	$(BIN)/python -m bench.gpu_check --out $(OUT)/gpu-check.json

# ---- rebuilding the shipped teacher and SAE (not part of `make demo`) -------------------------------------
BUILD := out/build
teacher: setup
	TOKENIZERS_PARALLELISM=true $(COCOMIX) tokenize --input data/corpus --train-tokenizer 8192 --seed 0 --out $(BUILD)/tokens
	$(COCOMIX) train --preset demo-teacher --tokens $(BUILD)/tokens --out $(BUILD)/teacher-run --max-tokens 8000000 \
	  --set threads=2 --set eval_windows=339
	$(COCOMIX) export-hf $(BUILD)/teacher-run --out $(TEACHER) --dtype bfloat16

sae: setup
	$(COCOMIX) sae train --teacher $(TEACHER) --tokens $(BUILD)/tokens --layer $(LAYER) --latents 3072 --k 16 \
	  --tokens-budget 6000000 --out $(SAE)
	$(COCOMIX) sae eval $(SAE) --teacher $(TEACHER) --tokens $(BUILD)/tokens --max-windows 339 --save

clean:
	rm -rf out
