"""py-amqp's socket reads and writes, with fewer system calls (fast path).

Reads. py-amqp reads a frame with three recv calls of exactly the bytes it needs next (the 7-byte
header, the payload, the end octet), and kombu's worker loop changes the socket's timeout twice
around each frame (two fcntl calls): a task message, three frames, cost a worker eleven system
calls to read, and its result as many again in the caller. `BufferedTransport` takes what the
socket holds, up to READ_BYTES, in one recv and serves frames from that buffer; a frame that is all
in the buffer is read without the timeout changes (`buffered_frame`, through the connection's
`blocking_read`). Nothing else changes: a read that finds too few bytes waits on the socket as
before, under the same timeout.

kombu's worker loop (its hub) reads one method per turn and then polls the socket, which says
nothing of frames already in the buffer: `reader` replaces kombu's reader on such a connection and
reads on while the buffer holds a whole frame (for at most DRAIN_S, so that the hub's timers still
fire), and `on_tick` wakes the hub's poll when frames are left over.

Writes (a solo worker only: `Cork`). Celery's solo worker writes each result and each ack with a
sendall of its own, two writes per task, each waking the broker (14 % of a no-op solo worker's
samples, profiled). There the writes of the consumer connection and of the result connection are
held and written together:
- before the worker's loop polls its sockets, once the deliveries it read at once are done, and
  before any read from a socket (so a method that waits for its reply is never held);
- once they reach WRITE_BYTES;
- at the latest CORK_S after the first one was held, by a flusher thread: a long task after short
  ones does not hold their results and acks back.
A task's result is always written before its ack: the result connection is written first. A write
that fails marks its connection broken, and the next use of it raises. Only a solo worker corks: a
prefork worker acknowledges in the parent what its children published (measured, holding the
parent's acks bought nothing: docs/performance.md), and a threads worker publishes results from
many threads. A forked child starts with nothing held (os.register_at_fork).

Uses of py-amqp internals (checked against amqp 5.4.2, kombu 5.7.0):

- `amqp.transport.TCPTransport` subclassed: `_read` (the buffered read), `_read_buffer` (the property
  py-amqp's `read_frame` sets to put back a frame it could not finish), `read_frame` (a buffered
  frame parsed at once). Given by `Connection.Transport`, and read by `Connection.blocking_read`
  (both in conveyor/seam/producer.py's connection class). Replaces: recv of exact sizes, and a
  timeout change per frame.
- `kombu.transport.base.Transport._make_reader` (kombu's reader for the hub) replaced by `reader`,
  and `Hub.on_tick` and the hub's `_waker` (its `wake()`) used by `on_tick`. Replaces: one method
  read per turn of the loop, which would leave buffered frames waiting for the next poll.
- A transport's `_write` (the socket's sendall, which py-amqp's `write` calls) replaced by `Cork.hold`
  on a solo worker's two connections. Replaces: a sendall per frame written.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time
from typing import Any

from amqp.exceptions import RecoverableConnectionError, UnexpectedFrame
from amqp.transport import TCPTransport

log = logging.getLogger(__name__)

READ_BYTES = 64 * 1024  # what one recv takes at most: about 150 task messages of the no-op benchmark
WRITE_BYTES = 64 * 1024  # held writes are written once they reach this size
DRAIN_S = 0.005  # the longest the loop's reader reads on before the hub's timers get their turn
CORK_S = 0.002  # the longest a held write waits (plus, under a busy GIL, Python's switch interval)
IDLE_S = 1.0  # how often an idle flusher looks whether a reset has retired it
FRAME_OVERHEAD = 8  # the header (type 1, channel 2, size 4 bytes) and the end octet around a payload
FRAME_END = 0xCE
_HEADER, _SIZE = struct.Struct(">BHI"), struct.Struct(">I")
_UNAVAIL = (errno.EAGAIN, errno.EINTR)


class BufferedTransport(TCPTransport):
    """py-amqp's TCP transport, reading what the socket holds at once (see the module's docstring)."""

    _data: bytes = b""  # what was read from the socket; frames are served from _offset on
    _offset: int = 0

    @property
    def _read_buffer(self) -> bytes:  # py-amqp's name: read_frame puts an unfinished frame back in it
        return self._data[self._offset:]

    @_read_buffer.setter
    def _read_buffer(self, value: bytes) -> None:
        self._data, self._offset = bytes(value), 0

    def _frame_end(self) -> int | None:
        """Where the next frame ends in the buffer, if it is all there."""
        data, start = self._data, self._offset
        if len(data) - start < FRAME_OVERHEAD:
            return None
        end = start + FRAME_OVERHEAD + _SIZE.unpack_from(data, start + 3)[0]
        return end if len(data) >= end else None

    def has_frame(self) -> bool:
        """Whether a whole frame waits in the buffer, to be read without touching the socket."""
        return self._frame_end() is not None

    def buffered_frame(self) -> tuple[int, int, bytes] | None:
        """The next frame as py-amqp's read_frame gives it (type, channel, payload), if it is all in
        the buffer; else None, and nothing is consumed."""
        end = self._frame_end()
        if end is None:
            return None
        data, start = self._data, self._offset
        kind, channel, _ = _HEADER.unpack_from(data, start)
        if data[end - 1] != FRAME_END:
            raise UnexpectedFrame(f"Received frame_end {data[end - 1]:#04x} while expecting 0xce")
        self._offset = end
        return kind, channel, data[start + 7:end - 1]

    def read_frame(self, unpack=struct.unpack):
        frame = self.buffered_frame()
        return frame if frame is not None else super().read_frame(unpack)

    def _read(self, n, initial=False, _errnos=_UNAVAIL):
        data, start = self._data, self._offset
        end = start + n
        if len(data) >= end:
            self._offset = end
            return data[start:end]
        CORK.flush()  # what this process holds goes out before it waits for an answer
        data = data[start:]
        self._data, self._offset = data, 0
        recv = self._quick_recv
        while len(data) < n:
            try:
                chunk = recv(max(READ_BYTES, n - len(data)))
            except OSError as exc:
                if exc.errno in _errnos:
                    if initial and self.raise_on_initial_eintr:
                        raise socket.timeout() from None
                    continue
                raise
            if not chunk:
                raise OSError("Server unexpectedly closed connection")
            data += chunk
            self._data = data  # kept if a later recv raises: read_frame puts its own part back
        self._offset = n
        return data[:n]


def reader(connection: Any, timeout: type[Exception], error: type[OSError], unavail: tuple[int, ...]) -> Any:
    """kombu's reader for the worker loop (kombu.transport.base.Transport._make_reader, same
    arguments), reading on while the buffer holds a whole frame."""
    drain_events, transport = connection.drain_events, connection.transport

    def _read(loop: Any) -> None:
        if not connection.connected:
            raise RecoverableConnectionError("Socket was disconnected")
        until = time.monotonic() + DRAIN_S
        while True:
            try:
                drain_events(timeout=0)
            except timeout:
                return
            except error as exc:
                if exc.errno in unavail:
                    return
                raise
            if not transport.has_frame():
                return  # what comes next is in the socket, where the poll sees it
            if time.monotonic() >= until:
                break
        loop.call_soon(_read, loop)  # on_tick wakes the poll for it

    return _read


def on_tick(transport: BufferedTransport, loop: Any) -> Any:
    """The hub's callback before each poll: write what is held, and make the poll return at once
    if whole frames wait in the buffer (the reader stopped for the timers)."""

    def tick() -> None:
        CORK.flush()
        if transport.has_frame():
            waker = getattr(loop, "_waker", None)
            if waker is not None:
                waker.wake()
        elif not transport.connected:
            loop.on_tick.discard(tick)  # a connection replaced since

    return tick


class Cork:
    """The held writes of this process's corked connections (see the module's docstring)."""

    RESULTS, CONSUMER = 0, 1  # the order they are written in: a result before its ack

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # Also in a forked child: the parent's connections and held frames are not the child's to
        # write, its lock may have been held by a thread that does not exist there, nor does the flusher.
        self._lock = threading.Condition(threading.Lock())
        self._transports: dict[int, Any] = {}  # rank -> the corked transport
        self._writers: dict[int, Any] = {}  # rank -> its socket's own sendall
        self._held: dict[int, list[bytes]] = {}
        self._size = 0
        self._since: float | None = None  # when the oldest held write was held
        self._failed: dict[int, OSError] = {}
        self._flusher: threading.Thread | None = None
        # Whether the flusher waits for a first held write (then `hold` wakes it), rather than for a
        # deadline: while writes keep coming, it wakes at most every CORK_S and is not notified per
        # burst (a notify, and the flusher's turn for the GIL, was 4 % of a no-op solo worker's samples).
        self._idle = True
        self.active = False  # set by a solo worker's consumer: its result connection corks too

    def cork(self, transport: Any, rank: int) -> None:
        """Hold `transport`'s writes from now on, in place of any earlier transport of this rank (a
        connection replaced after a failure: what it held is dropped with it)."""
        write = transport._write
        with self._lock:
            self._transports[rank] = transport
            self._held[rank] = []
            self._failed.pop(rank, None)
            self._writers[rank] = write
            transport._write = lambda data: self.hold(rank, data, transport, write)
            self.active = True
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_late, name="conveyor-cork", daemon=True)
                self._flusher.start()
        log.debug("Writes of connection rank %d are held until the end of a burst.", rank)

    def hold(self, rank: int, data: Any, transport: Any, write: Any) -> None:
        with self._lock:
            # A connection replaced since (its close on the way out) writes to its own socket, at once.
            stale = self._transports.get(rank) is not transport
            if not stale:
                failed = self._failed.pop(rank, None)
                if failed is not None:
                    raise failed
                self._held[rank].append(bytes(data))  # py-amqp reuses the buffer `data` views
                self._size += len(data)
                if self._since is None:
                    self._since = time.monotonic()
                    if self._idle:  # else the flusher's timed wait ends soon and sees this burst
                        self._idle = False
                        self._lock.notify()
                full = self._size >= WRITE_BYTES
        if stale:
            write(data)
        elif full:
            self.flush()

    def flush(self) -> None:
        """Write everything held now, results first."""
        if self._since is None:
            return
        with self._lock:
            self._write_held()

    def _write_held(self) -> None:
        failed: OSError | None = None
        for rank in sorted(self._held):
            frames, self._held[rank] = self._held[rank], []
            if failed is not None:
                # The acks held behind results that could not be written must not go out: the
                # consumer's connection is closed instead, and the broker delivers those tasks again.
                self._break(rank, failed)
                continue
            if not frames:
                continue
            try:
                self._writers[rank](b"".join(frames))
            except OSError as exc:
                failed = exc
                self._break(rank, exc)
                log.warning("Writing held frames to the broker failed (%s); the connection is dropped.", exc)
        self._size = 0
        self._since = None

    def _break(self, rank: int, exc: OSError) -> None:
        transport = self._transports[rank]
        transport.connected = False  # as py-amqp's write marks a connection whose write failed
        self._failed[rank] = exc
        try:
            transport.sock.shutdown(socket.SHUT_RDWR)  # its reader sees the end too, and reconnects
        except (OSError, AttributeError):
            pass

    def _flush_late(self) -> None:
        # The lock this flusher started with: a reset (a forked child's, or a test's) replaces
        # self._lock and so retires this thread, which must not wait on a lock it does not hold.
        lock = self._lock
        with lock:
            while self._lock is lock:
                if self._since is None:
                    self._idle = True
                    lock.wait(IDLE_S)  # woken by the first write held; the timeout only re-checks
                    continue
                left = self._since + CORK_S - time.monotonic()
                if left > 0:
                    # Flushed meanwhile, most often; a burst held since is seen when this ends.
                    lock.wait(left)
                    continue
                self._write_held()


CORK = Cork()
os.register_at_fork(after_in_child=CORK._reset)
