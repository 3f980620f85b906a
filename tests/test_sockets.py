"""conveyor/seam/sockets.py on real sockets (socket pairs): buffered reads give py-amqp the frames it
would have read, the worker loop's reader reads on through them, and a solo worker's held writes go
out results first, at the latest after CORK_S, and never after a result that could not be written."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from amqp.exceptions import UnexpectedFrame

from helpers import wait_for
from conveyor.seam import sockets


def frame(payload: bytes, channel: int = 1, kind: int = 1) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    transport = sockets.BufferedTransport("127.0.0.1:5672")
    transport.sock = ours
    transport._setup_transport()
    transport.connected = True
    recvs = []
    recv = transport._quick_recv
    transport._quick_recv = lambda n: recvs.append(n) or recv(n)
    yield transport, theirs, recvs
    ours.close()
    theirs.close()


def test_frames_read_at_once_are_those_py_amqp_reads(pair):
    transport, theirs, recvs = pair
    frames = [frame(b"method"), frame(b"header" * 10, kind=2), frame(b"x" * 5000, kind=3)]
    theirs.sendall(b"".join(frames) + frames[0][:4])  # and the start of a fourth
    for expected in frames:
        kind, channel, payload = transport.read_frame()
        assert (kind, channel, bytes(payload)) == (expected[0], 1, expected[7:-1])
    assert len(recvs) == 1, "three frames, one recv"
    assert not transport.has_frame()
    with pytest.raises(socket.timeout), transport.having_timeout(0):
        transport.read_frame()  # the fourth is not all here: nothing of it is lost
    theirs.sendall(frames[0][4:])
    with transport.having_timeout(1):
        assert bytes(transport.read_frame()[2]) == b"method"


def test_a_frame_cut_after_its_header_is_put_back_whole(pair):
    transport, theirs, _ = pair
    whole = frame(b"payload" * 100)
    theirs.sendall(whole[:20])
    # A timeout, not 0: with 0, py-amqp (and this transport) waits out a frame it has begun.
    with pytest.raises(socket.timeout), transport.having_timeout(0.2):
        transport.read_frame()
    theirs.sendall(whole[20:])
    with transport.having_timeout(1):
        assert bytes(transport.read_frame()[2]) == b"payload" * 100


class Loop:
    """What the reader and on_tick use of kombu's hub."""

    def __init__(self) -> None:
        self.soon, self.woken, self.on_tick = [], 0, set()
        self._waker = self

    def call_soon(self, callback, *args) -> None:
        self.soon.append(callback)

    def wake(self) -> None:
        self.woken += 1


class Connection:
    def __init__(self, transport) -> None:
        self.transport, self.connected, self.read = transport, True, []

    def drain_events(self, timeout=None) -> None:
        with self.transport.having_timeout(timeout):
            self.read.append(bytes(self.transport.read_frame()[2]))


def test_the_loop_reader_reads_every_buffered_frame_in_one_turn(pair):
    transport, theirs, _ = pair
    connection, loop = Connection(transport), Loop()
    read = sockets.reader(connection, socket.timeout, OSError, sockets._UNAVAIL)
    theirs.sendall(b"".join(frame(b"%d" % i) for i in range(5)))
    read(loop)
    assert connection.read == [b"0", b"1", b"2", b"3", b"4"]
    assert loop.soon == [], "the socket is empty: the poll wakes the reader for what comes next"


def test_the_loop_reader_leaves_the_rest_to_the_next_turn_once_over_its_budget(pair, monkeypatch):
    transport, theirs, _ = pair
    monkeypatch.setattr(sockets, "DRAIN_S", 0)
    connection, loop = Connection(transport), Loop()
    read = sockets.reader(connection, socket.timeout, OSError, sockets._UNAVAIL)
    tick = sockets.on_tick(transport, loop)
    theirs.sendall(frame(b"a") + frame(b"b"))
    read(loop)
    assert connection.read == [b"a"] and loop.soon == [read]
    tick()
    assert loop.woken == 1, "frames wait in the buffer: the poll must return at once"
    loop.soon.pop()(loop)
    assert connection.read == [b"a", b"b"]
    tick()
    assert loop.woken == 1


@pytest.fixture
def corked(monkeypatch):
    """A Cork of its own with two recording 'connections' (results, consumer)."""
    monkeypatch.setattr(sockets, "CORK_S", 60.0)
    cork, written = sockets.Cork(), []
    transports = {}
    for rank, name in ((sockets.Cork.CONSUMER, "consumer"), (sockets.Cork.RESULTS, "results")):
        ours, theirs = socket.socketpair()
        transport = sockets.BufferedTransport("127.0.0.1:5672")
        transport.sock, transport.connected = ours, True
        transport._write = lambda data, name=name: written.append((name, bytes(data), time.monotonic()))
        cork.cork(transport, rank)
        transports[name] = (transport, theirs)
    yield cork, written, transports
    for transport, theirs in transports.values():
        transport.sock.close()
        theirs.close()


def test_held_writes_go_out_together_results_first(corked):
    cork, written, transports = corked
    transports["consumer"][0].write(b"ack-1")
    transports["results"][0].write(b"result-2")
    transports["consumer"][0].write(b"ack-2")
    assert written == []
    cork.flush()
    assert [(name, data) for name, data, _ in written] == [("results", b"result-2"), ("consumer", b"ack-1ack-2")]


def test_held_writes_go_out_once_they_fill_a_write(corked):
    cork, written, transports = corked
    transports["consumer"][0].write(b"x" * sockets.WRITE_BYTES)
    assert [(name, len(data)) for name, data, _ in written] == [("consumer", sockets.WRITE_BYTES)]


def test_held_writes_go_out_at_the_latest_after_cork_s(corked, monkeypatch):
    cork, written, transports = corked
    monkeypatch.setattr(sockets, "CORK_S", 0.05)
    with cork._lock:
        cork._lock.notify()  # the flusher is waiting with the old deadline: let it read the new one
    held_at = time.monotonic()
    transports["consumer"][0].write(b"ack")
    wait_for(lambda: written, timeout_s=5, interval_s=0.005, what="the flusher thread to write the held ack")
    assert written[0][2] - held_at >= 0.05


def test_acks_behind_a_result_that_could_not_be_written_are_dropped_with_their_connection(corked):
    cork, written, transports = corked
    results, consumer = transports["results"][0], transports["consumer"][0]

    def broken(data: bytes) -> None:
        raise ConnectionResetError(104, "Connection reset by peer")

    cork._writers[sockets.Cork.RESULTS] = broken
    results.write(b"result")
    consumer.write(b"ack")
    cork.flush()
    assert written == [], "the ack must not go out once its result was lost"
    assert not consumer.connected and not results.connected
    transports["consumer"][1].settimeout(5)
    assert transports["consumer"][1].recv(10) == b"", "the consumer's connection is closed: the broker redelivers"
    with pytest.raises(ConnectionResetError):
        consumer.write(b"next")



def test_a_buffered_frame_with_a_wrong_end_octet_is_refused_as_py_amqp_refuses_it(pair):
    transport, theirs, _ = pair
    theirs.sendall(frame(b"ok") + frame(b"bad")[:-1] + b"\x00")
    with transport.having_timeout(1):
        assert bytes(transport.read_frame()[2]) == b"ok"
    with pytest.raises(UnexpectedFrame):
        transport.read_frame()



def test_a_forked_child_holds_nothing_of_its_parents(pair, monkeypatch):
    transport, theirs, _ = pair
    monkeypatch.setattr(sockets, "CORK_S", 60.0)
    try:
        sockets.CORK.cork(transport, sockets.Cork.CONSUMER)
        transport.write(b"ack")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child (a pool process forked later): nothing of the parent's is its to write
            os.write(write, b"%d %d" % (len(sockets.CORK._transports), sockets.CORK.active))
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read, 100) == b"0 0"
        sockets.CORK.flush()
        theirs.settimeout(5)
        assert theirs.recv(10) == b"ack", "the parent still writes what it held"
    finally:
        sockets.CORK._reset()  # this process's Cork as it was: nothing corked


def test_a_replaced_connection_writes_to_its_own_socket(corked):
    cork, written, transports = corked
    old = transports["consumer"][0]
    new = sockets.BufferedTransport("127.0.0.1:5672")
    new._write = lambda data: written.append(("new", bytes(data), time.monotonic()))
    cork.cork(new, sockets.Cork.CONSUMER)
    old.write(b"close")  # the old connection's close, after the new one took its place
    assert [(name, data) for name, data, _ in written] == [("consumer", b"close")]
    new.write(b"ack")
    cork.flush()
    assert [(name, data) for name, data, _ in written] == [("consumer", b"close"), ("new", b"ack")]


def test_a_reset_retires_the_flusher_it_replaces(corked, monkeypatch):
    cork, _, transports = corked
    monkeypatch.setattr(sockets, "IDLE_S", 0.05)
    errors = []
    monkeypatch.setattr("threading.excepthook", errors.append)
    old = cork._flusher
    cork._reset()  # as a test, or a forked child, does: the old flusher must not wait on the new lock
    wait_for(lambda: not old.is_alive(), 5, "the old flusher to end")
    assert errors == []
    cork.cork(transports["consumer"][0], sockets.Cork.CONSUMER)
    assert cork._flusher is not old and cork._flusher.is_alive(), "the next cork starts a flusher of its own"
    cork._reset()
