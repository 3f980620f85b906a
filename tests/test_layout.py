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
