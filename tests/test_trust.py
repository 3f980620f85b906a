"""The trust boundary (docs/reliability.md): where credentials go, which stores are picked, and
what the run directory lets others see."""

from __future__ import annotations

import http.server
import os
import stat
import threading
import urllib.error

import pytest

from conveyor.amqp import queues
from conveyor.lifecycle import stores
from conveyor.settings import environment
from conveyor.tasks.states import TaskState


def test_the_management_api_gets_credentials_only_at_the_broker_s_host_and_over_https_for_amqps():
    env: dict[str, str] = {}
    assert queues.management_url("amqp://u:p@127.0.0.1:5672//", env) == "http://127.0.0.1:15672"
    assert queues.management_url("amqps://u:p@rabbit.example:5671/v", env) == "https://rabbit.example:15671"
    assert queues.management_url("amqp://u:p@rabbit.example/v", env) == "http://rabbit.example:15672"
    env[environment.MANAGEMENT_URL_ENV] = "https://mgmt.example:8443/"  # the operator's explicit choice
    assert queues.management_url("amqps://u:p@rabbit.example/v", env) == "https://mgmt.example:8443"


def test_a_management_api_redirect_is_not_followed_with_the_credentials(monkeypatch):
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (http.server's name)
            seen.append(self.headers.get("Authorization"))
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/elsewhere")
            self.end_headers()

        def log_message(self, *_args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv(environment.MANAGEMENT_URL_ENV, f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(urllib.error.HTTPError, match="302"):
            queues.management_request("amqp://u:secret@127.0.0.1//", "overview")
    finally:
        server.shutdown()
    assert len(seen) == 1  # the redirect's target never got a request, let alone the credentials


def test_the_run_directory_is_private_and_records_default_to_a_private_local_file(tmp_path):
    root = tmp_path / "run"
    settings = environment.resolve({"BROKER_URL": environment.EMBEDDED_URL, environment.RUN_DIR_ENV: str(root)})
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert settings.records_url == f"sqlite:///{root / 'records.sqlite3'}"
    store = stores.open_store(settings.records_url)
    store.transition("t1", TaskState.QUEUED)
    for path in root.glob("records.sqlite3*"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    environment.private_dir(loose)  # an existing run directory of ours is tightened
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700
