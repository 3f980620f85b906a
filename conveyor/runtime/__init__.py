"""The Celery application, wired once from the settings: tasks, routes, the seam's consumer and
backends, and the lifecycle's signal receivers.

May import: every layer below it (tasks, lifecycle, seam, amqp, settings).
"""
