# One venv per checkout; every target installs what it needs through pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= test,tfds,notebook,docs

.PHONY: install test lint bench demo docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"

test:
	$(BIN)/python -m pytest tests

lint:
	$(BIN)/ruff check cljax tests bench experiments docs
	$(BIN)/ruff format --check cljax tests bench experiments docs

bench:
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/optim.py
	$(BIN)/python bench/data.py
	$(BIN)/python bench/scale.py --matrix experiments/results/bench/scale.txt

demo:
	$(BIN)/cljax run experiments/configs/demo.py --methods seqft,osf,gorp,olora,mtl

# API reference from the docstrings (pdoc); any unresolved annotation or reference fails it.
docs:
	$(BIN)/python docs/build_api.py -o build/api
