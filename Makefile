# The two commands of the quick start:
#   make run   -- install, start local services, run a worker per tenant on a demo feed
#   make test  -- install and run the whole test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install run test test-standin unit integration reliability reliability-report bench bench-projections bench-gateway bench-idle services-up services-down clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/casestream demo

# the whole suite, on the real engines where a JDK 17+ and Maven are present
# (required when CI=true), else on the stand-in
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

# the stand-in profile's smoke subset (CI runs it after `make test`)
test-standin: $(STAMP)
	CASESTREAM_ENGINES=standin $(BIN)/python -m pytest -q -m "smoke or not integration"

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

# the reliability suite alone (part of `make test` too): faults, a generator, a recorder, an oracle checker
reliability: $(STAMP)
	$(BIN)/python -m pytest -q tests/reliability

# the reliability suite at a larger scale, its figures written to tests/reliability/RESULTS.md
reliability-report: $(STAMP)
	$(BIN)/python bench/reliability.py $(BENCH_ENGINES)

# benchmarks start their own engines in a temporary directory:
# ENGINES=apache|standin (default: CASESTREAM_ENGINES, else apache where a JDK 17+ and Maven are present)
BENCH_ENGINES = $(if $(ENGINES),--engines $(ENGINES))
BOTH_ENGINES  = apache,standin

bench: $(STAMP)
	$(BIN)/python bench/intake_bench.py $(BENCH_ENGINES)

bench-projections: $(STAMP)
	$(BIN)/python bench/projections_bench.py $(BENCH_ENGINES)

bench-gateway: $(STAMP)
	$(BIN)/python bench/gateway_bench.py $(BENCH_ENGINES)

# idle CPU of a worker per tenant, tail and api (on both profiles unless ENGINES is given)
bench-idle: $(STAMP)
	$(BIN)/python bench/idle_cpu.py --engines $(or $(ENGINES),$(BOTH_ENGINES))

services-up: $(STAMP)
	$(BIN)/casestream services up

services-down: $(STAMP)
	$(BIN)/casestream services down

clean:
	rm -rf $(VENV) .casestream .pytest_cache
