"""Unit: the embedded broker's fanout tables (conveyor/seam/filesystem.py). Every worker binds its
remote-control queue to Celery's broadcast exchange when it starts; workers starting together must
all end up in the table, or the one left out never answers a ping nor hears a revoke."""

from __future__ import annotations

import multiprocessing

from kombu import Connection

from conveyor.seam.filesystem import Channel

BINDERS = 8


def channel_in(folder) -> Channel:
    options = {"data_folder_in": str(folder / "queue"), "data_folder_out": str(folder / "queue"),
               "control_folder": str(folder / "control")}
    (folder / "queue").mkdir(parents=True, exist_ok=True)
    return Connection(transport="conveyor.seam.filesystem:Transport", transport_options=options).channel()


def _bind(folder, name: str, start) -> None:
    channel = channel_in(folder)
    start.wait(10)  # all together: the table does not exist yet when they look
    channel._queue_bind("celery.pidbox", "", "", name)


def test_workers_binding_together_are_all_in_the_broadcast_table(tmp_path):
    context = multiprocessing.get_context("fork")
    for round_ in range(5):
        folder = tmp_path / f"round{round_}"
        start = context.Barrier(BINDERS)
        binders = [context.Process(target=_bind, args=(folder, f"worker-{i}.pidbox", start)) for i in range(BINDERS)]
        for process in binders:
            process.start()
        for process in binders:
            process.join(30)
        assert [p.exitcode for p in binders] == [0] * BINDERS
        table = channel_in(folder).get_table("celery.pidbox")
        assert sorted(q.queue for q in table) == sorted(f"worker-{i}.pidbox" for i in range(BINDERS))


def test_a_table_created_but_not_yet_written_has_no_bindings(tmp_path):
    channel = channel_in(tmp_path)
    channel.control_folder.mkdir(parents=True, exist_ok=True)
    (channel.control_folder / "celery.pidbox.exchange").touch()
    assert channel.get_table("celery.pidbox") == []
    channel._queue_bind("celery.pidbox", "", "", "w1.pidbox")
    channel._queue_bind("celery.pidbox", "", "", "w1.pidbox")  # bound again: once in the table
    assert [q.queue for q in channel.get_table("celery.pidbox")] == ["w1.pidbox"]


def test_a_deleted_queue_leaves_the_table_and_the_others_stay(tmp_path):
    channel = channel_in(tmp_path)
    for name in ("w1.pidbox", "w2.pidbox"):
        channel._queue_bind("celery.pidbox", "", "", name)
    channel._delete("w1.pidbox", "celery.pidbox", "", "")
    assert [q.queue for q in channel.get_table("celery.pidbox")] == ["w2.pidbox"]
    channel._delete("w3.pidbox", "no.such.exchange", "", "")  # no table: nothing to take out, none made
    assert not (channel.control_folder / "no.such.exchange.exchange").exists()
