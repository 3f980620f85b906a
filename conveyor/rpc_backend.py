"""Celery's rpc:// result backend, declaring the reply queue once per channel instead of per task.

Before every task it sends, Celery's RPCBackend declares the caller's reply queue. kombu caches
declarations, but never that of an auto-delete queue (it may have been deleted since), so every
send_task pays a synchronous queue.declare round trip: measured, that halved the rate of a batch
publisher (docs/performance.md). The reply queue is deleted only when its last consumer leaves,
which is our own result consumer, alive until the app closes, so one declaration per channel is
enough; a channel opened after a reconnect is a new channel and declares again.
"""

from __future__ import annotations

import weakref

from celery.backends.rpc import RPCBackend as CeleryRPCBackend


class RPCBackend(CeleryRPCBackend):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._declared_on: weakref.WeakSet = weakref.WeakSet()

    def on_task_call(self, producer, task_id) -> None:
        channel = producer.channel
        if channel not in self._declared_on:
            super().on_task_call(producer, task_id)
            self._declared_on.add(channel)
