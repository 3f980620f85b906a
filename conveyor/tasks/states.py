"""Where a task is: the one vocabulary of the dispatcher's report, the task records, the ledger and
the load test. The values are Celery's own state names where Celery has one (a user who knows
`SUCCESS` and `RETRY` reads ours without a glossary), plus the states only conveyor has."""

from __future__ import annotations

from enum import StrEnum


class TaskState(StrEnum):
    PENDING = "PENDING"  # no result yet (Celery's name for "unknown")
    QUEUED = "QUEUED"  # published and confirmed, not started
    RUNNING = "STARTED"
    RETRYING = "RETRY"  # failed an attempt; the next one is scheduled
    SUCCEEDED = "SUCCESS"
    FAILED = "FAILURE"
    DEAD_LETTERED = "DEAD_LETTERED"  # failed for good and kept, with its reason, in the dead-letter queue
    REVOKED = "REVOKED"
    DUPLICATE = "DUPLICATE"  # not sent: a task with the same unique key is queued or running
    REFUSED = "REFUSED"  # not sent: the broker nacked the task or returned it (no queue took it)

    @property
    def label(self) -> str:
        """The state in a sentence: "was queued", "is already succeeded"."""
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> TaskState:
        """A state by its value or its name, in any case (`SUCCESS`, `succeeded`, `dead_lettered`)."""
        for state in cls:
            if text.upper() in (state.value, state.name):
                return state
        raise ValueError(f"{text!r} is not a task state (one of {', '.join(s.name.lower() for s in cls)})")


ACTIVE = (TaskState.QUEUED, TaskState.RUNNING, TaskState.RETRYING)
# The two ends every task is promised: anything else at the end of a run is a task lost or stuck.
FINAL = (TaskState.SUCCEEDED, TaskState.DEAD_LETTERED)
RECORD_STATES = (*ACTIVE, TaskState.SUCCEEDED, TaskState.FAILED, TaskState.DEAD_LETTERED, TaskState.REVOKED,
                 TaskState.REFUSED)
