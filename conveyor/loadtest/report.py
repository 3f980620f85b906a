"""The load test's report: a table for people, JSON for machines, and a directory with plots and one
self-contained HTML page (the PNGs inlined) for sharing."""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Any, TextIO

from conveyor.errors import UsageError
from conveyor.loadtest.metrics import Record, timeline


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _per_job(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.3f} ms per job"


def render(summary: dict[str, Any], scenario: str) -> str:
    s = summary
    lines = [f"Scenario: {scenario}"]
    if s.get("idle_queues"):
        lines.append(f"WARNING: no worker consumed {', '.join(s['idle_queues'])} when the run began.")
    if s["timed_out"]:
        lines.append(f"TIMED OUT after {s['duration_s']:.1f} s: {s['pending']} job(s) still pending, "
                     f"{s['not_sent']} never sent.")
    lines += [
        "",
        f"Sent {s['sent']}" + (f" of {s['planned']}" if s["planned"] is not None else "")
        + f": {s['succeeded']} succeeded, {s['failed']} failed, {s['dead_lettered']} dead-lettered, "
        f"{s['pending']} pending; {s['retried']} retried ({s['retries']} retries in all).",
        f"Throughput: {_rate(s['throughput_per_s'])} jobs/s over {s['window_s']:.2f} s"
        + (f" (target {s['target_rate_per_s']:g}/s, sent at {_rate(s['send_rate_per_s'])}/s)"
           if s["target_rate_per_s"] else "")
        + f"; served by {s['workers']} worker(s).",
        f"Sender: {_per_job(s['sender']['per_task_ms'])} publishing and confirming; "
        f"paused {s['backpressure_wait_s']:.1f} s on backpressure.",
        "",
    ]
    header = (f"{'TYPE':<16} {'SENT':>6} {'OK':>6} {'FAILED':>6} {'DLQ':>5} {'PEND':>5} {'RETRIED':>7} {'JOBS/S':>8}"
              f" {'P50 ms':>8} {'P95 ms':>8} {'P99 ms':>8} {'MAX ms':>8} {'WAIT P50':>9} {'RUN P50':>8}")
    lines.append(header)
    rows = [*s["types"].items(), ("ALL", s)]
    for name, t in rows:
        lat = t["latency_s"]
        lines.append(
            f"{name[:16]:<16} {t['sent']:>6} {t['succeeded']:>6} {t['failed']:>6} {t['dead_lettered']:>5} "
            f"{t['pending']:>5} {t['retried']:>7} {_rate(t['throughput_per_s']):>8} {_ms(lat['p50']):>8} "
            f"{_ms(lat['p95']):>8} {_ms(lat['p99']):>8} {_ms(lat['max']):>8} {_ms(t['wait_s']['p50']):>9} "
            f"{_ms(t['execution_s']['p50']):>8}")
    for name, t in s["types"].items():
        for i, stage in enumerate(t.get("stages", []), 1):
            lines.append(f"  {name} stage {i} ({stage['task']}): {stage['succeeded']} succeeded, "
                         f"{stage['retried']} retried, {stage['dead_lettered']} dead-lettered, "
                         f"run p50 {_ms(stage['execution_s']['p50'])} ms")
    lines.append("Latency: send to result in hand. WAIT: time queued before running. RUN: execution time.")
    return "\n".join(lines)


def write_json(summary: dict[str, Any], out: TextIO) -> None:
    json.dump(summary, out, indent=2, default=str)
    out.write("\n")


def write_dir(directory: Path, summary: dict[str, Any], records: list[Record], scenario: str) -> list[Path]:
    """Write summary.json, jobs.csv, throughput.png, latency.png and report.html; return the paths."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the report directory {directory}: {exc.strerror}") from None
    summary_file = directory / "summary.json"
    with summary_file.open("w") as out:
        write_json(summary, out)
    jobs_file = directory / "jobs.csv"
    with jobs_file.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["index", "type", "state", "sent_at", "latency_s", "wait_s", "execution_s", "retries", "workers", "error"])
        for r in records:
            writer.writerow([r.index, r.type, r.state, f"{r.sent_at:.6f}", r.latency_s, r.wait_s, r.execution_s,
                             r.retries, " ".join(s.worker or "" for s in r.stages), r.outcome.error or ""])
    throughput_png, latency_png = directory / "throughput.png", directory / "latency.png"
    plot_throughput(records, throughput_png)
    plot_latency(records, latency_png)
    page = directory / "report.html"
    page.write_text(_html(summary, scenario, [throughput_png, latency_png]), encoding="utf-8")
    return [summary_file, jobs_file, throughput_png, latency_png, page]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(records: list[Record], path: Path) -> None:
    plt = _pyplot()
    bucket = _bucket_s(records)
    line = timeline(records, bucket)
    fig, ax = plt.subplots(figsize=(9, 4))
    for key, label in (("sent", "sent/s"), ("succeeded", "succeeded/s"), ("failed", "failed or dead-lettered/s")):
        if key != "failed" or any(line[key]):
            ax.plot([t + bucket / 2 for t in line["t"]], [n / bucket for n in line[key]], label=label, marker=".")
    ax.set(xlabel="seconds since the first send", ylabel="jobs per second", title="Throughput over time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bucket_s(records: list[Record]) -> float:
    """A round bucket width giving some fifty points over the run."""
    ends = [r.received_at or r.sent_at for r in records]
    span = (max(ends) - min(r.sent_at for r in records)) if records else 1.0
    return next((b for b in (0.1, 0.2, 0.5, 1, 2, 5, 10, 30) if span / b <= 60), 60.0)


def plot_latency(records: list[Record], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for name in dict.fromkeys(r.type for r in records):
        values = sorted(r.latency_s * 1000 for r in records if r.type == name and r.latency_s is not None)
        if values:
            # An empirical CDF: reads off every percentile at once and copes with any spread.
            ax.plot(values, [(i + 1) / len(values) * 100 for i in range(len(values))], label=f"{name} ({len(values)})")
    ax.set(xlabel="latency, send to result (ms)", ylabel="percent of jobs at or below",
           title="Latency distribution per task type")
    ax.set_xscale("log")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _html(summary: dict[str, Any], scenario: str, images: list[Path]) -> str:
    figures = "\n".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"></figure>' for p in images)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Load test: {html.escape(scenario)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} pre{{background:#f4f4f4;padding:1em;overflow-x:auto}}
img{{max-width:100%}}</style></head><body>
<h1>Load test: {html.escape(scenario)}</h1>
<pre>{html.escape(render(summary, scenario))}</pre>
{figures}
<details><summary>All figures (JSON)</summary><pre>{html.escape(json.dumps(summary, indent=2, default=str))}</pre></details>
</body></html>
"""
