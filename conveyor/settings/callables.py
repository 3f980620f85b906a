"""Finding the user's code a config names: `package.module:function` callables and exception names.

Each lookup imports the module with the config's code_dir first on sys.path, and says in a sentence
what is wrong (no such module, no such attribute, not a function), for the config loader to turn into
an error naming the file, the line and the field.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A callable is named `package.module:function`: the colon says where the module ends, as in
# entry points, so that an attribute is never mistaken for a submodule.
CALLABLE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"


class LookupProblem(Exception):
    """What is wrong with a name the config gives; the message is a sentence for the user."""


def add_to_path(directory: Path | None) -> None:
    """Put the user's code directory first on sys.path (once), as the workers and the dispatcher both need."""
    if directory is None:
        return
    entry = str(directory)
    if entry not in sys.path:
        sys.path.insert(0, entry)
        importlib.invalidate_caches()
        log.debug("Added %s to the import path.", entry)


def _import(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise LookupProblem(f"{spec}: there is no module {exc.name!r} (looked for on code_dir and the installed packages)") from None
        raise LookupProblem(f"{spec}: importing {module_name} failed: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # the user's module raised while being imported: say what, not a traceback
        raise LookupProblem(f"{spec}: importing {module_name} failed: {type(exc).__name__}: {exc}") from None


def function(spec: str) -> Any:
    """The function `package.module:function` names."""
    module_name, _, attr = spec.partition(":")
    module = _import(module_name, spec)
    try:
        found = getattr(module, attr)
    except AttributeError:
        raise LookupProblem(f"{spec}: module {module_name} has no attribute {attr!r}") from None
    if hasattr(found, "run") and hasattr(found, "apply_async"):
        raise LookupProblem(f"{spec} is already a Celery task (decorated with @task); conveyor makes the task "
                            "itself: name the plain function, without the decorator")
    if not inspect.isfunction(found):
        raise LookupProblem(f"{spec} is {_kind(found)}, not a function")
    return found


def exception(spec: str) -> type[BaseException]:
    """An exception class: a builtin name (`TimeoutError`) or `package.module:Name` (or `package.module.Name`)."""
    if ":" not in spec and "." not in spec:
        found = getattr(builtins, spec, None)
        if found is None:
            raise LookupProblem(f"{spec!r} is not a builtin exception; name others as package.module:Name")
    else:
        module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
        module = _import(module_name, spec)
        found = getattr(module, attr, None)
        if found is None:
            raise LookupProblem(f"{spec}: module {module_name} has no attribute {attr!r}")
    if not (isinstance(found, type) and issubclass(found, Exception)):
        raise LookupProblem(f"{spec} is {_kind(found)}, not an exception class")
    return found


def _kind(obj: Any) -> str:
    if isinstance(obj, type):
        return f"a class ({obj.__name__})"
    if inspect.ismodule(obj):
        return "a module"
    if inspect.isroutine(obj):
        return "a function"
    kind = type(obj).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} ({obj!r:.40})"
