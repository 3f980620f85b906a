"""The dispatcher's human-readable report, in the order the original system printed it."""

from __future__ import annotations

from typing import Any, TextIO

from conveyor.dispatch.dispatcher import DispatchReport
from conveyor.tasks.states import TaskState


def print_report(report: DispatchReport, out: TextIO, source: str) -> None:
    config = report.config
    w = out.write
    w(f"Loaded config: {source} ({config['name']!r})\n")
    w(f"Expected workers: {config['expected_workers']}\n")
    w(f"Dispatched {len(report.tasks)} tasks: "
      + ", ".join(f"{t['count']} x {t['task']}" for t in config["tasks"]) + "\n\n")
    width = max(len(t.name) for t in report.tasks)
    for t in report.tasks:
        if t.state == TaskState.SUCCEEDED:
            runtime = "?" if t.execution_time_s is None else f"{t.execution_time_s:.3f}"
            detail = f"result: {_short(t.result)}, execution time: {runtime} s, retries: {t.retries}, worker: {t.worker}"
        else:
            detail = f"{t.state}: {t.error}, retries: {t.retries}"
        w(f"{t.name:<{width}}  {t.id}  {detail}\n")
    w("\n")
    w(f"Total dispatcher time:  {report.total_time_s:.3f} s\n")
    w(f"Sequential time:        {report.sequential_time_s:.3f} s (sum of execution times)\n")
    w(f"Speed-up:               {report.speedup:.2f}x\n")
    w(f"Total retries:          {report.total_retries}\n")
    w(f"Succeeded: {report.succeeded}, failed: {report.failed} (of which dead-lettered: {report.dead_lettered})\n")


RESULT_CHARS = 100  # a user task's result can be big: the report shows its start; --json has it whole


def _short(result: Any) -> str:
    text = repr(result)
    return text if len(text) <= RESULT_CHARS else f"{text[:RESULT_CHARS - 1]}… ({len(text)} characters)"
