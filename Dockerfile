# The worker image: one image for every worker service; WORKER_SERVICE picks which one a container runs.
#   docker build --network host -t conveyor-worker .
#   docker run --network host -e WORKER_SERVICE=worker-a -e BROKER_URL=amqp://... conveyor-worker
# The `flower` stage is the same code plus Flower (requirements-flower.txt), for the compose
# `flower` service: docker build --network host --target flower -t conveyor-flower .
# The worker stage comes last, so a plain `docker build` still builds the worker.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The user comes before the code so that editing the code never re-runs this layer.
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin conveyor

WORKDIR /app

# Dependencies in their own layer: it is rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

FROM base AS flower
# Flower's own layer before the code, so that a code change does not reinstall it.
COPY requirements-flower.txt .
RUN pip install --no-cache-dir -r requirements-flower.txt
COPY celery_app.py test-config.yml ./
COPY conveyor/ conveyor/
USER conveyor
ENV CONVEYOR_RUN_DIR=/tmp/conveyor \
    CONVEYOR_CONFIG=/app/test-config.yml
# Bound to loopback by default (FLOWER_ADDRESS): Flower can revoke tasks and stop workers, and has no login.
ENTRYPOINT ["python", "-m", "conveyor.cli.flower"]

FROM base AS worker
COPY celery_app.py test-config.yml ./
COPY conveyor/ conveyor/

USER conveyor

# The launcher writes its (unique, SERVICE-<random>@host) node name here, and the healthcheck pings
# exactly that node: replicas on the host network share a hostname, so "any worker answers" would
# let a dead replica look healthy.
# The run directory is scratch space inside a container; /app itself stays read-only to the worker.
ENV CONVEYOR_NODE_FILE=/tmp/celery-node \
    CONVEYOR_RUN_DIR=/tmp/conveyor \
    CONVEYOR_CONFIG=/app/test-config.yml

HEALTHCHECK --interval=30s --timeout=20s --start-period=30s --retries=3 \
    CMD ["python", "-m", "conveyor.stack.healthcheck"]

# Exec form, and the launcher execs celery in place: the worker is PID 1, receives SIGTERM from
# `docker stop` itself and shuts down warm (finishes its running tasks) within stop_grace_period.
ENTRYPOINT ["python", "-m", "conveyor.stack.launcher"]
