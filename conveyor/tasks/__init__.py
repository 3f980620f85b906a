"""Tasks: their states (states.py), the base class every task has (base.py: escalating time limits,
retries announced on a signal), the simulated types and the registry of the config's own, the
retry policy handed to Celery's autoretry, the dead-letter queue (how a task that failed for
good gets there, and how to read and requeue it), and how an attempt the pool lost (a hard
timeout, a dead pool process) ends (lost.py).

May import: conveyor.seam, conveyor.amqp, conveyor.settings and the root modules; not
conveyor.lifecycle, which is above it (it receives the signals this layer sends).
"""
