"""The credentials of the RabbitMQ that docker-compose.yml brings when the machine has no broker.

Generated on first use and kept in one file only the user can read (mode 0600, under the run
directory, per compose project), then reused: RabbitMQ creates its user from RABBITMQ_DEFAULT_USER
and RABBITMQ_DEFAULT_PASS only when its data volume is new, so the same pair must come back every
time. RABBITMQ_USER and RABBITMQ_PASSWORD in the environment take precedence (the pair a user chose).
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from conveyor.settings.environment import run_dir
from conveyor.errors import StackError
from conveyor.settings.environment import PROCESS_ENV

log = logging.getLogger(__name__)

USER_ENV, PASSWORD_ENV, PORT_ENV = "RABBITMQ_USER", "RABBITMQ_PASSWORD", "RABBITMQ_PORT"
GENERATED_USER = "conveyor"


@dataclass(frozen=True)
class BrokerCredentials:
    user: str
    password: str
    source: str  # where they came from, for messages: the file or "the environment"

    def compose_env(self) -> dict[str, str]:
        """What docker-compose.yml interpolates for its broker and workers."""
        return {USER_ENV: self.user, PASSWORD_ENV: self.password}

    def url(self, env: Mapping[str, str] = PROCESS_ENV) -> str:
        """How this machine reaches the compose broker: the port docker-compose.yml publishes on loopback."""
        port = env.get(PORT_ENV, "").strip() or "5672"
        return f"amqp://{quote(self.user, safe='')}:{quote(self.password, safe='')}@127.0.0.1:{port}//"


def path(project: str, env: Mapping[str, str] = PROCESS_ENV) -> Path:
    return run_dir(env) / "compose" / f"{project}-broker.env"


def load(project: str, env: Mapping[str, str] = PROCESS_ENV) -> BrokerCredentials | None:
    """The credentials in use for the project's broker, or None when none were made yet."""
    user, password = env.get(USER_ENV, "").strip(), env.get(PASSWORD_ENV, "").strip()
    if user and password:
        return BrokerCredentials(user, password, "the environment")
    file = path(project, env)
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StackError(f"{file} holds the broker's password but other users can read it; run `chmod 600 {file}`")
    values = dict(line.split("=", 1) for line in file.read_text().splitlines() if "=" in line)
    if not values.get(USER_ENV) or not values.get(PASSWORD_ENV):
        raise StackError(f"{file} lacks {USER_ENV} or {PASSWORD_ENV}; delete it together with the broker's volume "
                         "to start the compose broker afresh")
    return BrokerCredentials(values[USER_ENV], values[PASSWORD_ENV], str(file))


def ensure(project: str, env: Mapping[str, str] = PROCESS_ENV) -> BrokerCredentials:
    """The project's credentials, generated (once) when there are none yet."""
    found = load(project, env)
    if found:
        return found
    file = path(project, env)
    file.parent.mkdir(parents=True, exist_ok=True)
    made = BrokerCredentials(GENERATED_USER, secrets.token_urlsafe(24), str(file))
    # Written whole to a private temporary file (mkstemp makes it 0600), then linked into place: the
    # password is never readable by others, and of two commands starting at once one links, the other
    # finds the file complete and uses that pair.
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".broker-env-")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(f"{USER_ENV}={made.user}\n{PASSWORD_ENV}={made.password}\n")
        try:
            os.link(tmp, file)
        except FileExistsError:
            return ensure(project, env)  # the other command's pair, now complete
    finally:
        os.unlink(tmp)
    log.info("Generated credentials for the compose broker in %s.", file)
    return made
