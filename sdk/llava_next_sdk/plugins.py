"""The plugin manager: our built-ins first, then the plugins installed under the entry-point group
``llava_next_plugin``, then whatever the application registers itself.

pluggy calls the implementations of a hook from the most recently registered to the oldest, so every
installed or explicitly registered plugin is asked before our built-ins, and for ``firstresult`` hooks
(image sources, prompt formats, transports, renderers) its answer wins.

A plugin that fails to load (it raises at import, or implements a hook with the wrong arguments or a
misspelt name) is skipped with a :class:`PluginLoadWarning` naming it and recorded in
``manager.failed_plugins``; the other plugins load as usual.

Transport providers are the exception to eager loading: an entry point of the group
:data:`TRANSPORT_GROUP`, named by the URL scheme it serves, is imported only when a client first needs
that scheme (the model package ships the ``local`` one, and importing it imports torch).

This module is light: it imports pluggy and the standard library only, never torch or transformers.
A package built on the SDK may add its own built-ins to the same manager with
:meth:`PluginManager.register_builtins` (the model package does, when it is first asked for it).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pluggy

from llava_next_sdk import hookspecs
from llava_next_sdk.hookspecs import PROJECT_NAME

__all__ = [
    "BUILTIN_PLUGINS",
    "DISABLE_AUTOLOAD_ENV",
    "FailedPlugin",
    "PluginLoadWarning",
    "PluginManager",
    "TRANSPORT_GROUP",
    "TransportProviderError",
    "build_plugin_manager",
    "get_plugin_manager",
]

BUILTIN_PLUGINS: tuple[str, ...] = ("llava_next_sdk.transports.http",)
"""The SDK's own plugin modules, registered (in this order) before anything else."""

TRANSPORT_GROUP = "llava_next_sdk.transports"
"""The entry-point group of transport providers, each named by the URL scheme it serves (``local`` for
``local:<model>``: llava-next-plugin's in-process transport). A provider is a module implementing
``llava_next_sdk_transport``; it is imported only when a URL of its scheme is first asked for, since it
may be heavy (the model package imports torch), so a remote-only application never pays for it."""

DISABLE_AUTOLOAD_ENV = "LLAVA_NEXT_DISABLE_PLUGIN_AUTOLOAD"
"""Set this environment variable to a non-empty value to load no entry-point plugins."""


class PluginLoadWarning(UserWarning):
    """A plugin failed to load and was skipped (the message names it and says why)."""


@dataclass(frozen=True)
class FailedPlugin:
    """A plugin that could not be loaded.

    :param name: the entry-point name, or the module path of a built-in.
    :param origin: where it came from, e.g. ``"entry point 'example = pkg.plugin' of llava-next-example-plugin 0.1"``.
    :param error: the exception it raised.
    """

    name: str
    origin: str
    error: BaseException

    @property
    def message(self) -> str:
        return (
            f"llava-next plugin {self.name!r} ({self.origin}) failed to load and was skipped: "
            f"{type(self.error).__name__}: {self.error}. Fix or uninstall it; the other plugins "
            f"are unaffected."
        )

    def __str__(self) -> str:
        return self.message


class PluginManager(pluggy.PluginManager):
    """pluggy's manager with llava-next's hookspecs, built-ins registered beneath every other plugin,
    entry-point loading that survives a broken plugin, and a check for misspelt hook names."""

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.failed_plugins: list[FailedPlugin] = []
        self._builtin_names: list[str] = []
        self._provider_names: list[str] = []  # transport providers loaded at first use (load_transport_providers)
        self._builtins_tried: set[str] = set()
        self._entry_point_dists: dict[str, str | None] = {}  # an entry-point plugin's name -> its distribution
        self._lock = threading.RLock()

    @property
    def builtin_names(self) -> tuple[str, ...]:
        """Module paths of the built-in plugins registered so far, oldest first."""
        return tuple(self._builtin_names)

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        """Register *plugin* (a module or any object with :data:`~llava_next_sdk.hookspecs.hookimpl`
        functions); it is called before every plugin registered earlier.

        :raises pluggy.PluginValidationError: when a hook implementation has arguments its spec lacks,
            or a ``llava_next_*`` name that is no hook (a typo would otherwise never be called).
        """
        with self._lock:
            plugin_name = super().register(plugin, name)
            if plugin_name is None:  # blocked
                return None
            unknown = sorted(
                caller.name
                for caller in self.get_hookcallers(plugin) or ()
                if not caller.has_spec() and caller.name.startswith("llava_next_")
            )
            if unknown:
                self.unregister(plugin)
                known = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("llava_next_")))
                raise pluggy.PluginValidationError(
                    plugin,
                    f"plugin {plugin_name!r} implements {', '.join(unknown)}, which is no llava-next "
                    f"hook; the hooks are: {known}",
                )
            return plugin_name

    def register_builtins(self, module_paths: Iterable[str]) -> None:
        """Import and register our own plugin modules beneath every plugin registered so far.

        Each path is tried once per manager; a module that does not exist (yet) is skipped silently,
        one that fails to import is recorded like a broken entry-point plugin.
        """
        with self._lock:
            pending = [path for path in module_paths if path not in self._builtins_tried]
            if not pending:
                return
            self._builtins_tried.update(pending)
            modules = []
            for path in pending:
                try:
                    module = _import_if_present(path)
                except Exception as exc:
                    self._record_failure(path, "built-in module", exc)
                    continue
                if module is not None:
                    modules.append((path, module))
            if not modules:
                return
            with self._beneath(keep=()):  # beneath every other plugin: a third-party one keeps winning
                for path, module in modules:
                    try:
                        registered = self.register(module, name=path)  # None when blocked
                    except Exception as exc:
                        self._record_failure(path, "built-in module", exc)
                    else:
                        if registered is not None:
                            self._builtin_names.append(path)

    @contextlib.contextmanager
    def _beneath(self, keep: Iterable[str]) -> Iterator[None]:
        """Plugins registered inside go beneath every plugin registered so far except the built-ins and *keep*
        (pluggy asks the last registered first): the others are taken off meanwhile, then put back on top."""
        kept = {*self._builtin_names, *keep}
        others = [(name, plugin) for name, plugin in self.list_name_plugin() if plugin is not None and name not in kept]
        for _, plugin in others:
            self.unregister(plugin)
        try:
            yield
        finally:
            for name, plugin in others:
                self.register(plugin, name=name)

    def load_entrypoint_plugins(self, group: str = PROJECT_NAME) -> list[str]:
        """Load and register every plugin installed under the entry-point *group*.

        Skipped: names already registered or blocked, and everything when the environment variable
        ``LLAVA_NEXT_DISABLE_PLUGIN_AUTOLOAD`` is set. A plugin that fails is warned about, recorded
        in :attr:`failed_plugins`, and does not stop the others.

        :return: the names of the plugins registered by this call.
        """
        if os.environ.get(DISABLE_AUTOLOAD_ENV):
            return []
        loaded: list[str] = []
        for entry_point in importlib.metadata.entry_points(group=group):
            name = entry_point.name
            origin = _origin(entry_point)
            dist = entry_point.dist.metadata["Name"] if entry_point.dist is not None else None
            if self.is_blocked(name):
                continue
            if self.has_plugin(name):
                holder = self._entry_point_dists.get(name, "")
                if holder != "" and holder != dist:  # another package's plugin of the same name: say so
                    self._record_failure(
                        name,
                        origin,
                        NameError(
                            f"the plugin name {name!r} is taken by {holder or 'another plugin'}; rename one of the "
                            "two entry points (names must be unique across packages)"
                        ),
                    )
                continue  # else the same plugin seen twice on sys.path
            try:
                plugin = entry_point.load()
                self.register(plugin, name=name)
            except Exception as exc:
                self._record_failure(name, origin, exc)
            else:
                self._entry_point_dists[name] = dist
                loaded.append(name)
        return loaded

    def transport_providers(self, scheme: str) -> list[importlib.metadata.EntryPoint]:
        """The installed providers of *scheme* (entry points of :data:`TRANSPORT_GROUP`), loaded or not.

        Reads package metadata and looks for the provider's top-level package on ``sys.path``; imports
        nothing. Loaded providers are listed too: another thread may be registering one right now, between
        a caller's hook call and this one. Empty when autoloading is disabled (:data:`DISABLE_AUTOLOAD_ENV`).
        """
        if os.environ.get(DISABLE_AUTOLOAD_ENV):
            return []
        return [
            entry_point
            for entry_point in importlib.metadata.entry_points(group=TRANSPORT_GROUP, name=scheme)
            if _findable(entry_point.module)
        ]

    def _unloaded_transport_providers(self, scheme: str) -> list[importlib.metadata.EntryPoint]:
        if os.environ.get(DISABLE_AUTOLOAD_ENV):
            return []
        return [
            entry_point
            for entry_point in importlib.metadata.entry_points(group=TRANSPORT_GROUP, name=scheme)
            if not self.has_plugin(_transport_plugin_name(entry_point))
        ]

    def load_transport_providers(self, scheme: str) -> list[str]:
        """Import and register the providers of *scheme* (blocking: call it from a worker thread).

        :return: the names of the plugins registered by this call.
        :raises TransportProviderError: when a provider fails to import or to register (recorded in
            :attr:`failed_plugins` too); the message names it and the distribution to reinstall.
        """
        loaded = []
        with self._lock:
            for entry_point in self._unloaded_transport_providers(scheme):  # a failed import says why
                name = _transport_plugin_name(entry_point)
                try:
                    plugin = entry_point.load()
                    if not self.is_registered(plugin):  # it may have been registered explicitly already
                        # beneath the plugins registered so far (a user's own transport for these URLs keeps
                        # winning, whether or not another client loaded this provider first), above the built-ins
                        with self._beneath(keep=self._provider_names):
                            self.register(plugin, name=name)
                        self._provider_names.append(name)
                except Exception as exc:
                    error = TransportProviderError(scheme, entry_point, exc)
                    self.failed_plugins.append(FailedPlugin(name, _origin(entry_point), exc))
                    raise error from exc
                loaded.append(name)
        return loaded

    def _record_failure(self, name: str, origin: str, error: BaseException) -> None:
        failure = FailedPlugin(name, origin, error)
        self.failed_plugins.append(failure)
        warnings.warn(failure.message, PluginLoadWarning, stacklevel=3)


class TransportProviderError(ImportError):
    """The installed provider of a URL scheme (an entry point of :data:`TRANSPORT_GROUP`) failed to load."""

    def __init__(self, scheme: str, entry_point: importlib.metadata.EntryPoint, error: BaseException) -> None:
        detail = f"{type(error).__name__}: {error}"
        dist = entry_point.dist.metadata["Name"] if entry_point.dist is not None else None
        fix = f"pip install --force-reinstall {dist}" if dist else "reinstall the package that provides it"
        super().__init__(
            f"the transport for {scheme}: URLs ({_origin(entry_point)}) failed to load: {detail}; "
            f"fix the installation ({fix})",
            name=getattr(error, "name", None),
        )
        self.scheme, self.error = scheme, error


def _findable(module_path: str) -> bool:
    """Whether the top-level package of *module_path* is on ``sys.path`` (found, not imported)."""
    try:
        return importlib.util.find_spec(module_path.partition(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _transport_plugin_name(entry_point: importlib.metadata.EntryPoint) -> str:
    return f"{TRANSPORT_GROUP}:{entry_point.name}"


def _origin(entry_point: importlib.metadata.EntryPoint) -> str:
    origin = f"entry point '{entry_point.name} = {entry_point.value}'"
    dist = entry_point.dist
    if dist is not None:
        origin += f" of {dist.metadata['Name']} {dist.version}"
    return origin


def _import_if_present(module_path: str) -> Any:
    """Import *module_path*, or return None when that module (or a package above it) does not exist."""
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        if exc.name and (module_path == exc.name or module_path.startswith(exc.name + ".")):
            return None
        raise  # the module exists but something it imports does not: that is a real failure


def build_plugin_manager(builtins: Iterable[str] = BUILTIN_PLUGINS, *, entry_points: bool = True) -> PluginManager:
    """A new manager: the *builtins* first, then (if *entry_points*) the installed plugins."""
    manager = PluginManager()
    manager.register_builtins(builtins)
    if entry_points:
        manager.load_entrypoint_plugins()
    return manager


_manager: PluginManager | None = None
_manager_lock = threading.Lock()


def get_plugin_manager(*, refresh: bool = False) -> PluginManager:
    """The process-wide plugin manager, built on first use.

    :param refresh: build a new one (for instance after installing a plugin in a running process).
        Plugins registered explicitly on the old manager are not carried over.
    """
    global _manager
    with _manager_lock:
        if _manager is None or refresh:
            _manager = build_plugin_manager()
        return _manager
