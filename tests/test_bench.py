"""Unit: how `make bench` pairs its rounds into the ratios the targets are judged on. No broker needed."""

from __future__ import annotations

import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402


def test_the_ratio_is_the_median_rounds_own_and_the_range_is_shown():
    rounds = [{"conveyor-tuned": 858, "dramatiq-p2-t8": 956},   # 0.90
              {"conveyor-tuned": 701, "dramatiq-p2-t8": 1323},  # 0.53
              {"conveyor-tuned": 800, "dramatiq-p2-t8": 1000}]  # 0.80
    paired = bench.median_round(rounds, "dramatiq-p2-t8")
    assert paired["round"] == 3 and (paired["ours"], paired["peer"]) == (800, 1000)
    assert paired["ratio"] == 0.8 and paired["low"] == 701 / 1323 and paired["high"] == 858 / 956
    assert bench._spread([r["conveyor-tuned"] for r in rounds]) == "800/s (701-858)"


def test_rounds_without_the_peer_give_no_ratio():
    assert bench.median_round([{"conveyor-tuned": 800}], "raw-amqp") is None


# --- CPU per task from /proc (bench/proc_cpu.py) -----------------------------------------------------
import proc_cpu  # noqa: E402


def test_a_stat_line_is_read_past_a_command_name_with_spaces_and_brackets():
    # Fields 3 on: state, ppid 41, ..., utime 250 (field 14), stime 50, cutime 7, cstime 3.
    line = "1234 (celery (worker) x) S 41 1234 1234 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 3 0 99 0 0\n"
    assert proc_cpu.parse_stat(line) == proc_cpu.Stat(ppid=41, ticks=300, reaped_ticks=10)


def test_a_process_tree_takes_every_descendant_and_nothing_beside_it():
    parents = {10: 1, 11: 10, 12: 10, 13: 12, 20: 1, 21: 20}
    assert proc_cpu.descendants([10], parents) == {10, 11, 12, 13}
    assert proc_cpu.descendants([10, 21], parents) == {10, 11, 12, 13, 21}
    assert proc_cpu.descendants([], parents) == set()


def test_cpu_per_task_is_the_ticks_between_snapshots_in_ms_per_task():
    before = {"broker": 1000, "workers": 500, "caller": 20}
    after = {"broker": 1370, "workers": 1010, "caller": 280}  # 3.7 s, 5.1 s and 2.6 s at 100 ticks/s
    cpu = proc_cpu.per_task_ms(before, after, 10_000, hz=100)
    assert cpu["broker"] == 370 * 1000 / 100 / 10_000 and cpu["workers"] == 510 * 1000 / 100 / 10_000
    assert cpu["caller"] == 260 * 1000 / 100 / 10_000
    assert cpu["total"] == cpu["broker"] + cpu["workers"] + cpu["caller"]
    assert proc_cpu.describe(cpu) == "broker 0.37 ms, workers 0.51 ms, caller 0.26 ms"


def test_a_role_that_could_not_be_read_is_shown_as_such_and_leaves_no_total():
    cpu = proc_cpu.per_task_ms({"broker": None, "workers": 0, "caller": 0},
                               {"broker": None, "workers": 100, "caller": 50}, 1000, hz=100)
    assert cpu["broker"] is None and cpu["workers"] == 1.0 and cpu["total"] is None
    assert proc_cpu.describe(cpu) == "broker n/a, workers 1.00 ms, caller 0.50 ms"
    with pytest.raises(ValueError):
        proc_cpu.per_task_ms({}, {}, 0, hz=100)


def test_the_tuned_stacks_cpu_is_the_median_rounds_own():
    rounds = [{"broker": 0.5, "workers": 0.2, "caller": 0.3, "total": 1.0},
              {"broker": 0.3, "workers": 0.9, "caller": 0.2, "total": 1.4},
              {"broker": 0.2, "workers": 0.5, "caller": 0.5, "total": 1.2}]
    assert proc_cpu.median_by_total(rounds) is rounds[2]
    assert proc_cpu.median_by_total([]) is None


def test_the_brokers_listening_socket_is_found_by_its_port():
    # /proc/net/tcp: local address 127.0.0.1:5672 (0x1628) listening (0A), inode 4242; a connection
    # to it (01, established) and another port's listener beside it.
    table = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
             "   0: 0100007F:1628 00000000:0000 0A 00000000:00000000 00:00000000 00000000   999        0 4242 1\n"
             "   1: 0100007F:1628 0100007F:D3A2 01 00000000:00000000 00:00000000 00000000   999        0 5151 1\n"
             "   2: 00000000:3D38 00000000:0000 0A 00000000:00000000 00:00000000 00000000   999        0 6161 1\n")
    assert proc_cpu.listening_inodes(5672, [table]) == {"4242"}
    assert proc_cpu.listening_inodes(15672, [table]) == {"6161"}
    assert proc_cpu.listening_inodes(5673, [table]) == set()


def test_this_process_and_its_children_are_read_from_proc():
    import os
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        stat = proc_cpu.read_stat(child.pid)
        assert stat is not None and stat.ppid == os.getpid()
        assert child.pid in proc_cpu.descendants([os.getpid()], {child.pid: os.getpid()})
        assert proc_cpu.tree_ticks([os.getpid()]) >= proc_cpu.own_ticks(os.getpid()) > 0
    finally:
        child.communicate(b"")
