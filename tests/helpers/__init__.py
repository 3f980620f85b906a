"""What the tests share besides fixtures (those are in conftest.py): waiting on a condition, the
local RabbitMQ's management API, private virtual hosts, running a CLI the way a user would.

Every test module imports from here; no test module imports another, nor conftest."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conveyor.amqp import queues  # noqa: E402
from conveyor.runtime.app import create_app  # noqa: E402
from conveyor.settings import environment  # noqa: E402
from conveyor.settings.config import load_config  # noqa: E402
from conveyor.settings.context import settings_of  # noqa: E402

IN_CI = bool(os.environ.get("CI"))
RABBIT = ("127.0.0.1", 5672)


def unavailable(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required when CI is set")
    pytest.skip(f"{what} is not available")


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll until predicate() is truthy; fail naming `what` on timeout. The tests' only way to wait."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def listening(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=1):
            return True
    except OSError:
        return False


def management(method: str, path: str, body: bytes | None = None) -> None:
    """A call to the local RabbitMQ's management API as guest (vhosts and users for the tests)."""
    queues.management_request(environment.DEFAULT_BROKER_URL, path, method, body, timeout_s=10)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_url() -> str:
    """A broker URL at which nothing listens: errors that must come before any connection show."""
    return f"amqp://guest:guest@127.0.0.1:{free_port()}//"


def one_line_error(proc, *words: str) -> str:
    """The CLI failed with exactly one `error:` line on stderr, containing `words`, and no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@contextmanager
def private_vhost(prefix: str = "conveyor-test", required: bool = True) -> Iterator[str | None]:
    """A RabbitMQ virtual host of the caller's own on the local broker, deleted afterwards. Without
    the management API: unavailable() when `required`, else None (the caller shares the default vhost)."""
    vhost = f"{prefix}-{uuid.uuid4().hex[:8]}"
    try:
        management("PUT", f"vhosts/{vhost}")
        management("PUT", f"permissions/{vhost}/guest", b'{"configure":".*","write":".*","read":".*"}')
    except (OSError, urllib.error.URLError) as exc:
        if required or IN_CI:
            unavailable(f"the RabbitMQ management API ({exc})")
        yield None
        return
    try:
        yield vhost
    finally:
        management("DELETE", f"vhosts/{vhost}")


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@contextmanager
def module_stack(rabbitmq_url: str, run_dir: Path, config_file: Path, **env: str | None) -> Iterator:
    """A local stack for a whole test module (starting one per test would only repeat the same few
    seconds), on the session's vhost with a run directory of its own. Its environment (plus `env`;
    None unsets a variable) holds while the stack runs, so run_cli sees the same broker and stack."""
    from conveyor.stack.local import LocalStack

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BROKER_URL", rabbitmq_url)
        patch.setenv(environment.RUN_DIR_ENV, str(run_dir))
        patch.delenv("RESULT_BACKEND", raising=False)
        for name, value in env.items():
            if value is None:
                patch.delenv(name, raising=False)
            else:
                patch.setenv(name, value)
        app = create_app(load_config(config_file), environment.resolve())
        stack = LocalStack(app, settings_of(app).config)
        try:
            stack.up(wait_s=60)
            yield stack
        finally:
            stack.down()
            app.close()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a top-level script the way a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def queue_depth(app, name: str) -> int:
    return queues.stats(app, [name])[0].messages_ready or 0


def stop_process(proc: subprocess.Popen, timeout_s: float = 15) -> None:
    """End a server the test started: SIGTERM, then SIGKILL if it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def settled(store, task_id: str, status: str, timeout_s: float = 20):
    """The task's record, once it reaches `status` (the result can arrive a moment before the record)."""
    seen = []

    def reached():
        record = store.get(task_id)
        seen[:] = [record]
        return record is not None and record.status == status and record

    try:
        return wait_for(reached, timeout_s, f"task {task_id} to be recorded {status}")
    except pytest.fail.Exception as exc:
        # What the record said last, and its history: which state the task got stuck in, and when.
        last = seen[0] if seen else None
        history = [] if last is None else [(e.status, e.detail, str(e.at)) for e in last.history]
        raise pytest.fail.Exception(f"{exc}; last seen: {last and last.status}, history {history}") from None


def statuses(record) -> list[str]:
    return [e.status for e in record.history]
