"""Opening the record store RECORDS_URL names, once per process: Redis or a SQLite file, behind a
circuit breaker with the config's deadlines (guarded.py). records.py is what a store keeps.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

from celery import Celery
from kombu.utils.url import maybe_sanitize_url, url_to_parts

from conveyor.errors import ConfigError
from conveyor.lifecycle.guarded import GuardedStore
from conveyor.lifecycle.records import Store
from conveyor.settings.config import SideServices
from conveyor.settings.context import maybe_settings_of

OFF = ("", "off", "none")  # RECORDS_URL values that turn records off
_stores: dict[tuple[Any, ...], Store] = {}
_lock = threading.Lock()
# app -> {keep_writes: its store, or None}: store_for runs several times per task in a worker, and
# finding the settings in the app's conf and the store by its key was 4.5 % of a pool process's
# samples (default stack, py-spy). An app's settings are attached once, when it is built.
_by_app: weakref.WeakKeyDictionary[Celery, dict[bool, Store | None]] = weakref.WeakKeyDictionary()


def open_store(url: str, namespace: str = "default", ttl_s: int = 7 * 24 * 3600,
               budget: SideServices | None = None, keep_writes: bool = True) -> Store | None:
    """The store a URL names, one per process, behind a circuit breaker with the budget's deadlines
    (lifecycle/guarded.py); None when records are turned off (RECORDS_URL=off)."""
    if url in OFF:
        return None
    budget = budget or SideServices()
    key = (url, namespace, ttl_s, budget, keep_writes)
    with _lock:
        store = _stores.get(key)
        if store is None:
            if url.startswith(("redis://", "rediss://", "unix://")):
                from conveyor.lifecycle.redis_store import RedisStore

                inner: Store = RedisStore(url, namespace, ttl_s, timeout_s=budget.records_timeout_s)
            elif url.startswith("sqlite:///"):
                from conveyor.lifecycle.sqlite_store import SqliteStore

                # As in SQLAlchemy: sqlite:///relative/file, sqlite:////absolute/file.
                inner = SqliteStore(url.removeprefix("sqlite:///"), ttl_s, busy_s=budget.sqlite_busy_s)
            else:
                raise ConfigError(f"RECORDS_URL {maybe_sanitize_url(url)!r} is none of redis://..., sqlite:///FILE, off")
            store = _stores[key] = GuardedStore(inner, budget.retry_after_s, keep_writes)
    return store


def store_for(app: Celery, keep_writes: bool = True) -> Store | None:
    """The record store of an app built by conveyor.runtime.app.create_app (None for any other app).
    Writes made while it does not answer are kept and written when it does, unless keep_writes is off."""
    resolve = getattr(app, "_get_current_object", None)  # Celery's current_app is a proxy: the app it names
    if resolve is not None:
        app = resolve()
    try:
        return _by_app[app][keep_writes]
    except (KeyError, TypeError):  # TypeError: an object that cannot be weakly referenced
        pass
    both = maybe_settings_of(app)
    if both is None or both.broker.records_url in OFF:
        store = None
    else:
        store = open_store(both.broker.records_url, namespace(both.broker.broker_url), both.config.records_ttl_s,
                           both.config.side_services, keep_writes)
    if both is not None:  # an app without settings yet may get them later
        try:
            _by_app.setdefault(app, {})[keep_writes] = store
        except TypeError:
            pass
    return store


def require_store(app: Celery) -> Store:
    """The store for an operator's command: every call answers now or fails with a RecordStoreError."""
    store = store_for(app, keep_writes=False)
    if store is None:
        raise ConfigError("task records are turned off (RECORDS_URL=off); unset RECORDS_URL or point it at "
                          "redis://... or sqlite:///FILE")
    return store


@functools.lru_cache(maxsize=16)  # parsing the URL was 7 % of a worker's time per no-op task
def namespace(broker_url: str) -> str:
    """Records belong to one broker virtual host: stacks (and test sessions) on different vhosts
    that share one Redis never see each other's tasks."""
    if broker_url.startswith("filesystem:"):
        return "embedded"
    vhost = url_to_parts(broker_url).path
    return vhost if vhost not in (None, "", "/") else "default"
