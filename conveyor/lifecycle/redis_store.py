"""Records in Redis, shared by every worker that reaches it (other hosts, containers).

Keys, under `conveyor:<vhost>:`: `task:<id>` a hash of the record's fields, `task:<id>:history` a
list of JSON events, `tasks` a sorted set of ids by first write (for listing by time), and
`unique:<key>` the id of the task holding a unique key, `tallies` a hash of the task counters
(lifecycle/tallies.py), `samples:<name>` a list of recent values per sample key (its SAMPLES_KEPT
latest) and `samples` the set of those names. A transition is one MULTI/EXEC pipeline;
claiming a unique key is one Lua script, so that check-and-set is atomic across dispatchers.
Every key expires `ttl_s` after its last write.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from conveyor.tasks.states import ACTIVE, TaskState
from conveyor.lifecycle.records import SAMPLES_KEPT, Event, Record, Store, Write, from_strings, now, unavailable

log = logging.getLogger(__name__)

# KEYS[1] the unique key; ARGV: new task id, ttl, record key prefix, unique key, task name, now.
# Whoever holds the key keeps it while its record is active; a finished, failed or expired holder
# (or none) gives the key to the new task, whose record is created in the same step so that a
# concurrent claim sees it active.
CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder then
  local status = redis.call('HGET', ARGV[3] .. holder, 'status')
  if status == '%s' or status == '%s' or status == '%s' then return holder end
end
local record = ARGV[3] .. ARGV[1]
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('HSET', record, 'status', '%s', 'unique_key', ARGV[4], 'name', ARGV[5], 'updated_at', ARGV[6])
redis.call('EXPIRE', record, ARGV[2])
return ARGV[1]
""" % (*ACTIVE, TaskState.QUEUED)


class RedisStore(Store):
    def __init__(self, url: str, namespace: str, ttl_s: int, timeout_s: float = 2.0) -> None:
        super().__init__(ttl_s)
        self.url = url
        self.prefix = f"conveyor:{namespace}:"
        # Short timeouts and no retries: a worker writes before and after every run, and a store that
        # hangs must not hang it; redis-py's default Retry (3 more attempts) multiplied the timeout.
        # Whatever fails is the breaker's to handle (lifecycle/guarded.py).
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                          retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
                                          decode_responses=True, health_check_interval=30)
        self._claim = self.redis.register_script(CLAIM)

    def _key(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    def _run(self, what, *args):
        try:
            return what(*args)
        except redis.RedisError as exc:
            raise unavailable(self.url, exc) from None

    def transition(self, task_id: str, status: str, *, attempt: int | None = None, detail: str = "",
                   count_attempt: bool = False, at: float | None = None, **values: Any) -> None:
        def write() -> None:
            pipe = self.redis.pipeline(transaction=True)
            self._queue_transition(pipe, task_id, status, attempt, detail, count_attempt, at, values)
            pipe.execute()

        self._run(write)

    def _queue_transition(self, pipe: Any, task_id: str, status: str, attempt: int | None, detail: str,
                          count_attempt: bool, at: float | None, values: dict[str, Any]) -> None:
        at = now() if at is None else at
        key = self._key(task_id)
        values = {"status": status, "updated_at": at, **values}
        event = Event(at, status, attempt, values.get("worker"), detail)
        pipe.hset(key, mapping={k: v for k, v in values.items() if v is not None})
        cleared = [k for k, v in values.items() if v is None]
        if cleared:
            pipe.hdel(key, *cleared)
        if count_attempt:
            pipe.hincrby(key, "attempts", 1)
        pipe.rpush(f"{key}:history", json.dumps(asdict(event)))
        pipe.expire(key, self.ttl_s)
        pipe.expire(f"{key}:history", self.ttl_s)
        pipe.zadd(f"{self.prefix}tasks", {task_id: at}, nx=True)
        if status == TaskState.QUEUED and self.sweep_due(at):  # forget index entries whose records have expired
            pipe.zremrangebyscore(f"{self.prefix}tasks", "-inf", at - self.ttl_s)

    def write_many(self, writes: Sequence[Write], counts: Mapping[str, float],
                   samples: Mapping[str, Sequence[float]]) -> None:
        """One MULTI/EXEC for the batch's transitions and tallies; a note (which reads the record's
        status first) is written on its own, after the transitions before it."""
        def write() -> None:
            pipe = self.redis.pipeline(transaction=True)
            for item in writes:
                if item.method == "note":
                    pipe.execute()
                    self.note(item.task_id, *item.args)
                    continue
                status, kwargs = item.args[0], dict(item.kwargs)
                self._queue_transition(pipe, item.task_id, status, kwargs.pop("attempt", None),
                                       kwargs.pop("detail", ""), kwargs.pop("count_attempt", False), item.at, kwargs)
            self._queue_tallies(pipe, counts, samples)
            pipe.execute()

        self._run(write)

    def add_tallies(self, counts: Mapping[str, float], samples: Mapping[str, Sequence[float]]) -> None:
        def write() -> None:
            pipe = self.redis.pipeline(transaction=True)
            self._queue_tallies(pipe, counts, samples)
            pipe.execute()

        self._run(write)

    def _queue_tallies(self, pipe: Any, counts: Mapping[str, float], samples: Mapping[str, Sequence[float]]) -> None:
        if counts:
            key = f"{self.prefix}tallies"
            for name, by in counts.items():
                pipe.hincrbyfloat(key, name, by)
            pipe.expire(key, self.ttl_s)
        for name, values in samples.items():
            key = f"{self.prefix}samples:{name}"
            pipe.rpush(key, *values)
            pipe.ltrim(key, -SAMPLES_KEPT, -1)
            pipe.expire(key, self.ttl_s)
            pipe.sadd(f"{self.prefix}samples", name)
            pipe.expire(f"{self.prefix}samples", self.ttl_s)

    def tallies(self) -> tuple[dict[str, float], dict[str, list[float]]]:
        def read() -> tuple[dict[str, float], dict[str, list[float]]]:
            counts = self.redis.hgetall(f"{self.prefix}tallies")
            names = sorted(self.redis.smembers(f"{self.prefix}samples"))
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.lrange(f"{self.prefix}samples:{name}", 0, -1)
            return ({k: float(v) for k, v in counts.items()},
                    {name: [float(v) for v in values] for name, values in zip(names, pipe.execute()) if values})

        return self._run(read)

    def note(self, task_id: str, detail: str) -> None:
        key = self._key(task_id)

        def write() -> None:
            status = self.redis.hget(key, "status")
            if status is not None:
                self.redis.rpush(f"{key}:history", json.dumps(asdict(Event(now(), status, detail=detail))))

        self._run(write)

    def get(self, task_id: str) -> Record | None:
        key = self._key(task_id)

        def read():
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(key)
            pipe.lrange(f"{key}:history", 0, -1)
            return pipe.execute()

        values, history = self._run(read)
        if not values:
            return None
        record = from_strings(task_id, values)
        record.history = [Event(**json.loads(item)) for item in history]
        return record

    def query(self, statuses: tuple[str, ...] = (), name: str | None = None, since: float | None = None,
              limit: int = 50) -> list[Record]:
        index = f"{self.prefix}tasks"
        found: list[Record] = []
        start, page = 0, 500
        # Newest first, a page at a time, filtering here: statuses change too often to keep an index per status.
        while len(found) < limit:
            ids = self._run(self.redis.zrevrangebyscore, index, "+inf", since if since is not None else "-inf",
                            start, page)
            if not ids:
                break
            pipe = self.redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.hgetall(self._key(task_id))
            for task_id, values in zip(ids, self._run(pipe.execute)):
                record = from_strings(task_id, values) if values else None
                if record and (not statuses or record.status in statuses) and (not name or record.name == name):
                    found.append(record)
            start += page
        return found[:limit]

    def claim(self, unique_key: str, task_id: str, name: str) -> str:
        return self._run(self._claim, [f"{self.prefix}unique:{unique_key}"],
                         [task_id, self.ttl_s, f"{self.prefix}task:", unique_key, name, now()])

    def is_revoked(self, task_id: str) -> bool:
        return bool(self._run(self.redis.hexists, self._key(task_id), "revoked_at"))

    def clear(self) -> int:
        """Delete every key of this namespace (a stack's or a test session's records); returns how many."""
        keys = self._run(lambda: list(self.redis.scan_iter(f"{self.prefix}*", count=1000)))
        for start in range(0, len(keys), 1000):
            self._run(self.redis.delete, *keys[start:start + 1000])
        return len(keys)

    def close(self) -> None:
        self.redis.close()
