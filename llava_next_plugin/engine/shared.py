"""One engine per model and options in a process, shared by every client and event loop."""

from __future__ import annotations

import threading
from typing import Any

import torch

from .scheduler import Engine, compiles_by_default, default_device

__all__ = ["get_shared_engine"]

_SHARED: dict[tuple, Engine] = {}
_KEY_LOCKS: dict[tuple, threading.Lock] = {}
_LOCK = threading.Lock()  # guards the two dicts only, never held while a model loads


def _normalized(name: str, value: Any) -> Any:
    """Option values that mean the same thing compare equal (``"bfloat16"`` and ``torch.bfloat16``, ...)."""
    if name == "dtype":
        if isinstance(value, str):
            if value == "auto":
                return None
            dtype = getattr(torch, value.removeprefix("torch."), None)
            if isinstance(dtype, torch.dtype):
                return dtype
        return value
    if name == "device" and value is not None:
        device = torch.device(value)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        return str(device)
    return value


def shared_key(path: str, **kwargs: Any) -> tuple:
    """The sharing key of ``get_shared_engine(path, **kwargs)``: equal for options that mean the same."""
    options = {name: _normalized(name, value) for name, value in kwargs.items()}
    options.setdefault("device", _normalized("device", default_device()))
    if options["device"] is None:
        options["device"] = _normalized("device", default_device())
    if options.get("compile") is None:  # what the engine does by default on that device
        options["compile"] = compiles_by_default(options["device"])
    options = {k: v for k, v in options.items() if v is not None or k == "device"}
    return (str(path),) + tuple(sorted((k, repr(v)) for k, v in options.items()))


def get_shared_engine(path: str, **kwargs: Any) -> Engine:
    """One engine per (model path, options) in this process, shared by every client and event loop.

    Loading one model does not hold up a caller that asks for another (a lock per key, not per process).
    """
    key = shared_key(path, **kwargs)
    with _LOCK:
        engine = _SHARED.get(key)
        if engine is not None and not engine.stopped:  # one draining still holds its model: no second copy
            return engine
        key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with key_lock:
        with _LOCK:
            engine = _SHARED.get(key)
        if engine is None or engine.stopped:
            options = {name: _normalized(name, value) for name, value in kwargs.items()}
            engine = Engine.from_pretrained(str(path), **options)
            with _LOCK:
                _SHARED[key] = engine
        return engine
