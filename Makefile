# rnnlm: `make run` sets up and runs the main job, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SERVERS_STAMP := $(VENV)/.installed-servers

.PHONY: setup setup-servers run test bench gpu-check clean server deploy worker nightly test-deployments

# Deployments (deployments/README.md): a Prefect server on 127.0.0.1, the work pools and
# deployments of deployments/prefect.yaml, a worker per pool. PREFECT_API_URL wins if set.
PREFECT_PORT ?= 4200
POOL         ?= cpu
API_URL      := $${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_PORT)/api}

setup: $(STAMP)

# torch first, from the pinned CPU-capable release, so the project's torch range is already
# met and pip never pulls a CUDA build; then the project with the pins known to work here.
$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[dev,dask]"
	touch $(STAMP)

# What the server tests (S3 on moto, Redis locks, Prefect on PostgreSQL, a local Ray cluster) need
# besides Debian's redis-server and postgresql: without them those tests skip, naming what to install.
setup-servers: $(SERVERS_STAMP)

$(SERVERS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[dev,dask,test,ray]"
	touch $(SERVERS_STAMP)

run: setup
	$(BIN)/rnnlm run

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/data_throughput.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/flow_overhead.py

# The GPU path in one run (bench/gpu_check.py): on a GPU machine, `make gpu-check ARGS="--ptb-dir DIR"`;
# here, a CPU smoke run: `make gpu-check ARGS="--device cpu"`.
gpu-check: setup
	PYTHON=$(BIN)/python bench/gpu_check.sh $(ARGS)

server: setup
	$(BIN)/rnnlm server --port $(PREFECT_PORT)

deploy: setup
	$(BIN)/rnnlm deploy --api-url $(API_URL)

worker: setup
	$(BIN)/rnnlm worker --pool $(POOL) --api-url $(API_URL)

nightly: setup
	PREFECT_API_URL=$(API_URL) $(BIN)/prefect deployment run retrain/nightly

test-deployments: setup
	$(BIN)/python -m pytest -q tests/test_deployments.py

clean:
	rm -rf $(VENV) .rnnlm
