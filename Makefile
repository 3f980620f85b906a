# conveyor: Celery + RabbitMQ task system. POSIX make and sh; `make` alone prints this help.
.POSIX:
SHELL = /bin/sh

PYTHON = python3
VENV = .venv
PY = $(VENV)/bin/python
STAMP = $(VENV)/.installed-stamp
TASKS = 1000
QUEUE =
COUNT =

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

monitor: install ## Follow the workers' logs (a live dashboard comes with the monitoring work).
	$(PY) scale.py logs

clean: ## Stop our workers and remove what the project created here (.run, caches); never a global prune.
	if [ -x $(PY) ]; then $(PY) scale.py down || true; fi
	rm -rf .run .pytest_cache
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

.PHONY: help install run test up down ps logs status scale scale-all autoscale build monitor clean
