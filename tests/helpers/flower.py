"""Headless Chromium on a page a test serves (Flower's), and Flower's own health check."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

from helpers import unavailable

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                  "--disable-component-update", "--disable-sync", "--disable-quic"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    unavailable("chromium (Debian package chromium)")
    raise AssertionError("unreachable")


def rendered(url: str, profile) -> str:
    """The page's DOM after its scripts ran (virtual time lets the AJAX tables load), in a fresh profile."""
    done = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                           "--dump-dom", url], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def answers(url: str) -> bool:
    """Flower's own health check answers."""
    try:
        with urllib.request.urlopen(f"{url}/healthcheck", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
