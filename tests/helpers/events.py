"""A test helper: record the Celery task events the workers send, in a background thread."""

from __future__ import annotations

import threading

from celery import Celery

from helpers import wait_for


class EventLog:
    def __init__(self, app: Celery) -> None:
        self.app = app
        self.events: list[dict] = []
        self._receiver = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
            # wakeup=True asks every worker for a heartbeat, which tells us we are consuming.
            self._receiver.capture(limit=None, timeout=None, wakeup=True)

    def __enter__(self) -> EventLog:
        self._thread.start()
        wait_for(lambda: any(e["type"] == "worker-heartbeat" for e in self.events), 20, "the first worker heartbeat")
        return self

    def __exit__(self, *exc) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout=5)

    def of(self, task_id: str, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("uuid") == task_id and e["type"] == kind]
