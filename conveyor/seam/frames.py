"""Publishing on a py-amqp channel without `channel.basic_publish`'s per-message extras.

py-amqp's `basic_publish` does three things per message besides writing it: it encodes the same
basic.publish arguments (exchange, routing key, flags) again, enters a socket-timeout context, and,
because kombu announces the `connection.blocked` capability, makes a non-blocking read of the
socket to take in a connection.blocked notice. For a sender of thousands of small messages a second
that was a third of each publish (profiled: docs/performance.md). Where messages are published in
bulk without a confirm awaited per message (conveyor/seam/publisher.py's batches, results with
`tuning.result_confirms: false`), `write_publish` writes the frames straight to the connection's
frame writer, with the arguments encoded once per destination; the caller reads the socket itself
often enough (the batch publisher at every flush, the result publisher once a second).

Uses of py-amqp internals (checked against amqp 5.4.2, kombu 5.7.0):

- `amqp.spec.Basic.Publish` and `amqp.serialization.dumps("Bssbb", ...)`: the method frame's
  arguments, encoded as `Channel._basic_publish` encodes them. Replaces: that encoding per message.
- `Connection.frame_writer(1, channel_id, method, args, message)`: the writer `send_method` uses.
  Replaces: `channel.basic_publish`'s socket-timeout context and non-blocking read per message.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from amqp import spec
from amqp.serialization import dumps


@lru_cache(maxsize=256)  # one per destination: a worker sends results to each caller's reply queue
def publish_args(exchange: str, routing_key: str, mandatory: bool = False) -> bytes:
    """basic.publish's arguments, as py-amqp encodes them: ticket 0, `mandatory` (the broker returns
    a message no queue takes: task messages), not immediate."""
    return dumps("Bssbb", (0, exchange, routing_key, mandatory, False))


def write_publish(channel: Any, args: bytes, message: Any) -> None:
    """Publish `message` (an amqp.Message) with `args` from publish_args, as basic_publish would."""
    channel.connection.frame_writer(1, channel.channel_id, spec.Basic.Publish, args, message)
