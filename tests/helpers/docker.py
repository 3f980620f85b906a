"""Docker helpers for the tests: the test image's names and the compose project's leftovers."""

from __future__ import annotations

import subprocess

from helpers import ROOT

OFFLINE_SCRIPT = ROOT.parent / "shared" / "ci" / "docker-offline.sh"
TEST_IMAGE = "conveyor-worker:test"
BASE_IMAGE = "python:3.11-slim"


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def image_id(name: str) -> str | None:
    done = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", name], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def project_containers(project: str) -> list[str]:
    out = subprocess.run(["docker", "ps", "--all", "--quiet", "--filter", f"label=com.docker.compose.project={project}"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def project_networks(project: str) -> list[str]:
    out = subprocess.run(["docker", "network", "ls", "--quiet", "--filter", f"label=com.docker.compose.project={project}"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()
