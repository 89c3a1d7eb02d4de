# Two commands set up everything on a fresh machine:
#   make demo   trains the tiny LLaMA on the embedded default text (no download)
#   make test   runs the test suite
# Both create .venv and install what they need; torch is installed first and pinned.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[all,test]'
	touch $(STAMP)

.PHONY: env demo test bench
env: $(STAMP)

demo: $(STAMP)
	$(BIN)/python launch/train.py --config configs/tiny.json

test: $(STAMP)
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/optimizer_step.py
