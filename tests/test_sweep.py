"""The chaos leftover sweep (`chaos.py --sweep`, run by `make clean` and by every chaos run) acts
only on run directories of this user's own with mode 0700, and hands no file to a shell."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import ROOT
from conveyor.chaos.node import DIR_PREFIX, RECORD_FILE
from conveyor.chaos.sweep import sweep
from conveyor.settings import environment

NOBODY = 65534


def _gone_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def _run_home(runs: Path, name: str, owner_pid: int, node_home: Path | None = None) -> Path:
    home = runs / name
    home.mkdir(mode=0o700, parents=True)
    (home / "owner").write_text(f"{owner_pid}\n")
    if node_home:
        (home / RECORD_FILE).write_text(json.dumps({"name": f"conveyor-chaos-{name}@localhost", "home": str(node_home)}))
    return home


@pytest.fixture
def node_dirs():
    made: list[Path] = []

    def make() -> Path:
        made.append(Path(tempfile.mkdtemp(prefix=DIR_PREFIX)))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def test_the_sweep_removes_only_what_its_own_runs_that_are_gone_recorded(tmp_path, node_dirs):
    runs = environment.private_dir(tmp_path / "chaos")
    dead_node, live_node, unrecorded = node_dirs(), node_dirs(), node_dirs()
    (unrecorded / "owner").write_text(f"{_gone_pid()}\n")  # the old way of finding a node: no longer trusted
    _run_home(runs, "dead", _gone_pid(), dead_node)
    _run_home(runs, "live", os.getpid(), live_node)
    loose = _run_home(runs, "loose", _gone_pid(), node_dirs())
    loose.chmod(0o755)  # not private: others could have written into it

    removed = sweep(runs)
    assert removed == [f"broker node directory {dead_node}"]
    assert not dead_node.exists() and not (runs / "dead" / RECORD_FILE).exists()
    assert live_node.exists() and unrecorded.exists() and (loose / RECORD_FILE).exists()


def test_a_run_directory_that_links_elsewhere_is_not_followed(tmp_path, node_dirs):
    runs = environment.private_dir(tmp_path / "chaos")
    elsewhere = _run_home(environment.private_dir(tmp_path / "elsewhere"), "target", _gone_pid(), node_dirs())
    (runs / "link").symlink_to(elsewhere)
    assert sweep(runs) == [] and (elsewhere / RECORD_FILE).exists()
    assert sweep(tmp_path / "elsewhere" / "target") == []  # nor a chaos directory that is a run's own


@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's directory needs root")
def test_make_clean_leaves_another_user_s_planted_directories_alone_and_runs_nothing_from_them(tmp_path):
    # Where any user can write: the scripts switch to the rabbitmq user before they source the file.
    drop = Path(tempfile.mkdtemp(prefix="conveyor-test-drop-"))
    drop.chmod(0o777)
    marker = drop / "ran"
    payload = f"touch {marker}\n"  # what RabbitMQ's scripts would run, sourcing rabbitmq-env.conf as shell
    # A broker node directory as the sweep used to find them, planted by nobody, whose "run" is gone.
    planted_node = Path(tempfile.mkdtemp(prefix=DIR_PREFIX))
    run = tmp_path / "run"
    try:
        for name, text in (("owner", f"{_gone_pid()}\n"), ("nodename", "conveyor-chaos-planted@localhost\n"),
                           ("rabbitmq-env.conf", payload), ("node.pid", f"{os.getpid()}\n")):
            (planted_node / name).write_text(text)
        # And a run directory among ours, 0700 but nobody's, recording that node.
        planted_run = _run_home(environment.private_dir(run / "chaos"), "planted", _gone_pid(), planted_node)
        (planted_run / "config.yml").write_text("name: [unclosed\n")
        (planted_run / "rabbitmq-env.conf").write_text(payload)
        for path in (planted_node, *planted_node.iterdir(), planted_run, *planted_run.iterdir()):
            os.chown(path, NOBODY, NOBODY)

        # `make clean` as a user runs it, in a scratch checkout (it removes the checkout's .run).
        checkout = tmp_path / "checkout"
        checkout.mkdir()
        for name in ("Makefile", "scale.py", "chaos.py", "conveyor", "test-config.yml", ".venv"):
            (checkout / name).symlink_to(ROOT / name)
        env = {**os.environ, environment.RUN_DIR_ENV: str(run), "STACK": "local", "BROKER_URL": environment.EMBEDDED_URL}
        done = subprocess.run(["make", "clean"], cwd=checkout, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

        assert not marker.exists(), "a file from a planted directory was run"
        assert sorted(p.name for p in planted_node.iterdir()) == ["node.pid", "nodename", "owner", "rabbitmq-env.conf"]
        assert (planted_run / RECORD_FILE).exists()
        assert "Not sweeping" in done.stderr and str(planted_run) in done.stderr
    finally:
        shutil.rmtree(planted_node, ignore_errors=True)
        shutil.rmtree(drop, ignore_errors=True)
