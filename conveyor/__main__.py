"""Find, inspect and recover individual tasks (reference: docs/tasks.md).

    python -m conveyor tasks list [--status S ...] [--name task_a] [--since 10m] [--limit N] [--json]
    python -m conveyor tasks show ID [--json]
    python -m conveyor tasks revoke ID [--terminate]
    python -m conveyor dlq list [--json]
    python -m conveyor dlq requeue ID [ID ...] | --all
    python -m conveyor dlq purge --yes

Records live where RECORDS_URL says (default: <run dir>/records.sqlite3, this user's only); the
broker is BROKER_URL's, as for every other command.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from conveyor.cli import common
from conveyor.tasks import deadletter
from conveyor.errors import UsageError
from conveyor.lifecycle import commands, render, stores
from conveyor.tasks.states import RECORD_STATES, TaskState
from conveyor import console
from conveyor.stack import open_app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conveyor", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file (default: CONVEYOR_CONFIG or test-config.yml)")
    parser.add_argument("-v", "--verbose", action="store_true")
    area = parser.add_subparsers(dest="area", required=True)

    tasks = area.add_parser("tasks", help="task records").add_subparsers(dest="command", required=True)
    listing = tasks.add_parser("list", help="recent tasks, newest first")
    listing.add_argument("--status", action="append", type=_record_state, metavar="STATE",
                         help=f"repeat for several: {', '.join(s.name.lower() for s in RECORD_STATES)}")
    listing.add_argument("--name", help="task name, e.g. task_a")
    listing.add_argument("--since", help="sent since: 30s, 10m, 2h, 1d, or an ISO time")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument("--json", action="store_true")
    show = tasks.add_parser("show", help="one task's record and history")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    revoke = tasks.add_parser("revoke", help="keep a queued task from running; --terminate stops a running one")
    revoke.add_argument("id")
    revoke.add_argument("--terminate", action="store_true", help="also kill it if it is running (prefork pool)")

    dlq = area.add_parser("dlq", help="the dead-letter queue").add_subparsers(dest="command", required=True)
    dlq.add_parser("list", help="the messages in the dead-letter queue").add_argument("--json", action="store_true")
    requeue = dlq.add_parser("requeue", help="run dead-lettered tasks again, once each, with fresh retries")
    requeue.add_argument("ids", nargs="*", metavar="ID")
    requeue.add_argument("--all", action="store_true", help="every message in the dead-letter queue")
    purge = dlq.add_parser("purge", help="delete every message in the dead-letter queue")
    purge.add_argument("--yes", action="store_true", help="confirm: the messages cannot be recovered")
    return parser


def _record_state(text: str) -> TaskState:
    try:
        state = TaskState.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if state not in RECORD_STATES:
        raise argparse.ArgumentTypeError(f"a task record is never {text!r}")
    return state


def main() -> int:
    args = build_parser().parse_args()
    common.setup_logging(args.verbose)
    # Records live in Redis or SQLite: listing and showing them works while the broker is down.
    app = open_app(args.config, announce=False, check=args.area == "dlq" or args.command == "revoke")
    return (run_tasks if args.area == "tasks" else run_dlq)(app, args)


def run_tasks(app, args) -> int:
    if args.command == "list":
        if args.limit < 1:
            raise UsageError(f"--limit must be 1 or more, got {args.limit}")
        since = commands.parse_since(args.since) if args.since else None
        found = stores.require_store(app).query(tuple(args.status or ()), args.name, since, args.limit)
        print(json.dumps([r.as_dict() for r in found], indent=2) if args.json else render.table(found))
    elif args.command == "show":
        record = commands.find(app, args.id)
        print(json.dumps(record.as_dict(), indent=2) if args.json else render.detail(record))
    else:
        print(commands.revoke(app, args.id, args.terminate))
    return 0


def run_dlq(app, args) -> int:
    if args.command == "list":
        found = deadletter.browse(app)
        if args.json:
            print(json.dumps([{k: v for k, v in asdict(d).items() if k not in ("body", "raw")} for d in found], indent=2, default=str))
        else:
            print(render.letters(found))
    elif args.command == "requeue":
        if bool(args.ids) == args.all:
            raise UsageError("name the task ids to requeue, or pass --all (not both)")
        done = commands.requeue(app, None if args.all else args.ids)
        print(f"Requeued {len(done)} task(s): " + ", ".join(f"{d.task}[{d.task_id}]" for d in done) if done
              else "The dead-letter queue is empty; nothing to requeue.")
    else:
        if not args.yes:
            raise UsageError("`dlq purge` deletes every dead-lettered message for good; pass --yes to confirm")
        print(f"Purged {len(commands.purge(app))} message(s) from the dead-letter queue.")
    return 0


if __name__ == "__main__":
    console.run(main)
