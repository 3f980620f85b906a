"""Tasks: the task definitions, the retry policy handed to Celery's autoretry, the dead-letter
queue (how a task that failed for good gets there, and how to read and requeue it), and how an
attempt the pool lost (a hard timeout, a dead pool process) ends (lost.py).

May import: conveyor.lifecycle's task base class, conveyor.seam, conveyor.amqp, conveyor.settings,
conveyor.errors.
"""
