"""Celery's rpc:// result backend, declaring the reply queue once per channel instead of per task,
and publishing results without a confirm each where the config's `tuning.result_confirms` is off.

Before every task it sends, Celery's RPCBackend declares the caller's reply queue. kombu caches
declarations, but never that of an auto-delete queue (it may have been deleted since), so every
send_task pays a synchronous queue.declare round trip: measured, that halved the rate of a batch
publisher (docs/performance.md). The reply queue is deleted only when its last consumer leaves,
which is our own result consumer, alive until the app closes, so one declaration per channel is
enough; a channel opened after a reconnect is a new channel and declares again.

Results go out on connections that wait for the broker's confirm of every publish
(`confirm_publish`, app.py): a round trip per task in the worker, while the task message waits for
its late ack. With `result_confirms: false` they go out without confirms instead; the dead-letter
publishes keep theirs (conveyor/tasks/deadletter.py uses the app's pool).

With `tuning.fast_paths: false`, none of this: Celery's own meta, a declaration per task sent,
and every result through a pooled producer and kombu's public Producer.publish.

Uses of Celery/kombu/py-amqp internals (checked against celery 5.7.0, kombu 5.7.0, amqp 5.4.2):

- `celery.backends.rpc.RPCBackend` subclassed: `on_task_call` (the reply queue declared once per
  channel), `_to_result` (the meta without its two costly steps; a conformance test compares it with
  Celery's), `store_result` (this thread's held producer). Replaces: a queue.declare round trip per
  task sent, and a pool checkout plus kombu's retry wrapper per result.
- py-amqp's `channel.prepare_message`/`basic_publish(..., confirm_timeout=)` on the held producer,
  and `frames.write_reply` without result confirms. Replaces: kombu's Producer.publish per result.
- `kombu.pools.ProducerPool` for results without confirms. Replaces: the app's pool, whose
  connections confirm every publish.
- `kombu.serialization.registry._encoders["json"]` read, and `json.encoder.c_make_encoder` (the C
  encoder `json.dumps` builds per call) built once, with kombu's JSONEncoder's `default`: a result's
  meta encoded as kombu's json serializer encodes it, byte for byte, while kombu's own is the one
  registered. Replaces: a JSONEncoder and a C encoder built, and kombu's error wrapper entered, per
  result: kombu's dumps took 5.9 us for a no-op task's meta, the encoding itself 1.8 us (measured).
  A meta it cannot encode goes kombu's way, which raises kombu's EncodeError as before.

In a solo worker the held producer's writes are held with the consumer's (conveyor/seam/sockets.py):
a result is written before the ack of its task, and a confirm awaited writes them at once.

A confirm is awaited for at most `confirm_timeout_s` (a broker under an alarm stops confirming);
a publish that times out goes the retrying way below, on a new connection.

Each worker thread keeps a producer of its own and publishes a result straight on its channel.
Celery checks a producer out of a pool and publishes through kombu's retrying wrapper for every
result: 37 % of a solo worker's samples went to storing a no-op result, the pool checkout 8 % and
the wrapper most of the rest (docs/performance.md). Only a publish that fails goes the kombu way,
with a pooled producer and the retry policy, which reconnects; the held producer is dropped then.
Without result confirms, the frames go straight to the connection (conveyor/seam/frames.py), and what
the broker sent on that connection (a close, a connection.blocked) is read once a second instead of
before every result: a connection the broker has closed is noticed there, or by the next write.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from json.encoder import c_make_encoder, encode_basestring_ascii
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

from celery.backends.rpc import RPCBackend as CeleryRPCBackend
from kombu import Producer
from kombu.pools import ProducerPool
from kombu.serialization import dumps, registry
from kombu.utils import json as kombu_json

from conveyor.seam import frames, producer, sockets
from conveyor.settings.context import maybe_settings_of
from conveyor.seam.runtime_meta import RuntimeMeta, add_runtime

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often a result connection without confirms reads what the broker sent

# json.dumps's own arguments as kombu's serializer calls it (ensure_ascii, ", " and ": ", no sort,
# NaN allowed), without a circular-reference check: a circular meta recurses until Python's limit,
# and then goes kombu's way, which names it. Without markers the encoder keeps no state between calls.
_ENCODE_JSON = c_make_encoder(None, kombu_json.JSONEncoder().default, encode_basestring_ascii, None,
                              ": ", ", ", False, False, True) if c_make_encoder is not None else None


def _encoded(meta: dict[str, Any], serializer: str) -> tuple[str, str, Any]:
    """(content type, content encoding, body) of a result's meta, as kombu's dumps gives them."""
    codec = registry._encoders.get(serializer)
    if _ENCODE_JSON is not None and serializer == "json" and codec is not None and codec.encoder is kombu_json.dumps:
        try:
            return codec.content_type, codec.content_encoding, "".join(_ENCODE_JSON(meta, 0))
        except Exception:  # noqa: BLE001  (kombu's dumps below raises it as EncodeError, as Celery expects)
            pass
    return dumps(meta, serializer=serializer)


@dataclass
class _Held:
    """This thread's result producer; `pid` tells a forked child not to use its parent's."""

    pid: int
    producer: Any
    confirms: bool
    next_poll: float = 0.0


class RPCBackend(RuntimeMeta, CeleryRPCBackend):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._declared_on: weakref.WeakSet = weakref.WeakSet()
        self._unconfirmed: ProducerPool | None = None
        self._held = threading.local()  # .producer: a _Held

    @cached_property
    def _fast(self) -> bool:
        return producer.fast_paths(self.app)

    def on_task_call(self, producer, task_id) -> None:
        channel = producer.channel
        if not self._fast or channel not in self._declared_on:
            super().on_task_call(producer, task_id)
            self._declared_on.add(channel)

    @cached_property
    def _extended(self) -> bool:
        return bool(self.app.conf.result_extended)

    def _to_result(self, task_id, state, result, traceback, request):
        # Celery's meta for a finished task (its _get_result_meta, as rpc:// calls it: nothing
        # encoded twice), without its two costly steps per result (8 % of a no-op worker's CPU,
        # profiled; with result_extended, 9.5 % of a pool process's): the search through the
        # config's namespaces behind find_value_for_key("extended", "result"), read once here, and
        # app.now()'s conversions (the same instant, in the same zone). Other states go Celery's way.
        if not self._fast or state not in self.READY_STATES:
            return super()._to_result(task_id, state, result, traceback, request)
        meta = {"status": state, "result": self.encode_result(result, state), "traceback": traceback,
                "children": self.current_task_children(request),
                "date_done": datetime.now(self._timezone).isoformat()}
        if request and getattr(request, "group", None):
            meta["group_id"] = request.group
        if request and getattr(request, "parent_id", None):
            meta["parent_id"] = request.parent_id
        if self._extended and request:
            delivery_info = getattr(request, "delivery_info", None)
            meta.update({"name": getattr(request, "task", None), "args": getattr(request, "args", None),
                         "kwargs": getattr(request, "kwargs", None), "worker": getattr(request, "hostname", None),
                         "retries": getattr(request, "retries", None),
                         "queue": delivery_info.get("routing_key") if delivery_info else None})
            if getattr(request, "stamps", None):
                meta["stamped_headers"] = request.stamped_headers
                meta.update({k: v for k, v in request.stamps.items() if k in (request.stamped_headers or ())})
        meta["task_id"] = task_id
        return add_runtime(meta, request)

    @cached_property
    def _timezone(self) -> Any:
        # The app's, read once: Celery's cached_property on the app still runs its getter every time.
        return self.app.timezone

    def _confirms(self) -> bool:
        config = (maybe_settings_of(self.app) and maybe_settings_of(self.app).config)
        return config is None or config.tuning.result_confirms

    def _new_connection(self):  # not `_connection`: Celery's RPCBackend has an attribute of that name
        """A new connection for results: confirmed per publish (the app's transport options) unless
        `tuning.result_confirms` is off."""
        return self.app.connection_for_write(transport_options={} if self._confirms() else {"confirm_publish": False})

    def _producers(self) -> ProducerPool:
        if self._confirms():
            return self.app.amqp.producer_pool
        if self._unconfirmed is None:
            limit = self.app.pool.limit
            self._unconfirmed = ProducerPool(self._new_connection().Pool(limit=limit), limit=limit, Producer=self.app.amqp.Producer)
        return self._unconfirmed

    def store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        # Celery's own, on this thread's producer; through the pool and kombu's retries if that fails
        # (or always, with tuning.fast_paths off).
        routing_key, correlation_id = self.destination_for(task_id, request)
        if not routing_key:
            return None
        meta = self._to_result(task_id, state, result, traceback, request)
        if self._fast:
            # Encoded first, so that a result that cannot be encoded fails as in Celery (EncodeError).
            content_type, content_encoding, body = _encoded(meta, self.serializer)
            try:
                self._publish_held(body, content_type, content_encoding, routing_key, correlation_id)
                return result
            except Exception as exc:  # noqa: BLE001  (whatever broke, the retrying path below decides)
                log.info("Publishing the result of task %s failed (%r); publishing it again with retries.", task_id, exc)
                self._drop_held()
        # Celery's way (and without the fast paths, the only one): a pooled producer, kombu's retries.
        with self._producers().acquire(block=True) as producer:
            producer.publish(
                meta, exchange=self.exchange, routing_key=routing_key, correlation_id=correlation_id,
                serializer=self.serializer, retry=True, retry_policy=self.retry_policy,
                declare=self.on_reply_declare(task_id), delivery_mode=self.delivery_mode,
            )
        return result

    def _publish_held(self, body: bytes, content_type: str, content_encoding: str, routing_key: str,
                      correlation_id: str) -> None:
        held = getattr(self._held, "producer", None)
        if held is None or held.pid != os.getpid():
            confirms = self._confirms()
            held = self._held.producer = _Held(os.getpid(), Producer(self._new_connection(), auto_declare=False), confirms)
            transport = getattr(held.producer.channel.connection, "transport", None)
            if sockets.CORK.active and isinstance(transport, sockets.BufferedTransport):
                sockets.CORK.cork(transport, sockets.Cork.RESULTS)  # a solo worker's: written before its acks
        channel = held.producer.channel
        if held.confirms:  # basic_publish waits for the confirm: for at most confirm_timeout_s
            # As kombu's Producer.publish builds it: no headers, priority 0, these two properties.
            message = channel.prepare_message(body, 0, content_type, content_encoding, {},
                                              {"correlation_id": correlation_id, "delivery_mode": self.delivery_mode})
            deadline_s = producer.confirm_timeout_s(self.app)
            channel.basic_publish(message, exchange=self.exchange.name, routing_key=routing_key,
                                  timeout=deadline_s, confirm_timeout=deadline_s)
            return
        now = time.monotonic()
        if now >= held.next_poll:
            held.next_poll = now + POLL_S
            try:
                channel.connection.drain_events(timeout=0)
            except socket.timeout:
                pass
        frames.write_reply(channel, frames.publish_args(self.exchange.name, routing_key), body, content_type,
                           content_encoding, self.delivery_mode, correlation_id)

    def _drop_held(self) -> None:
        held = getattr(self._held, "producer", None)
        self._held.producer = None
        if held is not None and held.pid == os.getpid():
            try:
                held.producer.connection.close()
            except Exception:  # noqa: BLE001  (a broken connection may fail to close; it is dropped either way)
                log.debug("Closing a broken result connection failed.", exc_info=True)
