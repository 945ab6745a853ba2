# The README's commands. `make run` and `make test` work on a fresh machine and a second time.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
# A new VM's apt-daily or unattended-upgrades often holds the package lock for minutes: wait
# for it rather than fail the set-up.
APT := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get -o DPkg::Lock::Timeout=600
APT_INSTALL := $(APT) install -y -qq --no-install-recommends
PYTEST_ARGS ?=

.PHONY: setup system-deps run test lint typecheck unit integration e2e stack stack-stop \
        stack-status bench eval-extractor faults clean

setup: $(INSTALLED) system-deps

$(INSTALLED): pyproject.toml
	@# Debian's Python has no venv module (ensurepip) without its own package.
	@$(PYTHON) -c "import ensurepip" 2>/dev/null || { $(APT) update -qq \
		&& $(APT_INSTALL) $(notdir $(PYTHON))-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# Debian packages: PostgreSQL's server (the stack starts its own cluster), docker-compose,
# which validates docker-compose.yml without a Docker engine, and Prometheus (promtool checks
# the alert rules; a real server scrapes the processes in a test). Kafka comes from Maven
# Central when the stack first starts.
system-deps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v docker-compose >/dev/null \
	    || ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
		$(APT) update -qq && $(APT_INSTALL) postgresql docker-compose prometheus; \
	fi

stack: setup
	$(BIN)/flexoraa stack up

stack-stop: $(INSTALLED)
	$(BIN)/flexoraa stack stop

stack-status: $(INSTALLED)
	$(BIN)/flexoraa stack status

run: setup
	$(BIN)/flexoraa run

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(INSTALLED)
	$(BIN)/mypy .

unit: $(INSTALLED)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: setup
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

e2e: setup
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

# Fault injection (kill -9, broker restart, PostgreSQL outage, rebalance, replay, a worker
# started on a backlog), also part of `make test` at 1,200 events. FAULT_EVENTS sets the load
# (50,000 is the full size).
faults: setup
	$(BIN)/pytest tests/integration/test_faults.py -m faults $(PYTEST_ARGS)

# The whole suite: lint, types, unit, integration (real Kafka and PostgreSQL) and end to end.
test: setup lint typecheck
	$(BIN)/pytest tests $(PYTEST_ARGS)

clean: stack-stop
	rm -rf .stack

# Precision and recall per slot of the built-in qualification extractor.
eval-extractor: $(INSTALLED)
	$(BIN)/python -m bench.extractor_eval

# Benchmarks against the real local broker; results (with machine facts) in bench/results/.
bench: setup
	@command -v wrk >/dev/null || ($(APT) update -qq && $(APT_INSTALL) wrk)
	$(BIN)/python -m bench.freshness --workers 1 --rate 200 --seconds 20
	$(BIN)/python -m bench.freshness --workers 1 --rate 400 600 800 1000 --seconds 20
	@# (c)'s figure: a minute at 1,000/s, so its p99 is the 12th-worst of 1,200 probes, not the 4th of 400.
	$(BIN)/python -m bench.freshness --workers 1 --rate 1000 --seconds 60
	$(BIN)/python -m bench.freshness --workers 2 --rate 200 --seconds 20
	$(BIN)/python -m bench.ingest --rate 800 --seconds 10
	$(BIN)/python -m bench.latency_events --events 50000
	$(BIN)/python -m bench.webhooks --seconds 10 --connections 16
	$(BIN)/python -m bench.leakage --leads 100000
	$(BIN)/python -m bench.throughput --events 30000
	$(BIN)/python -m bench.throughput --events 10000 --credited
	$(BIN)/python -m bench.reads --leads 100000 --rate 500 --seconds 20
	$(BIN)/python -m bench.takeover --leads 100000
	$(BIN)/python -m bench.restart --leads 10000 --messages 10 --segment-ms 604800000
	$(BIN)/python -m bench.restart --leads 10000 --messages 10 --segment-ms 3000
	$(BIN)/python -m bench.tokens --events 200000 --tenants 100
	$(BIN)/python -m bench.outage --rate 100 --seconds 15
