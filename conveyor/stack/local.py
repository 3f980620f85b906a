"""The local stack: each replica is a background `conveyor.stack.launcher` process on this machine.

Everything it starts is recorded under one run directory (`<run>/local/`): a pid file and a log
file per replica and the desired counts, so that `down` stops exactly what `up` started, from any
shell, and never a process that merely reused a pid.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conveyor.settings import environment
from conveyor.settings.environment import PROJECT_ROOT, run_dir
from conveyor.settings.config import ServiceConfig
from conveyor.errors import StackError
from conveyor.stack.base import Replica, Stack
from conveyor.settings.context import settings_of

log = logging.getLogger(__name__)


class LocalStack(Stack):
    name = "local"

    @property
    def home(self) -> Path:
        return run_dir() / "local"

    # --- bookkeeping -------------------------------------------------------------------
    def _state_file(self) -> Path:
        return self.home / "state.json"

    def _pidfiles(self, service: str | None = None) -> list[Path]:
        files = sorted(self.home.glob(f"{service + '-' if service else ''}*.pid"), key=_index_key)
        return [f for f in files if service is None or f.stem.rsplit("-", 1)[0] == service]

    def replicas(self) -> list[Replica]:
        found = []
        for pidfile in self._pidfiles():
            pid, node = read_pidfile(pidfile)
            found.append(Replica(pidfile.stem.rsplit("-", 1)[0], str(pid), node, is_ours(pid, node)))
        return found

    def kill(self, replica: Replica) -> None:
        """SIGKILL the replica's whole process group (the worker and its pool)."""
        try:
            os.killpg(int(replica.ident), signal.SIGKILL)
        except ProcessLookupError:
            pass

    # --- scaling -----------------------------------------------------------------------
    def _scale(self, service: ServiceConfig, count: int) -> None:
        self._set_desired(service.name, count)
        files = self._pidfiles(service.name)
        live, dead = [], []
        for f in files:
            pid, node = read_pidfile(f)
            (live if is_ours(pid, node) else dead).append(f)
        for f in dead:  # a replica that died: forget it, its slot is reused below
            log.warning("Replica %s had exited; removing its pid file.", f.stem)
            f.unlink(missing_ok=True)
        if len(live) > count:
            self._stop(live[count:])
        for index in _free_indexes([_index_key(f) for f in live], count - len(live)):
            self._start(service, index)

    def _start(self, service: ServiceConfig, index: int) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        stem = f"{service.name}-{index}"
        node = f"{stem}@{socket.gethostname()}"
        env = environment.inherited({**settings_of(self.app).broker.worker_env(), "PYTHONUNBUFFERED": "1"})
        if self.config.source:
            env["CONVEYOR_CONFIG"] = str(self.config.source)
        cmd = [sys.executable, "-m", "conveyor.stack.launcher", "--service", service.name, "--node", node]
        with open(self.home / f"{stem}.log", "ab") as logfile:
            try:
                proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=logfile, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:
                raise StackError(f"cannot start worker {node}: {exc}") from None
        (self.home / f"{stem}.pid").write_text(f"{proc.pid} {node}\n")
        log.info("Started worker %s (pid %d).", node, proc.pid)

    def _stop(self, pidfiles: list[Path]) -> None:
        """Warm shutdown: SIGTERM lets running tasks finish; after the grace period, SIGKILL.
        With late acks, whatever a killed worker held goes back to its queue."""
        targets = []
        for f in pidfiles:
            pid, node = read_pidfile(f)
            if is_ours(pid, node):
                os.kill(pid, signal.SIGTERM)
                targets.append((f, pid, node))
            else:
                f.unlink(missing_ok=True)
        deadline = time.monotonic() + self.config.stop_grace_s
        for f, pid, node in targets:
            while is_ours(pid, node) and time.monotonic() < deadline:
                time.sleep(0.1)
            if is_ours(pid, node):
                log.warning("Worker %s did not stop within %.0f s; killing it.", node, self.config.stop_grace_s)
                os.kill(pid, signal.SIGKILL)
                while is_ours(pid, node):
                    time.sleep(0.05)
            f.unlink(missing_ok=True)
            log.info("Stopped worker %s.", node)

    def failures(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for pidfile in self._pidfiles():
            pid, node = read_pidfile(pidfile)
            if not is_ours(pid, node):
                service = pidfile.stem.rsplit("-", 1)[0]
                found.setdefault(service, f"worker {node or pidfile.stem} exited: {last_error(pidfile.with_suffix('.log'))}")
        return found

    def down(self) -> None:
        self._stop(self._pidfiles())
        self._state_file().unlink(missing_ok=True)

    def logs(self, follow: bool = True) -> None:
        files = sorted(str(p) for p in self.home.glob("*.log"))
        if not files:
            raise StackError(f"no worker logs in {self.home}; start the stack with `make up`")
        cmd = ["tail", "-n", "50", *(["-F"] if follow else []), *files]
        os.execvp(cmd[0], cmd)


def last_error(log_file: Path, tail_bytes: int = 16_384) -> str:
    """The last `error: ...` line a worker wrote before it exited, else its last line."""
    try:
        with open(log_file, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return f"no log at {log_file}"
    errors = [line for line in lines if line.startswith("error: ")]
    return (errors or lines or ["its log is empty"])[-1]


def _index_key(path: Path) -> int:
    try:
        return int(path.stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def _free_indexes(used: list[int], how_many: int) -> list[int]:
    free, candidate = [], 1
    while len(free) < how_many:
        if candidate not in used:
            free.append(candidate)
        candidate += 1
    return free


def read_pidfile(path: Path) -> tuple[int, str]:
    """(pid, Celery node name) from a worker's pid file; (-1, "") when it cannot be read."""
    try:
        pid, node = path.read_text().split()
        return int(pid), node
    except (OSError, ValueError):
        return -1, ""


def is_ours(pid: int, node: str) -> bool:
    """The pid is alive, not a zombie, and still the worker we started (pids get reused)."""
    if pid <= 0:
        return False
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
    except ChildProcessError:
        pass
    if not alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return node.encode() in cmdline


def alive(pid: int | str) -> bool:
    """The process exists and has not exited (a zombie keeps its /proc entry until it is reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
