"""The seam: the only subpackage that touches Celery's, kombu's or py-amqp's internals.

Everything here replaces or extends a private part of those libraries for speed or for a guarantee
they do not give; the rest of conveyor reaches them only through this package.
May import: conveyor.settings, conveyor.amqp, conveyor.errors, and any part of celery, kombu,
py-amqp and billiard.
"""
