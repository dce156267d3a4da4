# gn_triton: `make test` and `make bench` each work on a fresh machine with nothing installed.
# torch is installed first and explicitly (a CPU build unless you say otherwise), so that pip never
# resolves a bare `torch` requirement to a multi-GB CUDA build; override with TORCH_SPEC=...

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test bench lint static-report notebooks clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install -e ".[test,models,notebooks]"
	touch $@

$(VENV)/.perf: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install -e ".[perf]"
	touch $@

lint: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The main job: the batch-size sweep against torch eager, torch.compile and peers (on a GPU), or a
# small functional sweep in Triton's interpreter when no GPU is present (it says so). CSV and plots
# go to perf/out/<device>/.
bench: $(VENV)/.perf
	$(PY) -m perf.sweep $(BENCH_ARGS)

# The three notebooks in full mode: figures and CSVs under notebooks/results/ (about 20 minutes on a CPU).
notebooks: $(VENV)/.test
	$(PY) notebooks/run.py

static-report: $(VENV)/.test
	$(PY) -m perf.static_report

clean:
	rm -rf $(VENV) perf/out .pytest_cache .ruff_cache .hypothesis
