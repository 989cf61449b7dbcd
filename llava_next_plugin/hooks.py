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

from collections.abc import Callable
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


def plugin_fault(
    hook_name: str, what: str, error: Callable[[str], Exception]
) -> Callable[[str | None, Exception], Exception]:
    """For :func:`first_answer`: a plugin's bug said as ``error(message)``, the message naming the plugin."""

    def fault(plugin: str | None, exc: Exception) -> Exception:
        who = f"the {hook_name} plugin {plugin!r}" if plugin else f"a {hook_name} plugin (a hook wrapper hides which)"
        return error(f"{who} failed on {what} ({type(exc).__name__}: {exc}): fix or unregister that plugin")

    return fault


def first_answer(
    hook: Any,
    arguments: dict[str, Any],
    fault: Callable[[str | None, Exception], Exception],
    says_what_went_wrong: tuple[type[BaseException], ...],
) -> Any:
    """The first answer that is not ``None`` of *hook*'s plugins (pluggy's order), each called on its own: one
    raising anything but *says_what_went_wrong* (errors that describe the input's own fault) has a bug that would
    fail every call, and ``fault(plugin name, error)`` is raised from it, naming that plugin (``None`` when a hook
    wrapper is registered: then pluggy calls them all, and cannot tell which one failed)."""
    implementations = in_call_order(hook)
    if implementations is None:
        try:
            return hook(**arguments)
        except says_what_went_wrong:
            raise
        except Exception as exc:
            raise fault(None, exc) from exc
    for implementation in implementations:
        try:
            answer = call_one(implementation, arguments)
        except says_what_went_wrong:
            raise
        except Exception as exc:
            raise fault(implementation.plugin_name, exc) from exc
        if answer is not None:
            return answer
    return None
