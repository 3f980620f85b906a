"""The compose override conveyor writes for a config: services of its own, and its code directory.

The compose files define worker-a and worker-b. A config with other services (examples/wordcount:
splitter, counter, merger) gets each as a copy of the files' worker-a with its own WORKER_SERVICE,
and a config with a code_dir gets that directory mounted read-only in every worker container, with
CONVEYOR_CODE_DIR telling the workers where it is. With code_requirements too, the workers run an
image built FROM ours instead (deploy/user.Dockerfile, the base passed as the build argument
BASE_IMAGE), with code_dir copied in and its requirements installed; the override then also holds
`conveyor-base`, a service that is never started, only built: our image, which that one is FROM. The copy is taken from the compose file's own
text, not from `compose config`, so `${...}` placeholders (the broker's credentials among them) stay
placeholders: the generated file holds no secret. Compose reads relative paths of every file
relative to the first one, so the copied ones keep their meaning.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import yaml

from conveyor.errors import StackError
from conveyor.settings.config import CODE_DIR_ENV, Config
from conveyor.settings.environment import PROJECT_ROOT

log = logging.getLogger(__name__)

TEMPLATE_SERVICE = "worker-a"  # the service of the compose files a new service is a copy of
CONTAINER_CODE_DIR = "/opt/conveyor/code"  # where code_dir is mounted in a worker container
BASE_SERVICE = "conveyor-base"  # builds our image, for the user's image to be built FROM it
USER_DOCKERFILE = PROJECT_ROOT / "deploy" / "user.Dockerfile"


def services_of(files: list[Path]) -> dict[str, Any]:
    """The services the compose files define, as written (anchors and merge keys resolved)."""
    found: dict[str, Any] = {}
    for file in files:
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise StackError(f"cannot read the compose file {file}: {exc}") from None
        found.update(data.get("services") or {})
    return found


def override(files: list[Path], config: Config) -> dict[str, Any] | None:
    """The override for `config` on top of `files`, or None when the files serve it as they are."""
    defined = services_of(files)
    code = config.code_path
    services: dict[str, Any] = {}
    for svc in config.services:
        if svc.name in defined:
            entry: dict[str, Any] = {}
        elif TEMPLATE_SERVICE in defined:
            entry = copy.deepcopy(defined[TEMPLATE_SERVICE])
            entry["environment"] = {**_environment(entry.get("environment")), "WORKER_SERVICE": svc.name}
        else:
            raise StackError(f"service {svc.name!r} of the config is not defined in {', '.join(f.name for f in files)}, "
                             f"and there is no {TEMPLATE_SERVICE} service there to copy it from")
        if code is not None and config.code_requirements:
            entry.update(_user_image(defined, code, config.code_requirements))
        elif code is not None:
            entry["environment"] = {**_environment(entry.get("environment")), CODE_DIR_ENV: CONTAINER_CODE_DIR}
            entry["volumes"] = [*(entry.get("volumes") or []), f"{code}:{CONTAINER_CODE_DIR}:ro"]
        if entry:
            services[svc.name] = entry
    if code is not None and config.code_requirements:
        template = _template(defined, files)
        services[BASE_SERVICE] = {"build": template["build"], "image": template["image"], "profiles": ["build"]}
    return {"services": services} if services else None


def _template(defined: dict[str, Any], files: list[Path]) -> dict[str, Any]:
    template = defined.get(TEMPLATE_SERVICE) or {}
    if "build" not in template or "image" not in template:
        raise StackError(f"the {TEMPLATE_SERVICE} service of {', '.join(f.name for f in files)} needs `build` and "
                         "`image`: the image with the config's code is built FROM it")
    return template


def _user_image(defined: dict[str, Any], code: Path, requirements: str) -> dict[str, Any]:
    """What makes a worker service run the image with the user's code: FROM ours (its tag as the
    compose files write it, placeholders and all), tagged after it."""
    template = _template(defined, [])
    build = template["build"] if isinstance(template["build"], dict) else {}
    return {
        "image": f"{template['image']}-code",
        "build": {"context": str(code), "dockerfile": str(USER_DOCKERFILE),
                  **({"network": build["network"]} if "network" in build else {}),
                  "args": {"BASE_IMAGE": template["image"], "REQUIREMENTS": requirements}},
    }


def write(files: list[Path], config: Config, path: Path) -> Path | None:
    """Write the override to `path` (None, and no file, when none is needed)."""
    content = override(files, config)
    if content is None:
        path.unlink(missing_ok=True)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Written by conveyor for {config.source or 'the config'}; rewritten by every compose command.\n"
    path.write_text(header + yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    log.debug("Wrote the compose override %s.", path)
    return path


def _environment(raw: Any) -> dict[str, Any]:
    """A service's environment as a mapping (compose also accepts a list of KEY=VALUE)."""
    if isinstance(raw, dict):
        return dict(raw)
    return dict(item.split("=", 1) if "=" in item else (item, None) for item in raw or [])
