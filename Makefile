# bctnb — the two commands of the README are `make reproduce` and `make test`.
# Both start with `make setup`, which builds .venv from nothing (idempotent, keyed on pyproject.toml).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bctnb-setup
# One thread per process: torchrun workers and the test runner share the 2 cores explicitly.
export OMP_NUM_THREADS ?= 1
export PYTHONHASHSEED ?= 0
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# Packages are installed without byte-compiling (pip compiles all ~13,000 modules serially: ~45 CPU-s of a fresh set-up);
# Python then compiles the modules actually imported, once, and caches them, which PYTHONDONTWRITEBYTECODE would stop.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup test test-fast test-data check-sync check-clean nbtest pytest reproduce reproduce-full sweeps zoo lab bench clean

# Keyed on the *content* of pyproject.toml (nbdev-export rewrites the file, so its mtime is useless).
setup:
	@h=$$(sha256sum pyproject.toml | cut -c1-64); \
	if [ -x $(BIN)/python ] && [ "$$(cat $(STAMP) 2>/dev/null)" = "$$h" ]; then exit 0; fi; \
	set -x; \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	$(BIN)/python -m pip install -q --upgrade pip; \
	$(BIN)/python -m pip install -q --no-compile torch==2.13.0; \
	$(BIN)/python -m pip install -q --no-compile -e ".[dev]"; \
	$(BIN)/python -m ipykernel install --sys-prefix --name bctnb --display-name "Python (bctnb)" >/dev/null; \
	set +x; echo "$$h" > $(STAMP); \
	echo "setup: .venv ready ($$($(BIN)/python -c 'import torch,sys;print(sys.version.split()[0], "torch", torch.__version__)'))"
# torch is installed first, pinned: the local CPU wheel here (the CUDA build on a CUDA machine); a looser
# requirement resolved later would otherwise pull a multi-GB CUDA build onto a CPU machine.

# pytest-xdist workers: one per core, at most 8 (each worker trains its own session-wide smoke old run, tests/conftest.py).
# `--dist worksteal` rebalances the uneven tests (papermill/torchrun runs of 10-150 s next to sub-second unit tests).
# Tests must not depend on running on the same worker as another test (xdist_group/--dist loadgroup is silently ignored
# with pytest 9.2, pytest-xdist#1386). Nothing writes into the repository tree: every run, report and cache goes to a
# tmp folder; torchrun launches use --standalone (a free port each).
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n > 8 ? 8 : n )))
PYTEST := $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal

## make test: sync checks, notebook tests, pytest (slow tests included; the whole-dataset builds are make test-data).
## Timings: README "Tests" (fresh-clone .ci/run 4.1-4.3 min on 2 idle cores, 2026-12-05/06).
test: setup check-sync check-clean nbtest pytest
	@echo "make test: all checks passed"

## make test-fast: the inner loop, unit tests only (-m "not slow": no torchrun, no papermill), no sync/clean checks.
test-fast: setup
	$(PYTEST) -m "not slow and not dataset"

## make test-data: the full dataset builds from nothing, checked against their data cards (fonts: ~500 MB from npm).
test-data: setup
	$(PYTEST) -m dataset

# (1) The package is generated from nbs/: nbdev-export must not change bctnb/.
check-sync: setup
	@bash .ci/check_unchanged.sh bctnb "nbdev-export changed bctnb/: the package was edited by hand or a notebook was not exported. Edit the notebook in nbs/, run nbdev-export, commit both." -- $(BIN)/nbdev-export

# (2) Notebooks are committed clean: nbdev-clean must not change nbs/.
check-clean: setup
	@bash .ci/check_unchanged.sh nbs "nbdev-clean changed notebooks in nbs/: run nbdev-clean and commit the cleaned notebooks." -- $(BIN)/nbdev-clean

# (3) Inline tests of the library notebooks (pipeline notebooks carry skip_exec and run under pytest). Runs before
# pytest, not beside it: both already use both cores, so running them together would only oversubscribe the CPU.
nbtest: setup
	$(BIN)/nbdev-test --n-workers 2 --timing

# (4) pytest: unit tests, torchrun and papermill runs of the pipeline notebooks, in parallel (pytest-xdist).
pytest: setup
	$(PYTEST) -m "not dataset"

## make reproduce: the CPU tier on the embedded emoji dataset, ending in a report under reports/.
reproduce: setup
	@bash .ci/reproduce.sh quick

reproduce-full: setup
	@bash .ci/reproduce.sh full

## make sweeps: NCCL temperature (3 seeds) and AdvBCT boundary/weights sweep at the quick scale -> reports/sweeps_quick/
sweeps: setup
	$(BIN)/python -c "from bctnb.report import run_sweep; print(run_sweep('quick'))"

## make zoo [ZOO_IDS="train_new-… …"]: restore model-zoo runs (default: all) from git history into zoo/ ($$BCTNB_ZOO),
## every file checked against its sha256 in reports/model_zoo.json. No network; a shallow clone needs `git fetch --unshallow`.
zoo: setup
	@$(BIN)/python -c "import sys; from bctnb.study import restore_zoo; [print(p) for p in restore_zoo(sys.argv[1:] or None)]" $(ZOO_IDS)

lab: setup
	$(BIN)/jupyter lab --notebook-dir nbs --ServerApp.ip=127.0.0.1 $(if $(filter 0,$(shell id -u)),--allow-root)

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) _proc _docs *.egg-info .pytest_cache
