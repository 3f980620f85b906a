"""A RabbitMQ node of our own, so that restarting the broker disturbs nobody else's.

The node gets its own name, ports, data and log directories and configuration (a temporary directory),
a user with a random password, and no plugins. It listens on 127.0.0.1 and on any extra address it is
given (the host end of a partition's veth pair). `stop` stops exactly this node, by name; the data
directory outlives a restart, so durable queues and persistent messages do too.

When run as root, the Debian/Ubuntu `rabbitmq-server` script switches to the `rabbitmq` user, which
therefore owns the directory (and the node shares that user's Erlang cookie with `rabbitmqctl`).

What a run that was killed outright leaves is found from the run's own directory, never from the
node's: the node writes its name and home to `node.json` in the run directory (0700, ours), and
the sweep (conveyor/chaos/sweep.py) reads only that. No RabbitMQ script is ever handed a file from
the node's directory: its env file (`RABBITMQ_CONF_ENV_FILE`, which the scripts source as shell) is
/dev/null, which they skip, so neither the system's nor any planted one is read.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

from conveyor.errors import BrokerError
from conveyor.settings import environment

log = logging.getLogger(__name__)

USER = "conveyor-chaos"
DIR_PREFIX = "conveyor-chaos-node-"
RECORD_FILE = "node.json"  # in the run's directory: which node, with which home, the run started


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Owned:
    """What a chaos run sets up for itself and must leave nothing of: entering sets it up (removing
    whatever part was made if that fails half-way); leaving removes it."""

    def set_up(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.set_up()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class BrokerNode(Owned):
    def __init__(self, listen: tuple[str, ...] = ("127.0.0.1",), start_timeout_s: float = 90.0,
                 keep_logs: Path | None = None, registry: Path | None = None) -> None:
        """`keep_logs`: where to copy the node's logs when it is removed (they tell when it noticed what).
        `registry`: the run's own directory, where the node is recorded for a sweep after a kill."""
        for tool in ("rabbitmq-server", "rabbitmqctl"):
            if not shutil.which(tool):
                raise BrokerError(f"{tool} is not installed; the chaos run starts a RabbitMQ node of its own "
                                  "(so that it can restart it), which needs RabbitMQ on this machine")
        self.listen, self.keep_logs = listen, keep_logs
        self.start_timeout_s = start_timeout_s
        self.home = Path(tempfile.mkdtemp(prefix=DIR_PREFIX))
        self.name = f"conveyor-chaos-{os.getpid()}-{secrets.token_hex(3)}@localhost"
        self.record = registry / RECORD_FILE if registry else None
        if self.record:
            self.record.write_text(json.dumps({"name": self.name, "home": str(self.home)}) + "\n")
        self.port = free_port()
        self.dist_port = free_port()
        self.password = secrets.token_urlsafe(18)
        self._process: subprocess.Popen | None = None
        listeners = "\n".join(f"listeners.tcp.{i} = {host}:{self.port}" for i, host in enumerate(listen, 1))
        (self.home / "rabbitmq.conf").write_text(
            f"{listeners}\n"
            f"default_user = {USER}\ndefault_pass = {self.password}\n"
            "loopback_users = none\n"  # the only user is ours; the namespaced worker is not on loopback
            "log.console = false\n"
        )
        (self.home / "rabbitmq.conf").chmod(0o600)
        (self.home / "enabled_plugins").write_text("[].\n")
        self._server_user = _server_user()
        if self._server_user:
            for path in (self.home, *self.home.iterdir()):
                os.chown(path, self._server_user.pw_uid, self._server_user.pw_gid)

    def url(self, host: str = "127.0.0.1") -> str:
        return f"amqp://{USER}:{self.password}@{host}:{self.port}/"

    @property
    def _pid_file(self) -> Path:
        return self.home / "node.pid"

    def _env(self) -> dict[str, str]:
        return environment.inherited({
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.home / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": os.devnull,  # no file is sourced: not the system's, which names its node
            "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "RABBITMQ_PID_FILE": str(self._pid_file),
            # Erlang distribution and its port mapper on loopback only.
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })

    def _ctl(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess | None:
        return _run(["rabbitmqctl", "-n", self.name, *args], self._env(), timeout_s)

    def start(self) -> None:
        started = time.monotonic()
        with open(self.home / "server.out", "ab") as out:
            self._process = subprocess.Popen(["rabbitmq-server"], env=self._env(), stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        done = self._ctl("wait", str(self._pid_file), "--timeout", str(int(self.start_timeout_s)),
                         timeout_s=self.start_timeout_s + 10)
        if done is None or done.returncode != 0:
            self.stop()
            raise BrokerError(f"the chaos run's RabbitMQ node {self.name} did not start: {self._tail()}")
        log.info("RabbitMQ node %s is up on port %d after %.1f s.", self.name, self.port, time.monotonic() - started)

    def stop(self) -> None:
        """Ask this node, by name, to halt; wait for its process to exit, and kill it if it will not.
        (Not `rabbitmqctl stop PIDFILE`: for a node that is not running, that waits forever.)"""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._ctl("stop")  # returns once the node has halted, or at once if it is not running
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log.warning("RabbitMQ node %s did not stop; killing it.", self.name)
                _kill_tree(self._process.pid)
                self._process.wait()
        self._process = None
        log.info("RabbitMQ node %s is stopped.", self.name)

    def restart(self) -> float:
        """Stop and start again; returns how long the broker was away, in seconds."""
        started = time.monotonic()
        self.stop()
        self.start()
        return time.monotonic() - started

    def set_up(self) -> None:
        self.start()

    def remove(self) -> None:
        self.stop()
        if self.keep_logs and (self.home / "log").is_dir():
            shutil.copytree(self.home / "log", self.keep_logs, dirs_exist_ok=True)
        shutil.rmtree(self.home, ignore_errors=True)
        if self.record:
            self.record.unlink(missing_ok=True)

    def _tail(self, lines: int = 8) -> str:
        logs = sorted((self.home / "log").glob("*.log")) + [self.home / "server.out"]
        text = ""
        for path in logs:
            try:
                text += path.read_text(errors="replace")
            except OSError:
                continue
        kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
        return " | ".join(kept).replace(self.password, "****") or "(no log output)"


def recorded(run_home: Path) -> tuple[str, Path] | None:
    """The node a run recorded in its own directory (which the caller has checked is ours): its name
    and home, if the home is where this module puts them (a direct child of the temporary directory,
    with our prefix, a real directory and no link)."""
    try:
        entry = json.loads((run_home / RECORD_FILE).read_text())
        name, home = str(entry["name"]), Path(entry["home"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if home.parent != Path(tempfile.gettempdir()) or not home.name.startswith(DIR_PREFIX) \
            or not name.startswith("conveyor-chaos-"):
        return None
    return name, home


def remove_leftover(run_home: Path, name: str, home: Path) -> None:
    """Stop the node a killed run left (by its name, as the run would have; killed if it will not),
    delete its directory and the record. Nothing is read from the node's directory."""
    _run(["rabbitmqctl", "-n", name, "stop"], environment.inherited({"RABBITMQ_CONF_ENV_FILE": os.devnull}), 60)
    marker = f"RABBITMQ_NODENAME={name}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):  # what still runs of it, by its name
        try:
            if marker in environ.read_bytes().split(b"\0"):
                os.kill(int(environ.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue
    try:
        if stat.S_ISDIR(home.lstat().st_mode):  # lstat: a link there is not followed, nor removed
            shutil.rmtree(home, ignore_errors=True)
    except FileNotFoundError:
        pass
    (run_home / RECORD_FILE).unlink(missing_ok=True)


def _run(argv: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess | None:
    """Run a RabbitMQ command line tool; None if it timed out, after killing everything it started."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        proc.communicate()
        return None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything below it. Not killpg: run as root, the RabbitMQ scripts switch user
    with `su`, which puts the Erlang VM in a session (and process group) of its own."""
    children: dict[int, list[int]] = {}
    for proc_stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(proc_stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(proc_stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    tree, todo = [pid], [pid]
    while todo:  # the whole tree first: a killed parent's children are re-parented at once
        for child in children.get(todo.pop(), []):
            tree.append(child)
            todo.append(child)
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _server_user() -> pwd.struct_passwd | None:
    """The user the node will run as, when it is not us: root's rabbitmq-server runs as `rabbitmq`."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("rabbitmq")
    except KeyError:
        return None
