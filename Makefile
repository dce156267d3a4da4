# gn_triton: `make test` and `make bench` each work on a fresh machine with only Python 3.10+ and make.
#
# The software stacks the suite runs on (README.md, "Support"), each installed from the package index by
# exact pins into its own virtual environment: torch first, then triton, then the package, so pip never
# swaps the torch build. No GPU is needed: the kernels run in Triton's interpreter, and the CUDA builds of
# torch import on a CPU-only machine.
#   make test          torch 2.13.0 + triton 3.7.1, what torch 2.13 from the package index pins (.venv):
#                      lint and the whole suite
#   make test-stacks   torch 2.11.0 + triton 3.6.0, the floor: the whole suite but the slow families, which
#                      run there as one smoke test each; torch 2.13.0 + triton 3.9.0, the newest triton (what
#                      a CPU build of torch, which pins no triton, gets): API, module, autograd, compile and
#                      one path per kernel
#   make hub, make dist, make release-check: the kernels-hub build and the wheel (below)
# torch==2.13.0 and torch==2.11.0 are CUDA builds of several GB from the package index (a CPU build of
# 2.13.0 where pip is pointed at one). Override the pins of `make test` with TORCH_SPEC=... TRITON_SPEC=...

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEFAULT_TRITON_SPEC := triton==3.7.1
TRITON_SPEC ?= $(DEFAULT_TRITON_SPEC)
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

FLOOR_TORCH := 2.11.0
FLOOR_TRITON := 3.6.0
NEWEST_TORCH := 2.13.0
NEWEST_TRITON := 3.9.0
FLOOR_VENV := .venv-stacks/torch$(FLOOR_TORCH)-triton$(FLOOR_TRITON)
NEWEST_VENV := .venv-stacks/torch$(NEWEST_TORCH)-triton$(NEWEST_TRITON)
FLOOR_PYTEST_ARGS ?= -m "not slow_family or smoke"
NEWEST_PYTEST_ARGS ?= -m "stack_subset"

.PHONY: test format pre-commit test-stacks test-floor test-newest bench host-report lint static-report notebooks evidence rehearse-evidence \
	hub dist release-check clean

# $(call new_venv,DIR,TORCH_SPEC,TRITON_SPEC): a virtual environment holding exactly that torch and triton.
define new_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q "$(2)"
	$(1)/bin/python -m pip install -q "$(3)"
	$(1)/bin/python -c "from importlib.metadata import version as v; print('$(1): torch', v('torch'), 'triton', v('triton'))"
endef

$(VENV)/.stack:
	$(call new_venv,$(VENV),$(TORCH_SPEC),$(TRITON_SPEC))
	touch $@

$(VENV)/.test: $(VENV)/.stack pyproject.toml
	$(PY) -m pip install -q -e ".[test,models,notebooks]"
	touch $@

$(VENV)/.perf: $(VENV)/.stack pyproject.toml
	$(PY) -m pip install -q -e ".[perf]"
	touch $@

# $(call stack_rule,DIR,TORCH,TRITON,EXTRA): the rule making DIR/.test, that stack with the suite's
# dependencies, and EXTRA (if any) installed with --no-deps.
define stack_rule
$(1)/.test: pyproject.toml
	$$(call new_venv,$(1),torch==$(2),triton==$(3))
	$(1)/bin/python -m pip install -q -e ".[test,models,notebooks]"
	$(if $(4),$(1)/bin/python -m pip install -q --no-deps $(4))
	touch $$@
endef
# timm's models (tests/test_timm.py) on the floor stack: timm needs torchvision, and the newest torchvision
# makes pip replace torch, so the torchvision built for this torch is pinned and neither pulls its deps.
FLOOR_TIMM := torchvision==0.26.0 timm==1.0.31
$(eval $(call stack_rule,$(FLOOR_VENV),$(FLOOR_TORCH),$(FLOOR_TRITON),$(FLOOR_TIMM)))
$(eval $(call stack_rule,$(NEWEST_VENV),$(NEWEST_TORCH),$(NEWEST_TRITON)))

lint: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy  # gn_triton/ ([tool.mypy] in pyproject.toml): about 10 s, under 1 s with its cache

# Rewrite what ruff can fix: the formatting, then the lint rules with a fix (import order, pyupgrade's).
format: $(VENV)/.test
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Every hook of .pre-commit-config.yaml on every file (ruff, mypy, the layering test, hygiene: all local
# hooks; the hygiene ones install pre-commit-hooks from the package index once). Not part of `make test`,
# whose lint step and suite already run the same checks but the hygiene ones.
pre-commit: $(VENV)/.test
	$(PY) -m pip install -q pre-commit==4.7.0
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/pre-commit run --all-files

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-floor: $(FLOOR_VENV)/.test
	$(FLOOR_VENV)/bin/python -m pytest $(FLOOR_PYTEST_ARGS) $(PYTEST_ARGS)

test-newest: $(NEWEST_VENV)/.test
	$(NEWEST_VENV)/bin/python -m pytest $(NEWEST_PYTEST_ARGS) $(PYTEST_ARGS)

test-stacks: test-floor test-newest

# The main job: the batch-size sweep against torch eager, torch.compile and peers (on a GPU), or a
# small functional sweep in Triton's interpreter when no GPU is present (it says so). CSV and plots
# go to perf/out/<device>/. It runs in its own environment ($(VENV), built here with the pinned stack);
# `python -m perf.sweep` in your own environment benches the torch and triton you have.
# BENCH_ARGS passes options to perf.sweep (e.g. BENCH_ARGS="--batch 1 32 --dtype bf16").
bench: $(VENV)/.perf
	@echo "make bench: benchmarking in $(VENV), its own environment ($(TORCH_SPEC), $(TRITON_SPEC)), built by make;"
	@echo "  options go in BENCH_ARGS=\"...\" (python -m perf.sweep --help); to bench the stack you have, run"
	@echo "  python -m perf.sweep in your own environment (pip install -e '.[perf]' there first)."
	$(PY) -m perf.sweep $(BENCH_ARGS)

# The host path's cost per call for every route (no GPU: triton's launch path with a stand-in driver),
# as ratios to references measured in the same run: perf/results/host/ and docs/host-path.md.
host-report: $(VENV)/.perf
	env -u TRITON_INTERPRET $(PY) -m perf.host_report $(HOST_ARGS)

# The time-boxed GPU benchmark job (perf/README.md): `make evidence OUT=DIR` on a GPU host (its own
# python, no network needed: no venv), or its rehearsal on a CPU (Triton's interpreter, tiny shapes).
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

# Ahead-of-time compilation report (no GPU needed) under .venv's triton, or under another triton in its
# own environment: make static-report TRITON_SPEC=triton==3.6.0 STATIC_ARGS=--quick
STATIC_ARGS ?=
comma := ,
STATIC_VENV := $(if $(filter $(DEFAULT_TRITON_SPEC),$(TRITON_SPEC)),$(VENV),.venv-static/$(subst =,,$(subst <,,$(subst >,,$(subst $(comma),_,$(TRITON_SPEC))))))

static-report: $(if $(filter $(DEFAULT_TRITON_SPEC),$(TRITON_SPEC)),$(VENV)/.test,$(STATIC_VENV)/.ready)
	$(STATIC_VENV)/bin/python -m perf.static_report $(STATIC_ARGS)

.venv-static/%/.ready:
	$(call new_venv,.venv-static/$*,$(TORCH_SPEC),$(TRITON_SPEC))
	.venv-static/$*/bin/python -m pip install -q --no-deps -e .
	touch $@

# The two distribution routes (docs/distribution.md), prepared and tested, neither published yet.
#   make hub            the Hugging Face kernels-hub build in build/hub/ (standard library only)
#   make dist           the sdist and wheel in dist/, built from the files git tracks, twine-checked
#   make release-check  that wheel installed into a fresh environment and smoke-tested there, away from
#                       the source tree
# dist and release-check run in $(RELEASE_VENV): the pinned torch and triton, numpy, build and twine, and no
# gn_triton, so the smoke test's fresh environment can borrow its torch instead of installing one again.
RELEASE_VENV := .venv-release

$(RELEASE_VENV)/.ready:
	$(call new_venv,$(RELEASE_VENV),$(TORCH_SPEC),$(TRITON_SPEC))
	$(RELEASE_VENV)/bin/python -m pip install -q numpy build twine
	touch $@

hub:
	$(PYTHON) release/hub.py --out build/hub

dist: $(RELEASE_VENV)/.ready
	$(RELEASE_VENV)/bin/python release/dist.py build --out dist

release-check: dist
	$(RELEASE_VENV)/bin/python release/dist.py smoke

clean:
	rm -rf $(VENV) .venv-stacks .venv-static $(RELEASE_VENV) perf/out build dist .pytest_cache .ruff_cache .hypothesis
