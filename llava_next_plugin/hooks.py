"""Every extension point of llava-next, and the plugin manager that calls them.

The hookspecs live in the light SDK (:mod:`llava_next_sdk.hookspecs`) so a remote-only application
can use them without torch; this module re-exports them for the model package and adds the model
package's own built-in plugins (image sources, prompt formats, attention-mask renderers) to the one
process-wide manager.

Write a plugin::

    from llava_next_plugin.hooks import hookimpl   # or llava_next_sdk.hookspecs, which stays light

    @hookimpl
    def llava_next_load_image(source, timeout):
        ...

and list it under the entry-point group ``llava_next_plugin`` (see docs/writing-a-plugin.md), or call
``get_plugin_manager().register(module)``.
"""

from __future__ import annotations

from typing import Any

from llava_next_sdk import plugins as _sdk_plugins
from llava_next_sdk.hookspecs import (
    PROJECT_NAME,
    hookimpl,
    hookspec,
    llava_next_after_generate,
    llava_next_before_generate,
    llava_next_load_image,
    llava_next_prompt_format,
    llava_next_render_attention_mask,
    llava_next_sdk_transport,
)
from llava_next_sdk.plugins import FailedPlugin, PluginLoadWarning, PluginManager

__all__ = [
    "BUILTIN_PLUGINS",
    "FailedPlugin",
    "PROJECT_NAME",
    "PluginLoadWarning",
    "PluginManager",
    "call_one",
    "get_plugin_manager",
    "hookimpl",
    "in_call_order",
    "hookspec",
    "llava_next_after_generate",
    "llava_next_before_generate",
    "llava_next_load_image",
    "llava_next_prompt_format",
    "llava_next_render_attention_mask",
    "llava_next_sdk_transport",
]

BUILTIN_PLUGINS: tuple[str, ...] = (
    "llava_next_plugin.images",
    "llava_next_plugin.prompts",
    "llava_next_plugin.visualizer",
)
"""The model package's own plugin modules, registered beneath every third-party plugin. A module that
does not exist (yet) is skipped silently; append a module path here to make it a built-in."""


def get_plugin_manager(*, refresh: bool = False) -> PluginManager:
    """The process-wide plugin manager with the model package's built-ins registered.

    Same object as :func:`llava_next_sdk.plugins.get_plugin_manager`; the first call from the model
    side adds :data:`BUILTIN_PLUGINS` beneath the plugins already there (registering them is cheap
    after the first time).

    :param refresh: build a new manager (re-reads the installed entry points).
    """
    manager = _sdk_plugins.get_plugin_manager(refresh=refresh)
    manager.register_builtins(BUILTIN_PLUGINS)
    return manager


def in_call_order(hook: Any) -> list | None:
    """*hook*'s implementations in the order pluggy calls them (the last registered first; ``tryfirst`` and
    ``trylast`` kept), so that a caller can call each on its own and tell which one failed; ``None`` when one is a
    wrapper, which only pluggy's own call runs."""
    implementations = hook.get_hookimpls()
    if any(impl.hookwrapper or impl.wrapper for impl in implementations):
        return None
    return implementations[::-1]


def call_one(implementation: Any, arguments: dict[str, Any]) -> Any:
    """Call one implementation (from :func:`in_call_order`) with the arguments it takes, as pluggy would."""
    return implementation.function(*[arguments[name] for name in implementation.argnames])
