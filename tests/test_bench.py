"""Unit: how `make bench` pairs its rounds into the ratios the targets are judged on. No broker needed."""

from __future__ import annotations

import sys

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
