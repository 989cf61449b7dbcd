"""The extension points: hookspecs, the plugin manager, entry-point discovery, overriding, broken plugins.

The third-party plugins are real packages under ``tests/plugins/`` (each with a pyproject and an entry
point in the group ``llava_next_plugin``). The tests install them offline the way pip would lay them
out (the package plus a ``*.dist-info`` with ``entry_points.txt``) into a folder on ``sys.path``; no test
imports them: the manager finds them through ``importlib.metadata``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import llava_next_sdk.hookspecs as hookspecs
import pluggy
import pytest
from llava_next_sdk import plugins
from PIL import Image

import llava_next_plugin.hooks as hooks
from llava_next_plugin.errors import ImageError, InputError
from llava_next_plugin.images import load_image
from llava_next_plugin.prompts import build_prompt

PLUGIN_PROJECTS = Path(__file__).parent / "plugins"
REPO = Path(__file__).parent.parent
HOOK_NAMES = sorted(name for name in dir(hookspecs) if name.startswith("llava_next_"))


def install_offline(project: Path, site: Path) -> None:
    """Lay *project* out in *site* as ``pip install --no-deps --target`` does: its package folders and a
    dist-info whose ``entry_points.txt`` is written from the project's pyproject."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    dist_info = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    lines = []
    for group, entry_points in meta.get("entry-points", {}).items():
        lines += [f"[{group}]", *(f"{name} = {target}" for name, target in entry_points.items()), ""]
    (dist_info / "entry_points.txt").write_text("\n".join(lines))
    for package in project.iterdir():
        if (package / "__init__.py").is_file():
            shutil.copytree(package, site / package.name)


def _site_with(tmp_path: Path, *projects: str):
    site = tmp_path / "site-packages"
    for project in projects:
        install_offline(PLUGIN_PROJECTS / project, site)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    return site


def _uninstall(site: Path, *modules: str) -> None:
    sys.path.remove(str(site))
    for module in modules:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", plugins.PluginLoadWarning)
        hooks.get_plugin_manager(refresh=True)


@pytest.fixture
def example_plugin(tmp_path):
    """The example plugin installed (not imported); the process-wide manager rebuilt around it."""
    site = _site_with(tmp_path, "llava-next-example-plugin")
    yield site
    _uninstall(site, "llava_next_example_plugin")


@pytest.fixture
def example_and_broken_plugins(tmp_path):
    site = _site_with(tmp_path, "llava-next-example-plugin", "llava-next-broken-plugin")
    yield site
    _uninstall(site, "llava_next_example_plugin", "llava_next_broken_plugin")


@pytest.fixture
def fresh_manager():
    """A freshly built process-wide manager, rebuilt again afterwards so explicit registrations do not leak."""
    manager = hooks.get_plugin_manager(refresh=True)
    yield manager
    hooks.get_plugin_manager(refresh=True)


# --- the hookspecs ---------------------------------------------------------------------------------


def test_every_extension_point_is_documented_and_reexported():
    assert HOOK_NAMES == [
        "llava_next_after_generate",
        "llava_next_before_generate",
        "llava_next_load_image",
        "llava_next_prompt_format",
        "llava_next_render_attention_mask",
        "llava_next_sdk_transport",
    ]
    manager = plugins.PluginManager()
    for name in HOOK_NAMES:
        spec = getattr(hookspecs, name)
        doc = spec.__doc__ or ""
        assert "Called" in doc, f"{name} does not say when it is called"
        assert ":param" in doc, f"{name} does not document its arguments"
        first_result = getattr(manager.hook, name).spec.opts["firstresult"]
        assert ("first non-None result wins" in doc) == first_result, name
        if not first_result:
            assert "Every plugin is called" in doc, name
        assert getattr(hooks, name) is spec  # llava_next_plugin.hooks exposes the same specs
    assert hooks.hookimpl is hookspecs.hookimpl and hooks.PROJECT_NAME == "llava_next_plugin"


def test_builtins_are_plugins_of_the_same_hooks(fresh_manager):
    names = [name for name, _ in fresh_manager.list_name_plugin()]
    assert "llava_next_plugin.images" in names and "llava_next_plugin.prompts" in names
    assert set(hooks.BUILTIN_PLUGINS) >= {"llava_next_plugin.images", "llava_next_plugin.prompts"}
    assert fresh_manager is plugins.get_plugin_manager()  # one manager for the SDK and the model package
    image_sources = [impl.plugin_name for impl in fresh_manager.hook.llava_next_load_image.get_hookimpls()]
    prompt_formats = [impl.plugin_name for impl in fresh_manager.hook.llava_next_prompt_format.get_hookimpls()]
    assert "llava_next_plugin.images" in image_sources
    assert "llava_next_plugin.prompts" in prompt_formats
    assert fresh_manager.failed_plugins == []


# --- third-party plugins found by entry point ------------------------------------------------------


def test_installed_plugin_is_found_without_being_imported(example_plugin):
    assert "llava_next_example_plugin" not in sys.modules
    manager = hooks.get_plugin_manager(refresh=True)
    assert "llava_next_example_plugin" in sys.modules
    assert manager.get_plugin("example") is sys.modules["llava_next_example_plugin"]

    image = load_image("example://teal?size=5x3")
    assert image.size == (5, 3) and image.mode == "RGB"
    assert image.getpixel((4, 2)) == (0, 128, 128)
    # The built-in sources still answer for everything else.
    assert load_image(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_installed_plugin_adds_a_prompt_family(example_plugin):
    hooks.get_plugin_manager(refresh=True)
    assert build_prompt("What is it?", None, None, family="plain") == "<image>\nWhat is it?\nAnswer:"
    # A text backbone our built-ins cannot place is placed by the plugin.
    config = {"text_config": {"model_type": "plain-lm"}}
    assert build_prompt("Describe.", None, config, num_images=2) == "<image>\n<image>\nDescribe.\nAnswer:"
    # Built-in families are untouched.
    assert build_prompt("Q", None, None, family="mistral") == "[INST] <image>\nQ [/INST]"


def test_without_the_plugin_its_sources_and_family_are_clear_errors(fresh_manager):
    with pytest.raises(ImageError, match=r"no image source handles the URL scheme 'example://'"):
        load_image("example://teal", index=0)
    with pytest.raises(InputError, match=r"unknown prompt family 'plain'; accepted: mistral, vicuna, llama3, chatml"):
        build_prompt("Q", None, None, family="plain")


def test_broken_plugin_is_reported_by_name_and_others_still_load(example_and_broken_plugins):
    with pytest.warns(plugins.PluginLoadWarning) as caught:
        manager = hooks.get_plugin_manager(refresh=True)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "llava-next plugin 'broken'" in messages[0]
    assert "entry point 'broken = llava_next_broken_plugin' of llava-next-broken-plugin 0.1.0" in messages[0]
    assert "ModuleNotFoundError" in messages[0] and "llava_next_dependency_that_is_not_installed" in messages[0]
    assert [failure.name for failure in manager.failed_plugins] == ["broken"]
    assert isinstance(manager.failed_plugins[0].error, ModuleNotFoundError)
    assert manager.get_plugin("broken") is None
    # The example plugin and the built-ins work as usual.
    assert load_image("example://red").getpixel((0, 0)) == (255, 0, 0)
    assert build_prompt("Q", None, {"text_config": {"model_type": "mistral"}}) == "[INST] <image>\nQ [/INST]"


def test_autoload_can_be_switched_off(example_plugin, monkeypatch):
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    manager = hooks.get_plugin_manager(refresh=True)
    assert manager.get_plugin("example") is None
    assert "llava_next_plugin.images" in manager.builtin_names


# --- explicit registration and overriding built-ins -----------------------------------------------


class GrayscaleBytes:
    """A user plugin replacing the built-in bytes source: bytes become a 3x3 image of the first byte."""

    @hooks.hookimpl
    def llava_next_load_image(self, source, timeout):
        if isinstance(source, bytes):
            return Image.new("L", (3, 3), source[0])
        return None


class ShortMistral:
    """A user plugin replacing the built-in mistral format."""

    @hooks.hookimpl
    def llava_next_prompt_format(self, family, model_type, tokenizer):
        return (
            "{% for m in messages %}{{ m['content'] | map(attribute='type') | join(',') }}{% endfor %}"
            if family == "mistral"
            else None
        )


def test_user_plugin_registered_later_overrides_a_builtin(fresh_manager):
    with pytest.raises(ImageError):
        load_image(b"\x05 not an image")  # the built-in refuses undecodable bytes
    user = GrayscaleBytes()
    fresh_manager.register(user, name="grayscale-bytes")
    image = load_image(b"\x05 not an image")
    assert image.size == (3, 3) and image.getpixel((1, 1)) == (5, 5, 5)
    assert load_image(Image.new("RGB", (1, 1))).size == (1, 1)  # other sources untouched

    fresh_manager.register(ShortMistral(), name="short-mistral")
    assert build_prompt("Q", None, None, family="mistral") == "image,text"
    assert build_prompt("Q", None, None, family="chatml").startswith("<|im_start|>user")

    fresh_manager.unregister(user)
    with pytest.raises(ImageError):
        load_image(b"\x05 not an image")


class NaiveBucket:
    """A user image source that assumes every source is a string (a bug: PIL images reach it too)."""

    @hooks.hookimpl
    def llava_next_load_image(self, source, timeout):
        return None if not source.startswith("bucket://") else Image.new("RGB", (2, 2))


def test_an_image_source_plugin_with_a_bug_is_named_in_a_typed_error(fresh_manager):
    fresh_manager.register(NaiveBucket(), name="naive-bucket")
    assert load_image("bucket://a").size == (2, 2)
    with pytest.raises(
        ImageError, match=r"plugin 'naive-bucket' failed on .*AttributeError.*fix or unregister"
    ) as info:
        load_image(Image.new("RGB", (1, 1)), index=3)
    assert info.value.index == 3


class TimingWrapper:
    """A well-behaved wrapper (timing every image load): pluggy then calls the plugins itself."""

    @hooks.hookimpl(wrapper=True)
    def llava_next_load_image(self, source, timeout):
        return (yield)


class BadPromptFormat:
    @hooks.hookimpl
    def llava_next_prompt_format(self, family, model_type, tokenizer):
        return 42  # a bug: not a template string


def test_plugin_bugs_behind_a_wrapper_or_of_the_wrong_type_are_typed_errors(fresh_manager):
    fresh_manager.register(NaiveBucket(), name="naive-bucket")
    fresh_manager.register(TimingWrapper(), name="timing")
    assert load_image("bucket://a").size == (2, 2)
    with pytest.raises(ImageError, match=r"an image-source plugin failed on .*AttributeError.*hook wrapper") as info:
        load_image(Image.new("RGB", (1, 1)), index=3)
    assert info.value.index == 3
    fresh_manager.register(BadPromptFormat(), name="bad-format")
    with pytest.raises(InputError, match="returned int for family 'mistral', not a Jinja chat template string"):
        build_prompt("Q", None, None, family="mistral")


class BuggyFormatAndRenderer:
    """Bugs in the other first-answer hooks: a lookup that fails for what it was not written for."""

    @hooks.hookimpl
    def llava_next_prompt_format(self, family, model_type, tokenizer):
        return {"mine": "{{ messages }}"}[family]

    @hooks.hookimpl
    def llava_next_render_attention_mask(self, mask, fmt):
        return {"svg": "<svg/>"}[fmt]


def test_prompt_format_and_renderer_plugins_with_a_bug_are_named_in_a_typed_error(fresh_manager):
    from llava_next_plugin.visualizer import MaskPicture

    fresh_manager.register(BuggyFormatAndRenderer(), name="buggy")
    with pytest.raises(
        InputError, match=r"llava_next_prompt_format plugin 'buggy' failed on family 'mistral' \(KeyError"
    ):
        build_prompt("Q", None, None, family="mistral")
    with pytest.raises(
        InputError, match=r"render_attention_mask plugin 'buggy' failed on format 'html' \(KeyError"
    ) as info:
        MaskPicture("t", []).render("html")
    assert info.value.param == "fmt"


def test_user_plugin_wins_even_when_registered_before_the_model_side_builtins():
    """The SDK side may build the manager (and a user register a plugin) before the model package adds
    its built-ins: those go in beneath, so the user's plugin still wins."""
    manager = plugins.get_plugin_manager(refresh=True)
    try:
        manager.register(GrayscaleBytes(), name="early-user-plugin")
        assert hooks.get_plugin_manager() is manager
        order = [impl.plugin_name for impl in manager.hook.llava_next_load_image.get_hookimpls()]
        assert order.index("llava_next_plugin.images") < order.index("early-user-plugin")  # called last-first
        assert load_image(b"\x09").getpixel((0, 0)) == (9, 9, 9)
    finally:
        hooks.get_plugin_manager(refresh=True)


def test_misspelt_or_mis_signed_hooks_are_refused_with_a_clear_error():
    manager = plugins.build_plugin_manager(builtins=(), entry_points=False)

    class Misspelt:
        @hooks.hookimpl
        def llava_next_load_imag(self, source, timeout):
            return None

    class WrongArguments:
        @hooks.hookimpl
        def llava_next_load_image(self, source, timeout, colour):
            return None

    with pytest.raises(
        pluggy.PluginValidationError,
        match=r"implements llava_next_load_imag, which is no llava-next hook; "
        r"the hooks are: llava_next_after_generate",
    ):
        manager.register(Misspelt(), name="misspelt")
    assert manager.get_plugin("misspelt") is None
    with pytest.raises(pluggy.PluginValidationError, match="colour"):
        manager.register(WrongArguments(), name="wrong")


def test_builtin_modules_not_written_yet_are_skipped_but_broken_ones_reported(tmp_path):
    site = _site_with(tmp_path, "llava-next-broken-plugin")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a module that does not exist yet is skipped silently
            manager = plugins.build_plugin_manager(
                builtins=(
                    "llava_next_sdk.transports.not_written_yet",
                    "llava_next_sdk.not_a_package.module",
                    "llava_next_plugin.images",
                ),
                entry_points=False,
            )
        assert manager.builtin_names == ("llava_next_plugin.images",)
        assert manager.failed_plugins == []
        # A built-in that exists but fails on import (here: its own dependency is missing) is reported.
        with pytest.warns(plugins.PluginLoadWarning, match=r"plugin 'llava_next_broken_plugin' \(built-in module\)"):
            manager.register_builtins(["llava_next_broken_plugin", "llava_next_plugin.prompts"])
        assert [f.name for f in manager.failed_plugins] == ["llava_next_broken_plugin"]
        assert manager.builtin_names == ("llava_next_plugin.images", "llava_next_plugin.prompts")
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("llava_next_broken_plugin", None)


def test_a_blocked_builtin_stays_out():
    manager = plugins.PluginManager()
    manager.set_blocked("llava_next_plugin.images")
    manager.register_builtins(["llava_next_plugin.images", "llava_next_plugin.prompts"])
    assert manager.builtin_names == ("llava_next_plugin.prompts",)
    assert manager.hook.llava_next_load_image(source=b"x", timeout=1.0) is None


# --- staying light ---------------------------------------------------------------------------------

LIGHT_SCRIPT = """
import json, sys
import llava_next_sdk
from llava_next_sdk.plugins import get_plugin_manager
manager = get_plugin_manager()
transport = manager.hook.llava_next_sdk_transport(url="http://127.0.0.1:9", options={})
print(json.dumps({
    "heavy": sorted(name for name in ("torch", "transformers") if name in sys.modules),
    "plugins": [name for name, _ in manager.list_name_plugin()],
    "failed": [str(failure) for failure in manager.failed_plugins],
    "transport": type(transport).__name__,
}))
"""


def test_sdk_and_its_plugin_manager_import_neither_torch_nor_transformers(example_plugin):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(example_plugin), str(REPO / "sdk")]))
    completed = subprocess.run(
        [sys.executable, "-c", LIGHT_SCRIPT], capture_output=True, text=True, env=env, cwd=example_plugin, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], f"a remote-only SDK imported {report['heavy']}"
    assert "example" in report["plugins"]  # entry-point loading itself stays light
    assert report["failed"] == []
    assert report["transport"] not in ("NoneType", "")  # the built-in HTTP transport answered for http://


# --- the documented example ------------------------------------------------------------------------


def test_the_documented_plugin_example_works_as_written(tmp_path):
    """The README's "Writing a plugin": its pyproject and module installed, its usage snippet run as written."""
    readme = (REPO / "README.md").read_text()
    doc = readme.split("\n## Writing a plugin\n", 1)[1].split("\n## ", 1)[0]
    blocks = {}
    for chunk in doc.split("```")[1::2]:
        language, _, body = chunk.partition("\n")
        blocks.setdefault(language, []).append(body)
    project = tmp_path / "llava-next-assets"
    (project / "llava_next_assets").mkdir(parents=True)
    (project / "pyproject.toml").write_text(blocks["toml"][0])
    (project / "llava_next_assets" / "__init__.py").write_text(blocks["python"][0])
    site = tmp_path / "site-packages"
    install_offline(project, site)
    assets = tmp_path / "assets"
    assets.mkdir()
    Image.new("RGBA", (6, 4), (0, 0, 255, 255)).save(assets / "cat.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "outside.png")  # a file next to the folder, not in it
    usage = blocks["python"][1] + (
        "\nprint(image.mode, image.size, image.getpixel((0, 0)), repr(prompt))\n"
        "try:\n    load_image('assets://../outside.png')\nexcept ValueError as exc:\n    print('refused:', exc)\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO), str(REPO / "sdk")]), LLAVA_ASSETS=str(assets)
    )
    completed = subprocess.run(
        [sys.executable, "-c", usage], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    *_, shown, refused = completed.stdout.strip().splitlines()
    assert shown == "RGB (6, 4) (0, 0, 255) '<image>\\nWhat is this?\\nAnswer:'"
    assert refused.startswith("refused:") and "outside the assets folder" in refused, refused


def test_a_second_package_using_a_taken_plugin_name_is_reported_not_silently_dropped(example_plugin, tmp_path):
    """Entry-point names are the plugins' names: another distribution's 'example' is refused with a warning
    naming both, and the first keeps working."""
    site = tmp_path / "clash-site"
    (site / "clash_plugin").mkdir(parents=True)
    (site / "clash_plugin" / "__init__.py").write_text("")
    info = site / "llava_next_clash-0.2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llava-next-clash\nVersion: 0.2.0\n")
    (info / "entry_points.txt").write_text("[llava_next_plugin]\nexample = clash_plugin\n")
    sys.path.append(str(site))  # after the example plugin's site: it is found first
    importlib.invalidate_caches()
    try:
        with pytest.warns(plugins.PluginLoadWarning) as caught:
            manager = hooks.get_plugin_manager(refresh=True)
        (message,) = [str(w.message) for w in caught]
        assert "llava-next-clash 0.2.0" in message and "taken by llava-next-example-plugin" in message
        assert [failure.name for failure in manager.failed_plugins] == ["example"]
        assert load_image("example://red").getpixel((0, 0)) == (255, 0, 0)
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("clash_plugin", None)
        importlib.invalidate_caches()
