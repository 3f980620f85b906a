"""The package's layout, as issue 11 set it: few root modules, the environment read in one place,
every subpackage saying what it owns and may import. The layers themselves, the seam and the
absence of import cycles are import-linter's contracts (pyproject.toml), run by `make test`."""

from __future__ import annotations

import ast

from helpers import ROOT

PACKAGE = ROOT / "conveyor"
ENV_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def test_the_package_root_keeps_at_most_six_modules():
    root_modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root_modules) <= 6, root_modules


def test_every_subpackage_says_what_it_owns_and_what_it_may_import():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc or "may import" in doc, f"{init.relative_to(ROOT)}: no 'May import' in its docstring"


def _environment_uses(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ENV_NAMES and isinstance(node.value, ast.Name) \
                and node.value.id == "os":
            yield node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and {a.name for a in node.names} & ENV_NAMES:
            yield node.lineno


def test_the_environment_is_read_only_in_conveyor_settings():
    found = [f"{path.relative_to(ROOT)}:{line}" for path in sorted(PACKAGE.rglob("*.py"))
             if "settings" not in path.relative_to(PACKAGE).parts[:1]
             for line in _environment_uses(path)]
    assert not found, "os.environ outside conveyor/settings (use conveyor.settings.environment): " + ", ".join(found)


def test_the_check_would_see_a_read(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom os import getenv\nx = os.environ.get('A')\n")
    assert list(_environment_uses(probe)) == [2, 3]


def _module_attribute_uses(path):
    """(line, module, attribute) for every `alias.attr` where alias names a conveyor module imported
    with `from conveyor[.x] import module` or `import conveyor.x as alias`."""
    import importlib

    tree = ast.parse(path.read_text(), str(path))
    modules = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "conveyor":
            for alias in node.names:
                try:  # a submodule, or else a name that may be one
                    value = importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    value = getattr(importlib.import_module(node.module), alias.name, None)
                if isinstance(value, type(ast)):
                    modules[alias.asname or alias.name] = value
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            yield node.lineno, modules[node.value.id], node.attr


def test_scripts_outside_the_package_use_only_names_the_package_has():
    """The benchmark scripts and the top-level CLIs are not imported by any test that runs them to
    the end: a name that moved in the package must fail here, not halfway through `make bench`."""
    scripts = [*sorted((ROOT / "bench").glob("*.py")), *sorted(ROOT.glob("*.py"))]
    missing = [f"{path.relative_to(ROOT)}:{line}: {module.__name__}.{attr}"
               for path in scripts for line, module, attr in _module_attribute_uses(path)
               if not hasattr(module, attr)]
    assert not missing, "names the package does not have: " + ", ".join(missing)
