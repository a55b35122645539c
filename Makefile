# drop-worker — `make run` starts everything, `make test` runs the tests. Both set up what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test test-unit lint chaos cluster bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "drop-worker needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,embedded,sandbox]'
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/drop-jobs run

# Three test processes (pytest-xdist): most tests wait on real processes, servers and timeouts, so
# they overlap well even on 2 cores. Each test has its own schema and Redis namespace.
test: install
	$(BIN)/python -m pytest -q -n 3

# The fast loop: pure rules, money, settings, digests; needs no PostgreSQL, Redis or network.
test-unit: install
	$(BIN)/python -m pytest -q tests/unit

# ruff, mypy (typed rows, zero errors on production code) and import-linter's layers contract,
# all pinned and configured in pyproject.toml.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Heavier chaos runs (scenario sizes x10, plus a real restart of a private redis-server);
# figures land in .data/chaos-figures.jsonl for docs/reliability.md.
chaos: install
	@mkdir -p .data
	DROP_CHAOS_SCALE=$${DROP_CHAOS_SCALE:-10} DROP_CHAOS_LONG=1 DROP_CHAOS_FIGURES=.data/chaos-figures.jsonl \
		$(BIN)/python -m pytest tests/chaos -q -s -p no:cacheprovider

# Not part of `make test`: ~25-30 minutes on 2 cores, the deployed configuration first (interleaved
# rounds, latency at 25/75 % of capacity), the 1,000,000-job soak (~8-10 min) last; regenerates
# docs/benchmarks.{md,png,json}. BENCH_ARGS=--quick for a fast pass (~10 min),
# BENCH_ARGS="--soak-jobs 200000" for a shorter soak, BENCH_ARGS="--rounds 5" for more rounds.
bench: install
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench report $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .data .pytest_cache

# Three hosts in network namespaces (root, iproute2, redis-server): a host cut off, the scheduler
# leader's host cut, a host SIGKILLed. ~12 minutes; figures in the output (docs/reliability.md).
cluster: install
	DROP_CLUSTER=1 $(BIN)/python -m pytest tests/cluster -q -s -p no:cacheprovider
