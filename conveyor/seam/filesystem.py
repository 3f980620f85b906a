"""kombu's filesystem transport (the embedded broker) with claim-then-delete delivery.

kombu's `Channel._get` moves a message file out of the queue folder and deletes it as it reads it,
so a worker killed mid-task (acks_late notwithstanding) has taken the message with it. Here a
fetched message is *claimed* instead: renamed (atomically: among consumers racing for one file,
one wins) into an in-flight folder of the consuming process, `<broker>/inflight/<pid>-<start>/`,
and deleted only when it is acknowledged. A requeue (basic_reject with requeue, or the restore of
unacknowledged messages at a warm shutdown) writes it back to the queue first. When a consumer's
process is gone (no process with its pid and start time), the next consumer that polls (at most
once a second) moves what it had claimed back to the queue folder, under the same file names, so
the messages keep their place in the queue's order and run again: at least once, as on RabbitMQ.

What it still does not give (README, docs/reliability.md): publisher confirms (a publish returns
once the file is written, not fsynced), dead-lettering by the broker (a message rejected without
requeue is deleted; conveyor's worker publishes its dead letters itself, so that path is the
consumer's last resort only), queue length limits, and more than one machine.

Seam notes:
- uses: `kombu.transport.filesystem.Channel` (its `_put`, folders and transport options, `lock`,
  `unlock`), the virtual channel's QoS (`qos.get`, `basic_ack`, `basic_reject`, `_restore`) and
  `Message._raw` (the payload `_get` returned, where the claimed file's path travels).
- replaces: `Channel._get`; extends `basic_ack`, `basic_reject` and `_restore` to delete the claimed
  file, and `basic_consume`/`basic_get` to delete at once what is consumed without acks (Celery's
  control and event queues, as kombu does); `store_processed`/`processed_folder` are not used.
- replaces `Channel._queue_bind`, `Channel.get_table` and the table half of `Channel._delete` (with
  `_exchange_file`, `control_folder` and kombu's `exchange_queue_t`; the virtual channel's `_delete`
  is called past kombu's filesystem one): kombu creates a fanout exchange's table with `open("wb")`
  after finding it missing, so two workers starting together both truncate it and the last write wins:
  the other never gets a broadcast (a ping, a revoke; seen in CI as a worker that never answered).
  Here the table is created without truncation and read and rewritten under the lock, by binds and
  deletes alike, and a table still empty (created, not yet written) reads as no bindings.
- versions checked: kombu 5.7.0.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

log = logging.getLogger(__name__)

CLAIM_KEY = "conveyor_claimed_file"  # in the payload, beside kombu's keys; never written to a file
RESCUE_EVERY_S = 1.0


def owner_tag(pid: int) -> str:
    """`<pid>-<start time>`: a pid alone may be reused by another process after the first died."""
    return f"{pid}-{_start_time(pid)}"


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(tag: str) -> bool:
    pid, _, start = tag.partition("-")
    if not pid.isdigit():
        return True  # not one of ours: leave it alone
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in ("Z", "X") and fields[19] == start


def _bindings(raw: bytes) -> list[Any]:
    """A fanout table's bindings; a table created and not yet written has none."""
    return [filesystem.exchange_queue_t(*q) for q in loads(bytes_to_str(raw))] if raw.strip() else []


def _unlink(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:  # restored and deleted already
            pass


class Channel(filesystem.Channel):
    _rescued_at = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._no_ack_queues: set[str] = set()  # consumed without acks (Celery's control and events): never claimed

    # --- fanout tables: read and rewritten under their lock, created without truncation -------------
    def get_table(self, exchange: str) -> list[Any]:
        file = self._exchange_file(exchange)
        try:
            with file.open("rb") as f_obj:
                filesystem.lock(f_obj, filesystem.LOCK_SH)  # a binder holds LOCK_EX while it rewrites
                try:
                    return _bindings(f_obj.read())
                finally:
                    filesystem.unlock(f_obj)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")

        def add(bindings: list[Any]) -> bool:
            if binding in bindings:
                return False
            bindings.insert(0, binding)
            return True

        self._rewrite_table(exchange, add, create=True)

    def _delete(self, queue: str, exchange: str, routing_key: str, pattern: str, *args: Any, **kwargs: Any) -> None:
        # The virtual channel's delete (a purge), then the binding out of the table, as kombu's
        # filesystem channel does, through the same locked rewrite as a bind.
        super(filesystem.Channel, self)._delete(queue, exchange, routing_key, pattern, *args, **kwargs)
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")

        def remove(bindings: list[Any]) -> bool:
            if binding not in bindings:
                return False
            bindings.remove(binding)
            return True

        self._rewrite_table(exchange, remove, create=False)

    def _rewrite_table(self, exchange: str, change: Callable[[list[Any]], bool], create: bool) -> None:
        """Apply `change` (bindings -> whether it changed them) to an exchange's table under its
        exclusive lock; a missing table is created if `create`, else left missing."""
        file = self._exchange_file(exchange)
        if create:
            self.control_folder.mkdir(exist_ok=True)
        try:
            fd = os.open(file, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)  # never truncated on open
        except FileNotFoundError as exc:
            if not create:
                return  # no table (or removed meanwhile): nothing to take out
            raise ChannelError(f"Cannot open {file}") from exc
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc
        with os.fdopen(fd, "rb+", buffering=0) as f_obj:
            filesystem.lock(f_obj, filesystem.LOCK_EX)
            try:
                bindings = _bindings(f_obj.read())
                if change(bindings):
                    f_obj.seek(0)
                    f_obj.truncate()
                    f_obj.write(dumps(bindings).encode())
            finally:
                filesystem.unlock(f_obj)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        (self._no_ack_queues.add if no_ack else self._no_ack_queues.discard)(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        message = super().basic_get(queue, no_ack, **kwargs)
        if message is not None and no_ack:
            _unlink(message._raw.get(CLAIM_KEY))
        return message

    @property
    def inflight_root(self) -> Path:
        return Path(self.data_folder_in).parent / "inflight"

    def _claim_dir(self) -> Path:
        # By pid each time: a pool process forked from the worker gets a folder of its own.
        path = self.inflight_root / owner_tag(os.getpid())
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def _get(self, queue: str) -> dict[str, Any]:
        self._rescue()
        wanted = f"{queue}.msg"
        claim_dir = None
        for filename in sorted(os.listdir(self.data_folder_in)):
            if filename.partition(".")[2] != wanted:
                continue
            claim_dir = claim_dir or self._claim_dir()
            source, claimed = os.path.join(self.data_folder_in, filename), claim_dir / filename
            try:
                os.rename(source, claimed)
            except OSError:  # another consumer claimed it first
                continue
            try:
                with open(claimed, "rb") as f:
                    filesystem.lock(f, filesystem.LOCK_SH)  # the writer holds LOCK_EX until it is whole
                    payload = f.read()
                    filesystem.unlock(f)
                message = loads(bytes_to_str(payload))
            except ValueError:  # claimed between its creation and its writer's lock: not written yet
                os.rename(claimed, source)
                continue
            except OSError as exc:
                raise ChannelError(f"Cannot read file {str(claimed)!r} from queue.") from exc
            if queue in self._no_ack_queues:  # nothing will acknowledge it: delivered is done, as in kombu
                _unlink(str(claimed))
            else:
                message[CLAIM_KEY] = str(claimed)
            return message
        raise filesystem.Empty()

    def _claimed(self, delivery_tag: Any) -> str | None:
        try:
            return self.qos.get(delivery_tag)._raw.get(CLAIM_KEY)
        except (KeyError, AttributeError):
            return None

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        claimed = self._claimed(delivery_tag)
        super().basic_ack(delivery_tag, multiple)
        _unlink(claimed)

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        claimed = self._claimed(delivery_tag)  # a requeue writes it back first (_restore)
        super().basic_reject(delivery_tag, requeue)
        _unlink(claimed)

    def _restore(self, message: Any) -> None:
        super()._restore(message)  # a copy back in the queue folder, then the claim goes
        _unlink(getattr(message, "_raw", {}).get(CLAIM_KEY))

    def _rescue(self) -> None:
        """Put back in the queue what consumers that died had claimed (at most once a second)."""
        now = time.monotonic()
        if now - self._rescued_at < RESCUE_EVERY_S:
            return
        self._rescued_at = now
        try:
            owners = os.listdir(self.inflight_root)
        except FileNotFoundError:
            return
        for owner in owners:
            if _alive(owner):
                continue
            folder = self.inflight_root / owner
            moved = 0
            for filename in os.listdir(folder):
                try:
                    os.rename(folder / filename, os.path.join(self.data_folder_in, filename))
                    moved += 1
                except OSError:  # another consumer is rescuing it too
                    continue
            try:
                folder.rmdir()
            except OSError:
                pass
            if moved:
                log.warning("Put %d message(s) back in the embedded broker's queues: the consumer that had "
                            "taken them (process %s) is gone.", moved, owner.partition("-")[0])


class Transport(filesystem.Transport):
    Channel = Channel
