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
FUZZ_MESSAGES = 1000
FUZZ_SEED =

help: ## Show every target and what it does (the default).
	@echo "Usage: make TARGET [VAR=value]"; echo
	@awk -F':.*## ' '/^[a-z][a-z-]*:.*## / { printf "  %-12s %s\n", $$1, $$2 }' Makefile
	@echo; echo "Variables: QUEUE=worker-a|queue_a COUNT=N TASKS=N STACK=compose|local BROKER_URL=... CONVEYOR_CONFIG=FILE"

install: $(STAMP) ## Create .venv and install the pinned dependencies (once; again when requirements change).

$(STAMP): requirements.txt requirements-dev.txt requirements-flower.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

run: install ## Dispatch test-config.yml and print the report (starts workers for the run if none answer).
	$(PY) dispatch.py --start-stack

load-test: install ## Load-test the stack: make load-test TASKS=1000 (jobs in all, by the scenario's weights) [SCENARIO=...]; report in reports/load-test/.
	$(PY) load_test.py --scenario "$(SCENARIO)" --tasks "$(TASKS)" --start-stack --report reports/load-test

bench: install ## Benchmark vs the peers in ../shared/bench and the targets (BENCH_TASKS=10000, BENCH_ROUNDS=3, about 6 min); JSON in bench-results/.
	$(PY) bench/bench.py --tasks "$(BENCH_TASKS)" --rounds "$(BENCH_ROUNDS)"

test: install ## Check the layers (import-linter), run the unit and integration tests, then the end-to-end ones again with every fast path off.
	$(VENV)/bin/lint-imports
	$(PY) -m pytest
	CONVEYOR_FAST_PATHS=off $(PY) -m pytest -m e2e

fuzz: install ## Fuzz the workers' intake: FUZZ_MESSAGES=1000 mutated messages per pool (3 pools); the seed is printed (replay: FUZZ_SEED=N).
	@seed="$(FUZZ_SEED)"; [ -n "$$seed" ] || seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); \
	echo "fuzz seed: $$seed (replay: make fuzz FUZZ_SEED=$$seed FUZZ_MESSAGES=$(FUZZ_MESSAGES))"; \
	FUZZ_MESSAGES="$(FUZZ_MESSAGES)" $(PY) -m pytest tests/test_fuzz_intake.py -s -q --hypothesis-seed="$$seed"

up: install ## Start the worker services (Docker Compose or local processes, and a broker if none answers; the first line says which).
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

flower: install ## Flower on http://127.0.0.1:5555 for the same broker and config, its Broker tab on the management API.
	$(PY) -m conveyor.cli.flower

chaos: install ## Fault injection: 10000 tasks (CHAOS_TASKS) incl. pipelines and malformed messages, 10 % failing, replicas SIGKILLed, a broker restart; exit 0 only if all are confirmed and none is lost (CHAOS_ARGS=--partition).
	$(PY) chaos.py --tasks "$(CHAOS_TASKS)" $(CHAOS_ARGS)

clean: ## Stop our workers and remove what the project created here (.run, caches); never a global prune.
	if [ -x $(PY) ]; then $(PY) scale.py down || true; fi
	if [ -x $(PY) ]; then $(PY) chaos.py --sweep || true; fi
	rm -rf .run .pytest_cache
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

.PHONY: help install run load-test bench test fuzz up down ps logs status scale scale-all autoscale build monitor flower chaos clean
