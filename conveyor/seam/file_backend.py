"""Celery's file:// result backend (the embedded default), with results written atomically.

Celery's FilesystemBackend writes a result file in place, so a caller polling for it can read a
half-written file and fail to decode it (seen here under load: JSONDecodeError in the dispatcher).
Writing a temporary file and renaming it over the target makes each result appear whole or not at
all: os.replace is atomic on POSIX within one filesystem.
"""

from __future__ import annotations

import os

from celery.backends.filesystem import FilesystemBackend
from kombu.utils.encoding import ensure_bytes

from conveyor.seam.runtime_meta import RuntimeMeta


class AtomicFilesystemBackend(RuntimeMeta, FilesystemBackend):
    def set(self, key, value) -> None:
        path = os.fsdecode(self._filename(key))
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "wb") as outfile:
            outfile.write(ensure_bytes(value))
        os.replace(temporary, path)
