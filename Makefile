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
	# torchtitan for tests/test_torchtitan.py: its optimizer container and config need only these;
	# its data and logging dependencies (datasets < 4.8) would downgrade the suite's versions
	$(BIN)/pip install -q --no-deps torchtitan==0.3.0 tyro==1.0.17 docstring_parser==0.18.0 spmd_types==0.2.3
	touch $(STAMP)

.PHONY: env demo test bench
env: $(STAMP)

demo: $(STAMP)
	$(BIN)/python launch/train.py --config configs/tiny.json

test: $(STAMP)
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/optimizer_step.py
