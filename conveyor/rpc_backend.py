"""Celery's rpc:// result backend, declaring the reply queue once per channel instead of per task,
and publishing results without a confirm each where the config's `tuning.result_confirms` is off.

Before every task it sends, Celery's RPCBackend declares the caller's reply queue. kombu caches
declarations, but never that of an auto-delete queue (it may have been deleted since), so every
send_task pays a synchronous queue.declare round trip: measured, that halved the rate of a batch
publisher (docs/performance.md). The reply queue is deleted only when its last consumer leaves,
which is our own result consumer, alive until the app closes, so one declaration per channel is
enough; a channel opened after a reconnect is a new channel and declares again.

Results go through the app's producer pool, whose connections wait for the broker's confirm of every
publish (`confirm_publish`, app.py): a round trip per task in the worker, while the task message
waits for its late ack. With `result_confirms: false` they go through a pool of their own without
confirms instead; the dead-letter publishes keep theirs (conveyor/deadletter.py uses the app's pool).
"""

from __future__ import annotations

import weakref

from celery.backends.rpc import RPCBackend as CeleryRPCBackend
from kombu.pools import ProducerPool


class RPCBackend(CeleryRPCBackend):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._declared_on: weakref.WeakSet = weakref.WeakSet()
        self._unconfirmed: ProducerPool | None = None

    def on_task_call(self, producer, task_id) -> None:
        channel = producer.channel
        if channel not in self._declared_on:
            super().on_task_call(producer, task_id)
            self._declared_on.add(channel)

    def _producers(self) -> ProducerPool:
        config = getattr(self.app, "conveyor_config", None)
        if config is None or config.tuning.result_confirms:
            return self.app.amqp.producer_pool
        if self._unconfirmed is None:
            connection = self.app.connection_for_write(transport_options={"confirm_publish": False})
            limit = self.app.pool.limit
            self._unconfirmed = ProducerPool(connection.Pool(limit=limit), limit=limit, Producer=self.app.amqp.Producer)
        return self._unconfirmed

    def store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        # Celery's own, with the producer pool chosen above.
        routing_key, correlation_id = self.destination_for(task_id, request)
        if not routing_key:
            return None
        with self._producers().acquire(block=True) as producer:
            producer.publish(
                self._to_result(task_id, state, result, traceback, request),
                exchange=self.exchange, routing_key=routing_key, correlation_id=correlation_id,
                serializer=self.serializer, retry=True, retry_policy=self.retry_policy,
                declare=self.on_reply_declare(task_id), delivery_mode=self.delivery_mode,
            )
        return result
