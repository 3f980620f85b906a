"""The one settings object a process runs with, and how code that Celery calls finds it.

`Settings` joins the validated config file and the resolved environment (broker, result backend,
record store, run directory). It is built once, by conveyor.runtime.app.create_app, and kept in the
app's own configuration (Celery's `app.conf`, its mechanism for settings) rather than in attributes
stuck onto the app. The key starts with two underscores, which Celery's remote-control `conf`
command (and so Flower's config tab) leaves out: the broker URL inside holds the password.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conveyor.settings.config import Config
from conveyor.settings.environment import BrokerSettings

CONF_KEY = "__conveyor_settings"


@dataclass(frozen=True)
class Settings:
    config: Config
    broker: BrokerSettings
    # The seam's replacements of library internals are in use (config tuning.fast_paths and
    # CONVEYOR_FAST_PATHS both allow them); off, every one falls back to the library's own code.
    fast_paths: bool = True
    # The decision of broker and stack backend the app was opened with (conveyor.stack.choice's
    # StackChoice), or None for an app built directly.
    choice: Any = None


def attach(app: Any, settings: Settings) -> None:
    app.conf[CONF_KEY] = settings


def settings_of(app: Any) -> Settings:
    """The settings `app` was built with; a KeyError names an app that create_app did not build."""
    return app.conf[CONF_KEY]


def maybe_settings_of(app: Any) -> Settings | None:
    return app.conf.get(CONF_KEY)
