"""Tasks: the task definitions, the retry policy handed to Celery's autoretry, and the dead-letter
queue (how a task that failed for good gets there, and how to read and requeue it).

May import: conveyor.lifecycle's task base class, conveyor.seam, conveyor.amqp, conveyor.settings,
conveyor.errors.
"""
