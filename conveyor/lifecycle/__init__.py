"""The task lifecycle: a record per task, unique tasks, escalating time limits, durable revokes.

Records are written by the processes where transitions happen, through Celery's signals
(signals.py), into a store every process reaches: Redis when RECORDS_URL names it (shared by workers on any
host and in containers), else a SQLite file in the run directory (records.py, environment.records_url),
in batches off the task's path behind a circuit breaker (guarded.py). The task tallies (tallies.py:
the counts and histograms `make monitor` shows) are kept in the same store, in the same batches.
The operator's commands are `python -m conveyor tasks ...` and `python -m conveyor dlq ...`
(conveyor/__main__.py); docs/tasks.md is the reference.
May import: conveyor.tasks, conveyor.seam, conveyor.amqp, conveyor.settings and the root modules.
"""
