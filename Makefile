# Two commands for a fresh machine with Python 3.11:  make train   and   make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/default
PYTEST_ARGS ?=

.PHONY: install train test test-all clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/activate requirements.txt requirements-dev.txt setup.py
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

train: install  ## Train the default small PEER model on the bundled WikiText-2.
	$(BIN)/python scripts/train.py --config=configs/default.py --workdir=$(WORKDIR)

test: install  ## The default test suite (what CI runs); slow tests are skipped.
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

test-all: install  ## Every test, slow ones included.
	$(BIN)/python -m pytest -q -n 2 -m "" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
