"""conveyor: two routed Celery queues on RabbitMQ, with backoff retries that end in a dead-letter queue."""

__version__ = "0.1.0"
