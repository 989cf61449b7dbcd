"""The errors of the model package: plain ``ValueError`` subclasses, with no HTTP in them.

The model, its processors, the pipeline, prompt formats, image loading and the visualizer raise these
when given bad input; each message says what was wrong and how to fix it. They know nothing of serving:
the serving layer (the engine, and through it the server and the SDK's local transport) turns them into
the SDK's typed errors with :func:`as_api_error`, and the server answers those with their HTTP status.
Where model-level code calls the SDK (its one message parser, its image functions), :func:`as_model_error`
goes the other way.

Hierarchy::

    ValueError
    └── InputError            bad input to the model, a processor, the pipeline or a prompt format
        └── ImageError        an image that could not be read, decoded or used (names its index)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llava_next_sdk.errors import BadRequestError, LlavaNextError

__all__ = ["InputError", "ImageError", "as_api_error", "as_model_error", "first_line"]


class InputError(ValueError):
    """Bad input to the model, a processor, the pipeline or a prompt format.

    :param message: what was wrong and how to fix it.
    :param param: the argument (or request field) at fault, when one is.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ImageError(InputError):
    """An image that could not be read, decoded or used.

    :param index: the image's position among the images given, named in the message when known.
    """

    def __init__(self, message: str, *, index: int | None = None, param: str | None = None) -> None:
        if index is not None and not message.startswith("image "):
            message = f"image {index}: {message}"
        super().__init__(message, param=param)
        self.index = index


def as_api_error(error: ValueError) -> BadRequestError:
    """The SDK's typed error for a model-level *error* (``ImageError`` → ``InvalidImageError``, any other
    ``InputError`` → ``BadRequestError``, 400 on the wire); SDK errors pass through unchanged."""
    from llava_next_sdk.errors import BadRequestError, InvalidImageError

    if isinstance(error, BadRequestError):
        return error
    param = getattr(error, "param", None)
    api: BadRequestError
    if isinstance(error, ImageError):
        api = InvalidImageError(str(error), index=error.index, param=param)
    else:
        api = BadRequestError(str(error), param=param)
    api.__cause__ = error
    return api


def as_model_error(error: LlavaNextError, *, index: int | None = None) -> InputError:
    """The model-level error for an SDK *error* raised where model code calls the SDK: ``InvalidImageError`` →
    :class:`ImageError` (its index kept, else *index*), any other → :class:`InputError`; same message and param."""
    from llava_next_sdk.errors import InvalidImageError

    if isinstance(error, InvalidImageError):
        return ImageError(error.message, index=index if error.index is None else error.index, param=error.param)
    return InputError(error.message, param=error.param)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of *exc*'s message (its class name when it has none), at most *limit* characters: what a
    one-line error report quotes of an underlying library's error."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]
