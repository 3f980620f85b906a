"""The seam: the only subpackage that touches Celery's, kombu's or py-amqp's internals.

Everything here replaces or extends a private part of those libraries for speed or for a guarantee
they do not give; the rest of conveyor reaches them only through this package.
Modules, each listing its uses of internals in its docstring: `publisher` (the one way every task
is published: async confirms, mandatory task messages, deadlines), `collector` (the one way results
are collected), `frames` (basic.publish frames by hand), `rpc_backend`, `file_backend`, `consumer`.
Every fast path is switched off by `tuning.fast_paths: false`.
May import: conveyor.settings, conveyor.amqp, conveyor.errors, and any part of celery, kombu,
py-amqp and billiard.
"""
