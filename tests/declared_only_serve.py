"""``llava-next serve`` as ``pip install "llava-next-plugin[serve]"`` installs it, without a fresh venv: our own
code may import only the standard library, our two packages, and the modules of the distributions that
``pyproject.toml`` declares for it (the plugin's dependencies, the SDK's, the ``serve`` extra's). Any other
import made by our code fails with ``ModuleNotFoundError``, as it would on a clean install, even when the dev
extra has installed the module or another library has loaded it already.

    python tests/declared_only_serve.py --model PATH --port N ...   (the arguments of ``llava-next serve``)
"""

from __future__ import annotations

import builtins
import importlib.metadata
import sys

from test_dependencies import OWN, ROOT, _declared

EXTRAS = ("serve",)


def allowed_modules() -> set[str]:
    """Top-level modules our code may import in a ``[serve]`` install (see the module docstring)."""
    core, extras = _declared(ROOT / "pyproject.toml")
    sdk_core, _ = _declared(ROOT / "sdk" / "pyproject.toml")
    dists = core | sdk_core | {d for extra in EXTRAS for d in extras[extra]}
    provided = importlib.metadata.packages_distributions()
    own_dists = {module for module, names in provided.items() if {n.lower().replace("_", "-") for n in names} & dists}
    return own_dists | set(sys.stdlib_module_names) | OWN


def block_undeclared_imports() -> None:
    """Make every import by our own code of a module :func:`allowed_modules` leaves out fail."""
    allowed = allowed_modules()
    real_import = builtins.__import__

    def guarded(name, globals=None, locals=None, fromlist=(), level=0):
        importer = (globals or {}).get("__name__") or ""
        if level == 0 and importer.split(".")[0] in OWN and name.split(".")[0] not in allowed:
            raise ModuleNotFoundError(
                f"{importer} imports {name!r}, which a [serve] install does not bring; declare it in pyproject.toml",
                name=name,
            )
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded


if __name__ == "__main__":
    block_undeclared_imports()
    from llava_next_plugin import serve_cli

    sys.exit(serve_cli.main(sys.argv[1:]))
