# conveyor: Celery + RabbitMQ task system. POSIX make and sh; `make` alone prints this help.
.POSIX:
SHELL = /bin/sh

PYTHON = python3
VENV = .venv
PY = $(VENV)/bin/python
STAMP = $(VENV)/.installed-stamp
TASKS = 1000
SCENARIO = scenarios/seed.yml
BENCH_TASKS = 10000
BENCH_ROUNDS = 3
QUEUE =
COUNT =
CHAOS_TASKS = 10000
CHAOS_ARGS =

help: ## Show every target and what it does (the default).
	@echo "Usage: make TARGET [VAR=value]"; echo
	@awk -F':.*## ' '/^[a-z][a-z-]*:.*## / { printf "  %-12s %s\n", $$1, $$2 }' Makefile
	@echo; echo "Variables: QUEUE=worker-a|queue_a COUNT=N TASKS=N STACK=compose|local BROKER_URL=... CONVEYOR_CONFIG=FILE"

install: $(STAMP) ## Create .venv and install the pinned dependencies (once; again when requirements change).

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

run: install ## Dispatch test-config.yml and print the report (starts workers for the run if none answer).
	$(PY) dispatch.py --start-stack

load-test: install ## Load-test the stack: make load-test TASKS=1000 [SCENARIO=scenarios/flood.yml]; report in reports/load-test/.
	$(PY) load_test.py --scenario "$(SCENARIO)" --tasks "$(TASKS)" --start-stack --report reports/load-test

bench: install ## Benchmark vs the peers in ../shared/bench and the targets (BENCH_TASKS=10000, BENCH_ROUNDS=3, about 6 min); JSON in bench-results/.
	$(PY) bench/bench.py --tasks "$(BENCH_TASKS)" --rounds "$(BENCH_ROUNDS)"

test: install ## Run the unit and integration tests.
	$(PY) -m pytest

up: install ## Start the worker services (Docker Compose if a Docker engine answers, else local processes).
	$(PY) scale.py up

down: install ## Stop the worker services (warm shutdown) and remove what `up` created.
	$(PY) scale.py down

ps: install ## List worker replicas and whether each answers a ping.
	$(PY) scale.py ps

logs: install ## Follow the workers' logs.
	$(PY) scale.py logs

status: install ## Replicas per service and messages per queue.
	$(PY) scale.py status

scale: install ## Set one service's replicas: make scale QUEUE=worker-a COUNT=3.
	@if [ -z "$(QUEUE)" ] || [ -z "$(COUNT)" ]; then echo "error: usage: make scale QUEUE=worker-a COUNT=3" >&2; exit 2; fi
	$(PY) scale.py scale --service "$(QUEUE)" --count "$(COUNT)"

scale-all: install ## Set every service's replicas: make scale-all COUNT=4.
	@if [ -z "$(COUNT)" ]; then echo "error: usage: make scale-all COUNT=4" >&2; exit 2; fi
	$(PY) scale.py scale-all --count "$(COUNT)"

autoscale: install ## Scale every service on its queues' backlog until interrupted (bounds in the config).
	$(PY) scale.py auto

build: install ## Build the worker image (Docker).
	$(PY) scale.py --stack compose build

monitor: install ## Live dashboard of queues, workers and task types; Prometheus metrics on 127.0.0.1:9808.
	$(PY) monitor.py

chaos: install ## Fault injection: 10000 tasks (CHAOS_TASKS) incl. pipelines and malformed messages, 10 % failing, replicas SIGKILLed, a broker restart; exit 0 only if all are confirmed and none is lost (CHAOS_ARGS=--partition).
	$(PY) chaos.py --tasks "$(CHAOS_TASKS)" $(CHAOS_ARGS)

clean: ## Stop our workers and remove what the project created here (.run, caches); never a global prune.
	if [ -x $(PY) ]; then $(PY) scale.py down || true; fi
	if [ -x $(PY) ]; then $(PY) chaos.py --sweep || true; fi
	rm -rf .run .pytest_cache
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

.PHONY: help install run load-test bench test up down ps logs status scale scale-all autoscale build monitor chaos clean
