"""A clean install works: every third-party module our packages import at run time is provided by a
distribution that ``pyproject.toml`` declares (for the plugin: its dependencies, the SDK's, and the
extra a module belongs to; the dev extra never counts). Cheap and CI-proof: the imports are read from
the source with ``ast`` and mapped to distributions with ``importlib.metadata``, no fresh venv needed."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OWN = {"llava_next_plugin", "llava_next_sdk"}

# Plugin modules that belong to an extra: their imports may come from it too.
EXTRA_OF_MODULE = {
    "llava_next_plugin/server.py": {"serve"},
    "llava_next_plugin/serve_cli.py": {"serve"},
    "llava_next_plugin/tiny.py": {"demo"},
    "llava_next_plugin/distributed.py": {"ray"},
}
# Imported only when the caller already runs it, so it is there whenever the import runs.
IMPORTED_ONLY_WHEN_IN_USE = {
    ("llava_next_sdk/images.py", "numpy"): "encodes a numpy array the caller passed",
}


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _declared(pyproject: Path) -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads(pyproject.read_text())["project"]
    core = {_dist_name(r) for r in project.get("dependencies", [])}
    extras = {name: {_dist_name(r) for r in reqs} for name, reqs in project.get("optional-dependencies", {}).items()}
    return core, extras


def _runtime_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports in *path*, except those under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in OWN}


def _undeclared(package_dir: Path, allowed_for) -> list[str]:
    providers = importlib.metadata.packages_distributions()
    problems = []
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(package_dir.parent).as_posix()
        allowed = allowed_for(relative)
        for module in sorted(_runtime_imports(path)):
            if (relative, module) in IMPORTED_ONLY_WHEN_IN_USE:
                continue
            dists = {d.lower().replace("_", "-") for d in providers.get(module, ())}
            if not dists:
                problems.append(f"{relative}: imports {module!r}, which no installed distribution provides")
            elif not dists & allowed:
                problems.append(
                    f"{relative}: imports {module!r} (from {', '.join(sorted(dists))}), "
                    f"which its pyproject.toml does not declare"
                )
    return problems


def test_every_module_the_sdk_imports_is_a_declared_dependency_of_the_sdk():
    core, extras = _declared(ROOT / "sdk" / "pyproject.toml")
    assert not _undeclared(ROOT / "sdk" / "llava_next_sdk", lambda module: core)


def test_every_module_the_plugin_imports_is_declared_by_the_plugin_or_the_extra_it_belongs_to():
    core, extras = _declared(ROOT / "pyproject.toml")
    sdk_core, _ = _declared(ROOT / "sdk" / "pyproject.toml")
    assert "llava-next-sdk" in core  # so the SDK's own dependencies come with the plugin

    def allowed(module: str) -> set[str]:
        return core | sdk_core | {d for extra in EXTRA_OF_MODULE.get(module, ()) for d in extras.get(extra, ())}

    assert not _undeclared(ROOT / "llava_next_plugin", allowed)


def test_the_check_sees_an_import_that_only_the_dev_extra_provides(tmp_path):
    """The check itself: a module importing what only ``dev`` brings (hypothesis) is reported."""
    core, extras = _declared(ROOT / "pyproject.toml")
    assert "hypothesis" in extras["dev"]
    package = tmp_path / "llava_next_plugin"
    package.mkdir()
    (package / "bad.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torchvision\ndef f():\n    import hypothesis\n"
    )
    problems = _undeclared(package, lambda module: core)
    assert len(problems) == 1 and "'hypothesis'" in problems[0]
