"""The two distributions depend one way: llava-next-plugin uses llava-next-sdk, never the reverse.

The SDK finds the plugin's in-process transport by entry point (group ``llava_next_sdk.transports``,
name ``local``) and imports it only when a client first runs a local model. Run this module to see the
import graph checked: ``python3 -m pytest tests/test_layering.py -q``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SDK = REPO / "sdk" / "llava_next_sdk"


def sdk_modules() -> list[str]:
    return sorted(
        ".".join(path.relative_to(SDK.parent).with_suffix("").parts).removesuffix(".__init__")
        for path in SDK.rglob("*.py")
    )


def imported_names(path: Path) -> set[str]:
    """Every absolute module name an ``import`` or ``from ... import`` in *path* names (at any depth)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_sdk_source_imports_the_plugin():
    offenders = {
        str(path.relative_to(REPO)): sorted(n for n in imported_names(path) if n.split(".")[0] == "llava_next_plugin")
        for path in SDK.rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_sdk_imports_whole_with_the_plugin_refused():
    """Every SDK module imports in a process where importing llava_next_plugin raises, and none pulls it in."""
    code = f"""
import importlib, sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "llava_next_plugin":
            raise ModuleNotFoundError(f"refused: {{name}}", name=name)

sys.meta_path.insert(0, Refuse())
for module in {sdk_modules()!r}:
    importlib.import_module(module)
from llava_next_sdk.plugins import get_plugin_manager
manager = get_plugin_manager()
print("plugin modules:", sorted(m for m in sys.modules if m.split(".")[0] == "llava_next_plugin"))
print("failed plugins:", [f.name for f in manager.failed_plugins])
"""
    env = dict(os.environ, PYTHONPATH=str(REPO / "sdk"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "plugin modules: []" in done.stdout
    assert "failed plugins: []" in done.stdout


def test_the_sdk_distribution_does_not_depend_on_the_plugin():
    project = tomllib.loads((REPO / "sdk" / "pyproject.toml").read_text())["project"]
    requirements = [
        *project.get("dependencies", ()),
        *(r for extra in project.get("optional-dependencies", {}).values() for r in extra),
    ]
    assert not [r for r in requirements if r.replace("_", "-").startswith("llava-next-plugin")]
    plugin = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(r.startswith("llava-next-sdk") for r in plugin["dependencies"])  # the one direction


def test_the_plugin_declares_its_local_transport_as_an_entry_point():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert declared["llava_next_sdk.transports"] == {"local": "llava_next_plugin.local_transport"}


def test_the_installed_metadata_offers_the_local_transport_to_the_sdk():
    """What the SDK reads at run time (reinstall the package after changing entry points:
    ``pip install --no-deps -e . -e sdk``)."""
    found = importlib.metadata.entry_points(group="llava_next_sdk.transports", name="local")
    assert [(ep.value, ep.dist.metadata["Name"]) for ep in found] == [
        ("llava_next_plugin.local_transport", "llava-next-plugin")
    ]
    module = next(iter(found)).load()
    assert type(module.llava_next_sdk_transport(url="local:some/model", options={})).__name__ == "LocalTransport"
    assert module.llava_next_sdk_transport(url="http://127.0.0.1:9/v1", options={}) is None


def test_a_client_for_a_local_model_is_built_without_importing_the_plugin():
    """Building the client only reads metadata: the import (torch) waits for the first request."""
    code = (
        "import sys\nfrom llava_next_sdk import AsyncClient\n"
        "client = AsyncClient(model='some/model')\n"
        "print(type(client.transport).__name__, 'llava_next_plugin' in sys.modules, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["DeferredTransport", "False", "False"]


def test_each_version_is_written_once_and_read_from_the_metadata():
    import llava_next_sdk

    import llava_next_plugin

    assert llava_next_sdk.__version__ == importlib.metadata.version("llava-next-sdk")
    assert llava_next_plugin.__version__ == importlib.metadata.version("llava-next-plugin")


def test_a_loaded_provider_still_counts_as_installed():
    """Two threads building clients at once: one may register the provider between the other's hook call
    and its provider check. The provider must still be found then, so that client waits for the import
    (a DeferredTransport) instead of saying the model package is not installed."""
    code = (
        "from llava_next_sdk.plugins import get_plugin_manager\n"
        "manager = get_plugin_manager()\n"
        "before = [ep.name for ep in manager.transport_providers('local')]\n"
        "manager.load_transport_providers('local')\n"
        "after = [ep.name for ep in manager.transport_providers('local')]\n"
        "print(before, after)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["['local']", "['local']"]


def test_a_transport_plugin_the_user_registered_keeps_winning_once_our_provider_has_loaded():
    """The README: an explicitly registered plugin wins over ours. Our local provider, loaded at a client's first
    request, goes beneath the plugins registered before it, so which one answers does not depend on whether
    another client happened to load it first."""
    code = (
        "from llava_next_sdk import AsyncClient\n"
        "from llava_next_sdk.hookspecs import hookimpl\n"
        "from llava_next_sdk.plugins import get_plugin_manager\n"
        "class Mine:\n"
        "    async def generate(self, request): ...\n"
        "    def stream(self, request): ...\n"
        "    async def aclose(self): ...\n"
        "class MyLocalModels:\n"
        "    @hookimpl\n"
        "    def llava_next_sdk_transport(self, url, options):\n"
        "        return Mine() if url.startswith('local:mine-') else None\n"
        "manager = get_plugin_manager()\n"
        "manager.register(MyLocalModels(), name='mine')\n"
        "before = type(AsyncClient(model='mine-1').transport).__name__\n"
        "manager.load_transport_providers('local')\n"
        "print(before, type(AsyncClient(model='mine-1').transport).__name__)\n"
        "print([i.plugin_name for i in manager.hook.llava_next_sdk_transport.get_hookimpls()[::-1]])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first, order = done.stdout.splitlines()
    assert first == "Mine Mine"
    names = ast.literal_eval(order)
    assert (
        names.index("mine")
        < names.index("llava_next_sdk.transports:local")
        < names.index("llava_next_sdk.transports.http")
    )
