"""Running a load test: send the plan's jobs at the asked pace and collect every result, in one thread.

Each turn of the loop publishes what is due (a batch at most), takes in the broker's confirms of
earlier batches (a batch may be unconfirmed while the next goes out), then waits for results until
the next send is due. Three things hold the sender back: the target rate (open loop),
the number of jobs in flight (closed loop, `concurrency`), and backpressure (a queue holding more
ready messages than `max_queue_depth`). One deadline bounds the whole run; whatever has not finished
by then is reported pending, never waited on.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any

from celery import Celery, chain

from conveyor.tasks import deadletter
from conveyor.dispatch.dispatcher import TaskOutcome, fill_outcome
from conveyor.loadtest.metrics import Record, RunStats, Stage
from conveyor.seam.collector import IDLE_WAIT_S, collector_for
from conveyor.seam.publisher import Publisher, kwargs_repr
from conveyor.tasks.states import TaskState
from conveyor.loadtest.scenario import Job, Plan, Scenario

log = logging.getLogger(__name__)

TICK_S = 0.25  # how often the progress callback runs
DEPTH_CHECK_S = 0.1  # how often queue depths are read for backpressure


@contextmanager
def young_collections_only() -> Iterator[None]:
    """Python's cyclic garbage collector without its full passes meanwhile (they come after).

    A run's records are long-lived objects by the hundred thousand, and each full pass walks all of
    them, with the sender and the result reader stopped: the results read after that stall carry it
    as latency the tasks never had. Measured in `make bench`'s sequence (its half-saturation run,
    10 s at about 1 500 no-op jobs/s, after the runs before it in the same process): one full pass
    of 64 ms, and a p99 of 22.4 ms, max 69.8 ms; without full passes, p99 18.6 ms, max 36.8 ms.
    The young generations are still collected as usual, so cycles made during the run are freed as
    before; what reaches the oldest generation waits for the first full pass after the run.
    """
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], 2**31 - 1)  # the oldest generation's count is never reached
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


@dataclass
class Options:
    timeout_s: float
    duration_s: float | None = None  # send for this long instead of a fixed number of jobs
    rate_per_s: float | None = None  # open loop at this rate; None: closed loop
    concurrency: int = 0  # jobs in flight at most (0: no bound)
    max_queue_depth: int | None = None  # overrides the scenario's
    batch_size: int | None = None  # overrides the scenario's


@dataclass
class Progress:
    elapsed_s: float
    planned: int | None
    sent: int
    done: int
    failed: int
    in_flight: int
    rate_per_s: float  # results per second over the last few seconds
    paused: bool


@dataclass
class Outcome:
    records: list[Record]
    stats: RunStats
    idle_queues: list[str]  # queues no worker consumed from when the run began


class Runner:
    def __init__(self, app: Celery, scenario: Scenario, plan: Plan, options: Options,
                 on_tick: Callable[[Progress], None] | None = None) -> None:
        self.app, self.scenario, self.plan, self.options = app, scenario, plan, options
        self.on_tick = on_tick
        self.max_depth = options.max_queue_depth or scenario.max_queue_depth
        self.batch_size = options.batch_size or scenario.batch_size
        self.rate = options.rate_per_s if options.rate_per_s is not None else scenario.rate_per_s
        self.records: list[Record] = []
        self._where: dict[str, tuple[Record, int]] = {}
        self._done = 0
        self._failed = 0
        self._recent: deque[float] = deque()

    # --- sending ---------------------------------------------------------------------------
    def _send(self, job: Job, pub: Publisher) -> Record:
        record = Record(job.index, job.type, time.time(), [])
        if len(job.steps) == 1:
            name, kwargs, args = job.steps[0]
            ids = [pub.send_task(name, kwargs, kwargs_repr(kwargs), args=tuple(args or ()))]
        else:
            # A Celery chain: each stage's result becomes the next stage's first argument.
            stages = chain(*(self.app.signature(name, args=args, kwargs=kwargs) for name, kwargs, args in job.steps))
            last = pub.send_signature(stages)
            ids = []
            while last is not None:
                ids.append(last.id)
                last = last.parent
            ids.reverse()
        for i, ((name, *_), task_id) in enumerate(zip(job.steps, ids)):
            record.stages.append(Stage(name, task_id))
            self._where[task_id] = (record, i)
            self.watcher.watch(task_id)
        return record

    def _on_result(self, task_id: str, status: str, value: Any, meta: dict[str, Any] | None = None) -> None:
        found = self._where.pop(task_id, None)
        if found is None:
            return
        record, i = found
        was_done = record.done
        stage = record.stages[i]
        outcome = TaskOutcome(stage.task, stage.id, self.scenario.queue_of(stage.task))
        fill_outcome(outcome, {**(meta or {}), "status": status, "result": value})
        stage.state, stage.retries, stage.worker, stage.error = outcome.state, outcome.retries, outcome.worker, outcome.error
        stage.execution_s = outcome.execution_time_s
        stage.received_at = time.time()
        # The simulated tasks report their start in their result; a user task's is in the metadata.
        stage.started_at = value.get("started_at") if isinstance(value, dict) and "started_at" in value else (meta or {}).get("started_at")
        if record.done and not was_done:
            self._done += 1
            self._recent.append(stage.received_at)
            if record.state != TaskState.SUCCEEDED:
                self._failed += 1

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> Outcome:
        with young_collections_only():
            return self._run()

    def _run(self) -> Outcome:
        deadletter.declare(self.app)
        opts = self.options
        start = time.time()
        deadline = start + opts.timeout_s
        send_until = start + opts.duration_s if opts.duration_s else None
        jobs = iter(self.plan)
        exhausted = False
        sent = refused = 0
        paused_since: float | None = None
        paused_s = send_s = send_cpu_s = 0.0
        depth_checked, headroom = 0.0, 0
        last_tick = 0.0
        with Publisher(self.app) as pub, closing(collector_for(self.app, self._on_result, pub.connection)) as watcher:
            self.watcher = watcher
            # For the report; load_test.py's stack session has already told the user at the start.
            idle = [q for q in self.scenario.queues if pub.consumers(q) == 0]
            while True:
                now = time.time()
                if now >= deadline:
                    break
                sending = not exhausted and (send_until is None or now < send_until)
                if not sending and sent - refused == self._done:
                    break
                allowed = 0
                if sending:
                    allowed = self.batch_size
                    if self.rate:
                        allowed = min(allowed, int((now - start) * self.rate) + 1 - sent)
                    if opts.concurrency:  # a job is in flight from its publish, confirmed or not
                        allowed = min(allowed, opts.concurrency - (sent - refused - self._done))
                    if allowed > 0 and now - depth_checked >= DEPTH_CHECK_S:
                        # Room left under the bound in the deepest queue: a batch never overshoots it.
                        depth_checked = now
                        headroom = self.max_depth - max(pub.queue_depth(q) for q in self.scenario.queues)
                        if headroom <= 0 and paused_since is None:
                            paused_since = now
                            log.info("A queue holds %d messages or more; pausing the sender.", self.max_depth)
                        elif headroom > 0 and paused_since is not None:
                            paused_s += now - paused_since
                            paused_since = None
                    allowed = min(allowed, headroom)
                published = 0
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(max(0, allowed)):
                    job = next(jobs, None)
                    if job is None:
                        exhausted = True
                        break
                    pub.publish(lambda _producer, job=job: self._send(job, pub))
                    published += 1
                sent += published
                headroom -= published
                # One batch may stay unconfirmed while there is more to send; none once there is not.
                more = not exhausted and (send_until is None or time.time() < send_until)
                refused += self._settle(*pub.flush(in_flight=self.batch_size if more else 0))
                send_s += time.perf_counter() - t0
                send_cpu_s += time.process_time() - c0
                # Full batch sent and more due: look at results only briefly, then send on.
                if published and published == self.batch_size:
                    wait = 0.0
                elif self.rate and sending and headroom > 0:
                    wait = min(IDLE_WAIT_S, max(0.0, start + (sent + 1) / self.rate - time.time()))
                else:
                    wait = IDLE_WAIT_S
                self.watcher.wait(min(wait, max(0.0, deadline - time.time())))
                if self.on_tick and time.time() - last_tick >= TICK_S:
                    last_tick = time.time()
                    self.on_tick(self._progress(start, paused_since is not None))
            end = time.time()
            refused += self._settle(*pub.flush())  # at the deadline: what is still to be confirmed
            if paused_since is not None:
                paused_s += end - paused_since
            depths = {q: pub.queue_depth(q) for q in self.scenario.queues}
        not_sent = (self.plan.total - sent) if self.plan.total is not None else 0
        pending = sum(r.state == TaskState.PENDING for r in self.records)
        stats = RunStats(
            planned=self.plan.total, started_at=start, ended_at=end, timed_out=bool(pending or not_sent),
            not_sent=not_sent, refused=refused, backpressure_s=paused_s, send_s=send_s, send_cpu_s=send_cpu_s,
            rate_per_s=self.rate, concurrency=opts.concurrency, queues=depths,
        )
        if stats.timed_out:
            log.warning("The run ended at its %.0f s timeout with %d job(s) pending and %d not sent.",
                        opts.timeout_s, pending, not_sent)
        return Outcome(self.records, stats, idle)

    def _settle(self, confirmed: list[Record], refused: list[Record]) -> int:
        """Count confirmed jobs as sent; forget refused ones, which the broker never stored (no result
        will come). Returns how many were refused."""
        self.records.extend(confirmed)
        for record in refused:
            for stage in record.stages:
                self._where.pop(stage.id, None)
        return len(refused)

    def _progress(self, start: float, paused: bool) -> Progress:
        now = time.time()
        while self._recent and self._recent[0] < now - 5:
            self._recent.popleft()
        span = min(5.0, now - start) or 1.0
        return Progress(now - start, self.plan.total, len(self.records), self._done, self._failed,
                        len(self.records) - self._done, len(self._recent) / span, paused)

