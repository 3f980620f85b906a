"""Fault injection (`make chaos`): prove that a task the broker confirmed is never lost.

    run.py     the run: its options, its plan, its timeline and the account
    actors.py  its moving parts: the publisher, the killer, the worker behind the partition
    malformed.py  the messages no worker can run that it sends among the tasks
    node.py    a RabbitMQ node of the run's own, to restart without disturbing anyone else's
    netns.py   a network namespace and veth pair: a second host whose link can be cut
    report.py  what the run found
    sweep.py   removing what runs killed outright left behind

The ledger the workers write during a run is conveyor/lifecycle/ledger.py. Reference: docs/reliability.md.
May import: conveyor.loadtest and every layer below it (not conveyor.cli).
"""

from conveyor.chaos.run import ChaosOptions, ChaosRun
from conveyor.chaos.report import ChaosReport

__all__ = ["ChaosOptions", "ChaosReport", "ChaosRun"]
