# gn_triton: `make test` and `make bench` each work on a fresh machine with nothing installed.
# torch is installed first and explicitly (a CPU build unless you say otherwise), so that pip never
# resolves a bare `torch` requirement to a multi-GB CUDA build; override with TORCH_SPEC=...

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test bench lint static-report notebooks evidence rehearse-evidence clean

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

# The GPU evidence run (perf/gpu_evidence.py): `make evidence OUT=DIR` on the GPU machine itself (its own
# python, offline: no venv), or its rehearsal here on the CPU (Triton's interpreter, tiny shapes).
OUT ?= perf/out/evidence
BUDGET ?= 480
evidence:
	bash perf/gpu_evidence.sh $(OUT) $(BUDGET)

rehearse-evidence: $(VENV)/.perf
	$(PY) -m perf.gpu_evidence --rehearse --out perf/out/rehearsal --budget-s 180
	$(PY) -m perf.ingest perf/out/rehearsal perf/out/rehearsal

# The three notebooks in full mode: figures and CSVs under notebooks/results/ (about 20 minutes on a CPU).
notebooks: $(VENV)/.test
	$(PY) notebooks/run.py

# Ahead-of-time compilation report (no GPU needed), in .venv; or under another triton in its own venv
# (torch first, then that triton, then the package): make static-report TRITON_SPEC=triton==3.6.0
TRITON_SPEC ?=
STATIC_ARGS ?=
comma := ,
STATIC_VENV := $(if $(TRITON_SPEC),.venv-static/$(subst =,,$(subst <,,$(subst >,,$(subst $(comma),_,$(TRITON_SPEC))))),$(VENV))

static-report: $(if $(TRITON_SPEC),$(STATIC_VENV)/.ready,$(VENV)/.test)
	$(STATIC_VENV)/bin/python -m perf.static_report $(STATIC_ARGS)

.venv-static/%/.ready:
	$(PYTHON) -m venv .venv-static/$*
	.venv-static/$*/bin/python -m pip install "$(TORCH_SPEC)"
	.venv-static/$*/bin/python -m pip install "$(TRITON_SPEC)"
	.venv-static/$*/bin/python -m pip install --no-deps -e .
	touch $@

clean:
	rm -rf $(VENV) .venv-static perf/out .pytest_cache .ruff_cache .hypothesis
