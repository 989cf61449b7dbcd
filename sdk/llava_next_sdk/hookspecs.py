"""Every extension point of llava-next, in one flat list.

These are pluggy hook specifications. They import nothing heavy (no torch, no transformers), so the
SDK can load them in a remote-only application; the model package re-exports them as
``llava_next_plugin.hooks``.

A plugin is any module or object with functions named like the specs below, marked with
:data:`hookimpl`. Plugins are found in the entry-point group ``llava_next_plugin`` or registered
explicitly with ``get_plugin_manager().register(obj)``. Our own built-ins are plugins of these same
hooks, registered first, so a third-party plugin (registered later, hence called earlier) wins
wherever the first non-None result counts.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT_NAME = "llava_next_plugin"
"""The pluggy project name and the entry-point group that plugins register under."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec(firstresult=True)
def llava_next_load_image(source: Any, timeout: float) -> Any:
    """Turn an image *source* into a ``PIL.Image.Image``.

    Called once for every image a user hands to the processor, the pipeline, the SDK's local
    transport or the command line, before any preprocessing.

    :param source: what the user gave: a path (``str`` or ``os.PathLike``), an ``http(s)://`` URL,
        a ``data:image/...;base64,`` URL, raw ``bytes``, a PIL image, a numpy array, or anything a
        plugin understands (``s3://bucket/key``, ...).
    :param timeout: seconds allowed for any network read.
    :return: a PIL image, or ``None`` when this plugin does not handle *source*.
        The first non-None result wins.
    """


@hookspec(firstresult=True)
def llava_next_prompt_format(family: str, model_type: str, tokenizer: Any) -> Any:
    """The prompt format for a checkpoint that ships no chat template.

    Called when a prompt must be wrapped for a model and the tokenizer has no ``chat_template``.

    :param family: the checkpoint family we detected (``"mistral"``, ``"vicuna"``, ``"llama3"``,
        ``"chatml"``), or ``""`` when it could not be told.
    :param model_type: the text backbone's ``model_type`` from the config (``"mistral"``, ``"llama"``...).
    :param tokenizer: the checkpoint's tokenizer (may be ``None``).
    :return: a Jinja chat-template string, or ``None`` to pass. The first non-None result wins.
    """


@hookspec(firstresult=True)
def llava_next_sdk_transport(url: str, options: dict) -> Any:
    """The SDK transport that talks to *url*.

    Called by ``AsyncClient`` when it is built with a ``base_url`` (or a local model path, which
    arrives as ``local:<path>``). When no plugin answers but a provider of the URL's scheme is installed
    under the entry-point group ``llava_next_sdk.transports``, the client loads that provider at its first
    request, in a worker thread, and calls this hook again.

    :param url: the ``base_url`` given to the client, or ``local:<model path or hub id>``.
    :param options: the client's keyword options (``api_key``, ``timeout``, ``max_retries``...).
    :return: an object implementing ``llava_next_sdk.transports.AsyncTransport``, or ``None`` when
        this plugin does not serve the URL's scheme. The first non-None result wins.
    """


@hookspec(firstresult=True)
def llava_next_render_attention_mask(mask: Any, fmt: str) -> Any:
    """Draw an attention-mask picture in the format *fmt*.

    Called by ``AttentionMaskVisualizer`` when it shows itself.

    :param mask: a ``llava_next_plugin.visualizer.MaskPicture`` (token labels, collapsed blocks,
        and the boolean mask per sequence).
    :param fmt: ``"ansi"`` (terminal text), ``"html"`` (Jupyter) or ``"png"`` (bytes), or a format
        a plugin adds.
    :return: ``str`` for text formats, ``bytes`` for images, or ``None`` when this plugin does not
        draw *fmt*. The first non-None result wins.
    """


@hookspec
def llava_next_before_generate(request_id: str, request: dict) -> None:
    """Observe a request just before its generation starts (logging, metrics, tracing).

    Called by the engine for every accepted request, on the engine's thread: keep it quick.

    :param request_id: the engine's id for the request.
    :param request: a summary: ``{"model", "num_images", "prompt_tokens", "max_tokens", ...}``.
    Every plugin is called; results are ignored.
    """


@hookspec
def llava_next_after_generate(request_id: str, result: dict) -> None:
    """Observe a request when it ends, successfully or not.

    Called by the engine once per request when it finishes, fails or is cancelled, on the engine's
    thread: keep it quick.

    :param request_id: the engine's id for the request.
    :param result: ``{"finish_reason", "prompt_tokens", "completion_tokens", "image_tokens",
        "queue_seconds", "time_to_first_token", "total_seconds", "error"}`` (``error`` is ``None``
        on success, else the error's message).
    Every plugin is called; results are ignored.
    """
