"""What a chaos run found: the account of every task sent, and the faults it survived."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PartitionFinding:
    worker: str
    cut_s: float  # how long the link was down
    in_flight: int  # tasks the partitioned worker had started and not finished when the link was cut
    in_flight_redelivered: int  # of those, finished (succeeded or dead-lettered) by a delivery after the cut
    finished_after_heal: int  # tasks the partitioned worker finished after the link came back (it reconnected)


@dataclass
class ChaosReport:
    planned: int
    sent: int  # publishes, those sent again after a broken connection included
    confirmed: int
    refused: int  # nacked by the broker: a refusal it reported, the one way a planned task may go unconfirmed
    succeeded: int
    dead_lettered: int
    lost: int
    duplicated: int
    resent: int  # publishes not confirmed on a connection that broke, hence sent again on the next one
    pipelines: int  # confirmed three-stage pipelines (each counts once, by its last stage)
    malformed: int  # confirmed messages no worker can run: they must be dead-lettered too
    set_to_fail: int  # confirmed tasks planned to fail every attempt (and malformed ones): the dead-lettered ones
    mismatched: int  # planned to fail but succeeded, or planned to succeed but dead-lettered
    executions: int  # task executions that ran to an end, retries and duplicates included
    cut_off: int  # executions that never ended: their worker was killed, or stopped them on a lost connection
    kills: int
    broker_restarts: int
    broker_away_s: float | None
    elapsed_s: float
    timed_out: bool
    partition: PartitionFinding | None = None
    workers_after_restart: list[str] | None = None  # workers that finished tasks after the broker came back
    answering_after_restart: int | None = None  # replicas that answered a ping at the end: they reconnected
    lost_ids: list[str] = field(default_factory=list)  # a sample, for a search in the worker logs
    refused_ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # what an actor of the run raised: the run proves nothing then

    @property
    def unaccounted(self) -> int:
        """Planned tasks neither confirmed nor refused by the broker: the publisher gave up on them."""
        return self.planned - self.confirmed - self.refused

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.mismatched == 0 and not self.timed_out and not self.errors
                and self.unaccounted == 0)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def render(self) -> str:
        faults = [f"{self.kills} worker replica(s) SIGKILLed"]
        if self.broker_restarts:
            faults.append(f"{self.broker_restarts} broker restart ({self.broker_away_s:.1f} s away)")
        if self.partition:
            faults.append(f"worker {self.partition.worker} cut off for {self.partition.cut_s:.0f} s")
        lines = [
            f"Chaos run: {self.planned} tasks in {self.elapsed_s:.0f} s; faults: {', '.join(faults)}.",
            "",
            f"  planned        {self.planned:>7}   ({self.pipelines} confirmed as 3-stage pipelines, "
            f"{self.malformed} as malformed messages)",
            f"  sent           {self.sent:>7}   ({self.resent} sent again after a broken connection)",
            f"  confirmed      {self.confirmed:>7}   ({self.refused} refused by the broker)",
            f"  succeeded      {self.succeeded:>7}",
            f"  dead-lettered  {self.dead_lettered:>7}   ({self.set_to_fail} were set to fail every attempt or malformed)",
            f"  lost           {self.lost:>7}   (confirmed, but neither succeeded nor dead-lettered)",
            f"  duplicated     {self.duplicated:>7}   (executions of a task attempt beyond the first)",
            "",
            f"Executions: {self.executions} ran to an end (retries and duplicates included), "
            f"{self.cut_off} were cut off by a kill or a lost connection.",
        ]
        if self.workers_after_restart is not None:
            lines.append(f"After the broker restart, {len(self.workers_after_restart)} worker(s) reconnected and "
                         "finished tasks: " + (", ".join(self.workers_after_restart) or "none") + ".")
        if self.answering_after_restart is not None:
            lines.append(f"At the end, {self.answering_after_restart} worker replica(s) answered a ping.")
        if self.partition:
            p = self.partition
            lines.append(f"Partition: {p.worker} was running {p.in_flight} task(s) when its link was cut; "
                         f"{p.in_flight_redelivered} of them were delivered again and finished. After the link "
                         f"came back it reconnected and finished {p.finished_after_heal} more.")
        if self.mismatched:
            lines.append(f"MISMATCH: {self.mismatched} task(s) ended otherwise than planned (see report.json).")
        if self.timed_out:
            lines.append("TIMED OUT before every confirmed task had ended.")
        if self.unaccounted:
            lines.append(f"UNCONFIRMED: {self.unaccounted} planned task(s) were neither confirmed nor refused by the broker.")
        if self.refused:
            lines.append(f"Refused by the broker: {', '.join(self.refused_ids[:5])}{' ...' if self.refused > 5 else ''}.")
        for error in self.errors:
            lines.append(f"ERROR in the run's {error}")
        if self.lost:
            lines.append(f"LOST: {self.lost} confirmed task(s), e.g. {', '.join(self.lost_ids[:5])}.")
        lines.append("Result: " + ("nothing lost." if self.ok else "FAILED."))
        return "\n".join(lines)
