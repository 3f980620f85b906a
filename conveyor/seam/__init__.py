"""The seam: the only subpackage that touches Celery's, kombu's or py-amqp's internals.

Everything here replaces or extends a private part of those libraries for speed or for a guarantee
they do not give; the rest of conveyor reaches them only through this package.
Modules, each listing in its docstring every internal it uses, what that replaces, and the versions
checked (celery 5.7.0, kombu 5.7.0, amqp 5.4.2, as requirements.txt pins them):

- publisher: the one way many tasks are published (dispatch.py, the load tester, chaos): async
  confirms, mandatory task messages, returns refused, deadlines, gathered frames;
- producer: the producer class Celery publishes single messages with (retries, dead-letters),
  mandatory with confirm deadlines, and the transport whose connections report connection.blocked;
- events: the worker's event dispatcher, which never waits in the event loop (no confirm, a write
  deadline, events held while the broker blocks);
- collector: the one way results are collected (dispatch.py and the load tester);
- frames: basic.publish frames written by hand, a result's whole message among them; rpc_backend,
  file_backend, runtime_meta: the result backends and the run time a user task's result carries;
- consumer, intake, inbound: what a worker does with a message before Celery runs it (bounded
  decoding, validation, dead-lettering what it cannot run); request: the durable revoke check, and
  the decoded body handed to a pool in the worker's own process; trace: the tracer's result repr;
  sockets: buffered reads, and a solo worker's writes held for a burst.

Every fast path is switched off by one setting, `tuning.fast_paths: false` in the config or
CONVEYOR_FAST_PATHS=off in the environment (`make test` runs the end-to-end tests both ways).
May import: conveyor.settings, conveyor.amqp, conveyor.errors, and any part of celery, kombu,
py-amqp and billiard.
"""
