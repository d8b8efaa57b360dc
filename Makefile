# Set-up is automatic: every target creates .venv and installs the project when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= configs/smoke.yaml
# extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
OUT    ?= demo_output

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install test test-costs test-fast demo clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned to the 2.13 CPU build first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.*" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

# Two pytest workers (pytest-xdist), a test file per worker at a time (module fixtures are built
# once), the costliest files first (tests/file_costs.json, read by tests/conftest.py; refresh it with
# `make test-costs`). The suite is CPU-bound on two cores (Ray process start-ups; 93 % busy
# measured): a third worker gave the non-serial phase 690 s against 683-686 s with two (README,
# stop 55). Tests marked `serial` (a two-node cluster, two stages at once) then run alone.
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# pytest's exit code 5 (no tests collected) counts as success in each phase.
test: $(STAMP)
	@$(PY) -m pytest -q $(XDIST) -m "not serial" --durations=15 tests; rc=$$?; [ $$rc -eq 5 ] && rc=0; \
	$(PY) -m pytest -q -m serial --durations=5 tests; rc2=$$?; [ $$rc2 -eq 5 ] && rc2=0; \
	[ $$rc -eq 0 ] && [ $$rc2 -eq 0 ]

# Measure each test file's cost (summed durations, the non-serial phase as `make test` runs it)
# into tests/file_costs.json, the order `make test` takes the files in.
test-costs: $(STAMP)
	@$(PY) -m pytest -q $(XDIST) -m "not serial" --record-file-costs tests/file_costs.json tests; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

# The inner loop: every test not marked slow (the slow ones build clusters, sweeps and corpora).
test-fast: $(STAMP)
	@$(PY) -m pytest -q $(XDIST) -m "not slow" --durations=10 tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

demo: $(STAMP)
	$(VENV)/bin/cardiomotion demo --config $(CONFIG) --out $(OUT)

clean:
	rm -rf $(OUT) .pytest_cache
