"""The chaos run's verdict: nothing lost is not enough; every planned task confirmed (or refused by
the broker), everything ended as planned, and no part of the run failed."""

from __future__ import annotations

import dataclasses

import pytest

from conveyor.chaos.actors import Actor
from conveyor.chaos.report import ChaosReport
from conveyor.chaos.run import ChaosOptions, plan
from conveyor.settings.config import load_config
from helpers import ROOT

CLEAN = ChaosReport(planned=100, sent=120, confirmed=98, refused=2, succeeded=80, dead_lettered=18, lost=0,
                    duplicated=1, resent=20, pipelines=10, malformed=2, set_to_fail=18, mismatched=0, executions=130,
                    cut_off=3, kills=4, broker_restarts=1, broker_away_s=5.0, elapsed_s=60.0, timed_out=False,
                    refused_ids=["a", "b"])


def test_a_run_passes_only_when_every_planned_task_is_confirmed_or_refused_and_nothing_failed():
    assert CLEAN.ok and "Result: nothing lost." in CLEAN.render()
    unconfirmed = dataclasses.replace(CLEAN, confirmed=97)
    assert not unconfirmed.ok and "UNCONFIRMED: 1 planned task(s)" in unconfirmed.render()
    broken = dataclasses.replace(CLEAN, errors=["publisher: KeyError: 'x'"])
    assert not broken.ok and "ERROR in the run's publisher: KeyError: 'x'" in broken.render()
    for field, value in (("lost", 1), ("mismatched", 1), ("timed_out", True)):
        assert not dataclasses.replace(CLEAN, **{field: value}).ok, field


def test_an_exception_in_an_actor_is_kept_for_the_verdict():
    class Failing(Actor):
        def act(self) -> None:
            raise RuntimeError("the publisher tripped")

    actor = Failing(name="publisher", daemon=True)
    actor.start()
    actor.join(10)
    assert isinstance(actor.error, RuntimeError)


def test_the_plan_mixes_tasks_pipelines_and_malformed_messages_reproducibly():
    config = load_config(ROOT / "test-config.yml")
    options = ChaosOptions(tasks=2000, seed=5)
    planned = plan(options, config)
    assert planned == plan(options, config)
    kinds = {kind: sum(p.kind == kind for p in planned) for kind in ("task", "pipeline", "malformed")}
    assert kinds["pipeline"] == pytest.approx(200, rel=0.25) and kinds["malformed"] == pytest.approx(40, rel=0.5)
    assert {p.flaw for p in planned if p.kind == "malformed"} == {"not_json", "unknown_task", "wrong_shape"}
    failing = [p for p in planned if p.kind == "pipeline" and p.fails]
    assert failing and all(p.stages[1][1]["fail_first"] == config.retry_policy(p.stages[1][0]).max_retries + 1 for p in failing)
    assert all(len(p.stages) == 3 for p in planned if p.kind == "pipeline")
