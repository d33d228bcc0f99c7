# rnnlm: `make run` sets up and runs the main job, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run test bench clean

setup: $(STAMP)

# torch first, from the pinned CPU-capable release, so the project's torch range is already
# met and pip never pulls a CUDA build; then the project with the pins known to work here.
$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[dev,dask]"
	touch $(STAMP)

run: setup
	$(BIN)/rnnlm run

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/data_throughput.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/flow_overhead.py

clean:
	rm -rf $(VENV) .rnnlm
