"""Our classes under transformers' Auto classes, every narrow patch of transformers, and the way back.

After :func:`register` (``import llava_next_plugin`` calls it), everything transformers resolves for the
model type ``llava_next`` is ours:

============================  =====================================================================
Auto class                     how
============================  =====================================================================
AutoConfig                     public ``AutoConfig.register("llava_next", ...)``
AutoModel, AutoModelFor*       public ``register`` of each Auto class whose table maps ``llava_next``
                               (found by looking, so a transformers version with more such tables
                               is covered), keyed by our config class
AutoProcessor                  public ``register`` (folders without ``processor_class``) + patch 1
AutoImageProcessor             patch 2
============================  =====================================================================

Why the public ``register`` functions are not enough:

- Model tables are keyed by config class, and a config class missing from a table's registrations is
  looked up by its *name*: a class named ``LlavaNextConfig`` that is not registered in a table silently
  resolves to transformers' model. So every table that maps ``llava_next`` gets our config registered.
- Patch 1: llava-hf folders say ``"processor_class": "LlavaNextProcessor"``, and ``AutoProcessor``
  resolves that name in transformers' own table before looking at registered classes. The patch
  answers that one name with our class and passes every other name to transformers.
- Patch 2: ``AutoImageProcessor`` picks a class from ``image_processor_type`` *by name*, and the name
  ``LlavaNextImageProcessor`` is also used by ``llava_next_video`` and ``granite4_vision`` folders, so a
  registered class would take those over too. It also picks the PIL backend whenever torchvision is not
  installed, while our fast processor needs no torchvision. The patch serves a folder whose image
  processor is a LLaVA-NeXT one (or unnamed) and whose model type (``config=``, else its
  ``config.json``) is ``llava_next``, or absent when the image processor is named: our fast processor
  by default, our PIL processor for ``backend="pil"`` / ``use_fast=False``. Everything else, including
  unknown backends, goes to transformers' own ``from_pretrained`` unchanged.

Every change is recorded with the value it replaced, and :func:`unregister` puts those back, so
:func:`use_transformers_builtins` gives transformers' own classes for a block of code (our parity tests
compare against them that way). All of this is process-wide.

To add a patch: write ``def _install_x() -> Callable[[], None]`` that changes transformers and returns
the function undoing it, and append it to ``_INSTALLERS`` (see the marked place at the end).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

from ._hub import hub_kwargs as hub_kwargs_of
from ._hub import image_backend, image_processor_class

__all__ = ["register", "unregister", "is_registered", "use_transformers_builtins", "MODEL_TYPE"]

MODEL_TYPE = "llava_next"

# image_processor_type values that name a LLaVA-NeXT image processor (ours or transformers').
_IMAGE_PROCESSOR_NAMES = ("LlavaNextImageProcessor", "LlavaNextImageProcessorFast", "LlavaNextImageProcessorPil")
_PROCESSOR_NAME = "LlavaNextProcessor"
_MISSING = object()

# Undo functions of the installed changes, last installed last; None while not registered.
_undo_stack: list[Callable[[], None]] | None = None


# --- the public switch --------------------------------------------------------------------------
def register() -> None:
    """Make transformers' Auto classes give our classes for ``llava_next``. Calling it again does nothing."""
    global _undo_stack
    if _undo_stack is not None:
        return
    undo: list[Callable[[], None]] = []
    try:
        for install in _INSTALLERS:
            undo.append(install())
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    _undo_stack = undo


def unregister() -> None:
    """Give transformers back exactly what :func:`register` replaced. Calling it again does nothing."""
    global _undo_stack
    if _undo_stack is None:
        return
    steps, _undo_stack = _undo_stack, None
    for step in reversed(steps):
        step()


def is_registered() -> bool:
    return _undo_stack is not None


@contextlib.contextmanager
def use_transformers_builtins() -> Iterator[None]:
    """Within the block, transformers' Auto classes give transformers' own LLaVA-NeXT classes.

    ::

        with llava_next_plugin.use_transformers_builtins():
            reference = AutoModelForImageTextToText.from_pretrained(path)   # transformers' class
        ours = AutoModelForImageTextToText.from_pretrained(path)            # ours again

    Our registration is re-applied on exit if it was active on entry. The switch is process-wide:
    other threads see transformers' classes during the block too.
    """
    was_registered = is_registered()
    unregister()
    try:
        yield
    finally:
        if was_registered:
            register()


# --- our classes, imported when registering -----------------------------------------------------
def _our_config():
    from .configuration import LlavaNextConfig

    return LlavaNextConfig


def _our_processor():
    from .processing import LlavaNextProcessor

    return LlavaNextProcessor


def _our_models() -> dict[str, type]:
    """Our model classes by name; empty while ``llava_next_plugin.modeling`` does not exist yet."""
    try:
        modeling = importlib.import_module(".modeling", __package__)
    except ModuleNotFoundError as error:
        if error.name == f"{__package__}.modeling":
            return {}
        raise
    names = ("LlavaNextModel", "LlavaNextForConditionalGeneration")
    return {name: getattr(modeling, name) for name in names if hasattr(modeling, name)}


def _restore_dict_entry(table: dict, key: Any, previous: Any) -> Callable[[], None]:
    def undo() -> None:
        if previous is _MISSING:
            table.pop(key, None)
        else:
            table[key] = previous

    return undo


# --- AutoConfig ---------------------------------------------------------------------------------
def _install_config() -> Callable[[], None]:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    previous = CONFIG_MAPPING._extra_content.get(MODEL_TYPE, _MISSING)
    AutoConfig.register(MODEL_TYPE, _our_config(), exist_ok=True)
    return _restore_dict_entry(CONFIG_MAPPING._extra_content, MODEL_TYPE, previous)


# --- AutoModel and every AutoModelFor* that maps llava_next -------------------------------------
def auto_model_classes_for_llava_next() -> list[tuple[Any, Any]]:
    """``(AutoClass, class name(s) it maps llava_next to)`` for every Auto model class of this
    transformers version whose table has ``llava_next`` (one Auto class per table).

    The Auto classes are typed ``Any``: transformers gives each its ``_model_mapping`` at runtime (the
    base class declares it None).
    """
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    found: list[tuple[Any, Any]] = []
    seen_tables: set[int] = set()
    for name in sorted(dir(modeling_auto)):
        auto_class = getattr(modeling_auto, name)
        if not (isinstance(auto_class, type) and issubclass(auto_class, _BaseAutoModelClass)):
            continue
        table = getattr(auto_class, "_model_mapping", None)
        if table is None or id(table) in seen_tables:
            continue
        names = table._model_mapping.get(MODEL_TYPE)
        if names is not None:
            seen_tables.add(id(table))
            found.append((auto_class, names))
    return found


def _install_models() -> Callable[[], None]:
    config_class = _our_config()
    models = _our_models()
    undo: list[Callable[[], None]] = []
    for auto_class, names in auto_model_classes_for_llava_next():
        wanted = names if isinstance(names, (list, tuple)) else (names,)
        if not all(name in models for name in wanted):
            continue  # no class of ours by that name (yet): transformers keeps the table entry
        value = tuple(models[n] for n in wanted) if isinstance(names, (list, tuple)) else models[names]
        table = auto_class._model_mapping
        previous = table._extra_content.get(config_class, _MISSING)
        if isinstance(value, tuple):
            table.register(config_class, value, exist_ok=True)
        else:
            auto_class.register(config_class, value, exist_ok=True)
        undo.append(_restore_dict_entry(table._extra_content, config_class, previous))

    def undo_all() -> None:
        for step in reversed(undo):
            step()

    return undo_all


# --- AutoProcessor ------------------------------------------------------------------------------
def _install_processor() -> Callable[[], None]:
    from transformers import AutoProcessor
    from transformers.models.auto import processing_auto

    config_class, processor_class = _our_config(), _our_processor()
    table = processing_auto.PROCESSOR_MAPPING
    previous = table._extra_content.get(config_class, _MISSING)
    AutoProcessor.register(config_class, processor_class, exist_ok=True)
    restore_table = _restore_dict_entry(table._extra_content, config_class, previous)

    # Patch 1: the processor_class name of llava-hf folders.
    original = processing_auto.processor_class_from_name

    @functools.wraps(original)
    def processor_class_from_name(class_name: str) -> Any:
        if class_name == _PROCESSOR_NAME:
            return processor_class
        return original(class_name)

    processing_auto.processor_class_from_name = processor_class_from_name

    def undo() -> None:
        processing_auto.processor_class_from_name = original
        restore_table()

    return undo


# --- AutoImageProcessor -------------------------------------------------------------------------
def _read_json(path: str, filename: str, hub_kwargs: dict) -> dict | None:
    from transformers.utils import cached_file

    try:
        resolved = cached_file(
            path,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            _raise_exceptions_for_gated_repo=False,
            **hub_kwargs,
        )
    except Exception:  # noqa: BLE001 - unreadable here: let transformers' own loader report it
        return None
    if resolved is None:
        return None
    with open(resolved, encoding="utf-8") as f:
        return json.load(f)


def _llava_next_image_backend(path: Any, kwargs: dict) -> Literal["torchvision", "pil"] | None:
    """``"torchvision"``/``"pil"`` when this ``AutoImageProcessor.from_pretrained`` call is ours, else None."""
    backend = image_backend(kwargs.get("backend"), kwargs.get("use_fast"))
    if backend is None:
        return None
    from transformers import PreTrainedConfig
    from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME, PROCESSOR_NAME

    path = str(path)
    hub_kwargs = hub_kwargs_of(kwargs)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            image_config = json.load(f)
        model_config = None
    else:
        processor_config = _read_json(path, PROCESSOR_NAME, hub_kwargs) or {}
        image_config = processor_config.get("image_processor")
        if not isinstance(image_config, dict):
            image_config = _read_json(path, IMAGE_PROCESSOR_NAME, hub_kwargs) or {}
        model_config = _read_json(path, CONFIG_NAME, hub_kwargs)
    config = kwargs.get("config")
    model_type: str | None
    if isinstance(config, PreTrainedConfig):
        model_type = config.model_type
    else:
        model_type = (model_config or {}).get("model_type")
    image_type = image_config.get("image_processor_type")
    if model_type not in (None, MODEL_TYPE) or image_type not in (None, *_IMAGE_PROCESSOR_NAMES):
        return None
    if model_type is None and image_type is None:
        return None
    return backend


def _install_image_processor() -> Callable[[], None]:
    from transformers import AutoImageProcessor

    original = AutoImageProcessor.__dict__["from_pretrained"]  # the classmethod object itself

    @functools.wraps(original.__func__)
    def from_pretrained(cls: Any, pretrained_model_name_or_path: Any, *inputs: Any, **kwargs: Any) -> Any:
        backend = _llava_next_image_backend(pretrained_model_name_or_path, kwargs)
        if backend is None:
            return original.__get__(None, cls)(pretrained_model_name_or_path, *inputs, **kwargs)
        for key in ("config", "backend", "use_fast", "trust_remote_code", "_from_auto"):
            kwargs.pop(key, None)
        return image_processor_class(backend).from_pretrained(pretrained_model_name_or_path, *inputs, **kwargs)

    # Replacing transformers' classmethod is this patch's purpose (mypy forbids assigning to methods).
    AutoImageProcessor.from_pretrained = classmethod(from_pretrained)  # type: ignore[method-assign,assignment]

    def undo() -> None:
        AutoImageProcessor.from_pretrained = original  # type: ignore[method-assign]

    return undo


# --- the list register() applies, in order ------------------------------------------------------
_INSTALLERS: list[Callable[[], Callable[[], None]]] = [
    _install_config,
    _install_models,
    _install_processor,
    _install_image_processor,
]


# === pipeline routing: the pipeline engineer appends its installer below =========================
# Patch 3: transformers 5 rewrites the task "image-to-text" to "image-text-to-text" before any registry
# is consulted (pipelines._resolve_deprecated_task, whose warning is itself a logging error). The
# patched ``transformers.pipeline`` sends "image-to-text" calls whose model is of type llava_next to
# the factory as "image-text-to-text" with our pipeline class (so neither the rewrite nor its warning
# happens); every other call reaches the original factory untouched.
# Patch 4: ``transformers.utils.attention_visualizer.AttentionMaskVisualizer(<llava_next>)`` builds
# our visualizer; any other model gets transformers' class, untouched.
# Both patch the objects themselves (a function's code, a class's __new__), not the names bound to them, so
# users who imported them before this package get the route too.
def _model_type_of(model: Any, config: Any = None, hub_kwargs: dict | None = None) -> str | None:
    """The model type a checkpoint name/folder, config or loaded model is, or None when it can't be told."""
    for candidate in (config, model):
        if candidate is not None and not isinstance(candidate, (str, os.PathLike)):
            found = getattr(candidate, "model_type", None) or getattr(
                getattr(candidate, "config", None), "model_type", None
            )
            if found:
                return found
    source = config if isinstance(config, (str, os.PathLike)) else model
    if not isinstance(source, (str, os.PathLike)):
        return None
    # config.json read as JSON: building a config could run a checkpoint's remote code (or ask whether to)
    try:
        found = (_read_json(os.fspath(source), "config.json", hub_kwargs or {}) or {}).get("model_type")
    except (OSError, ValueError, AttributeError):  # not JSON, or not an object: transformers will say so
        return None
    return found if isinstance(found, str) else None


_ROUTE = "_llava_next_pipeline_route"
"""The name, in ``transformers.pipelines``' globals, of the route :func:`_trampoline` calls while registered."""


def _trampoline(*args: Any, **kwargs: Any) -> Any:
    """The body ``transformers.pipeline`` runs while we are registered (its ``__code__``; globals are
    ``transformers.pipelines``', where the route is set)."""
    return _llava_next_pipeline_route(*args, **kwargs)  # type: ignore[name-defined]  # noqa: F821


def _install_image_to_text_route() -> Callable[[], None]:
    """Route ``pipeline("image-to-text", <llava_next model>)`` to our pipeline class.

    The function object ``transformers.pipeline`` itself runs the route (its code is swapped, and put back by
    the undo), so a ``from transformers import pipeline`` done before ``import llava_next_plugin`` is routed
    too. Its original code runs, as a copy of the function, for every other call."""
    import inspect
    import types

    import transformers.pipelines as pipelines

    function = pipelines.pipeline  # the object transformers.pipeline and every earlier import hold
    saved = (function.__code__, function.__defaults__, function.__kwdefaults__)
    original = types.FunctionType(
        function.__code__, function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )
    original.__kwdefaults__ = function.__kwdefaults__
    original.__qualname__, original.__doc__ = function.__qualname__, function.__doc__
    original.__annotations__ = dict(function.__annotations__)
    signature = inspect.signature(original)

    def route(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)
        arguments = bound.arguments
        if arguments.get("task") != "image-to-text" or arguments.get("pipeline_class") is not None:
            return original(*args, **kwargs)
        hub_kwargs = {k: arguments[k] for k in ("revision", "token") if arguments.get(k) is not None}
        if _model_type_of(arguments.get("model"), arguments.get("config"), hub_kwargs) != MODEL_TYPE:
            return original(*args, **kwargs)
        from .pipeline import LlavaNextImageToTextPipeline

        arguments["task"] = "image-text-to-text"
        arguments["pipeline_class"] = LlavaNextImageToTextPipeline
        pipe = original(*bound.args, **bound.kwargs)
        pipe.task = "image-to-text"
        return pipe

    function.__globals__[_ROUTE] = route
    function.__code__ = _trampoline.__code__
    function.__defaults__, function.__kwdefaults__ = None, None
    function.__wrapped__ = original  # type: ignore[attr-defined]  # inspect.signature shows the real parameters

    def undo() -> None:
        function.__code__, function.__defaults__, function.__kwdefaults__ = saved
        vars(function).pop("__wrapped__", None)
        function.__globals__.pop(_ROUTE, None)

    return undo


def _install_visualizer_route() -> Callable[[], None]:
    """``AttentionMaskVisualizer(<llava_next model>)`` of transformers builds ours: the class's own ``__new__`` is
    set (and removed by the undo), so the class imported before ``import llava_next_plugin`` routes too."""
    from transformers.utils.attention_visualizer import AttentionMaskVisualizer as original

    had_new = "__new__" in vars(original)
    previous_new = vars(original).get("__new__")

    def __new__(cls: type, model_name: Any, *args: Any, **kwargs: Any) -> Any:
        if cls is original and _model_type_of(model_name) == MODEL_TYPE:
            from .visualizer import AttentionMaskVisualizer as ours

            return ours(model_name, *args, **kwargs)  # not an instance of cls: its __init__ is skipped
        return object.__new__(cls)

    # Setting transformers' class's constructor is this patch's purpose (mypy forbids assigning to a method).
    original.__new__ = __new__  # type: ignore[method-assign,assignment]

    def undo() -> None:
        if had_new:
            original.__new__ = previous_new  # type: ignore[method-assign,assignment]
        else:
            del original.__new__

    return undo


_INSTALLERS.append(_install_image_to_text_route)
_INSTALLERS.append(_install_visualizer_route)
# === end of pipeline routing ======================================================================
