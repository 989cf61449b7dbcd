"""``llava-next serve`` with injected model failures, for tests of what clients see when the model fails.

    python tests/faulty_serve.py --model PATH --port N ...   (the arguments of ``llava-next serve``)

Every engine this process loads runs a model that raises, during a prefill, when a prompt holds a
marker: ``RAISE-RUNTIME`` (a ``RuntimeError`` whose text is internal detail that must never reach a
client), ``RAISE-OOM`` (``torch.OutOfMemoryError``) or ``STOP-ENGINE`` (:class:`EngineThreadKiller`, which no
per-request handler catches: the engine thread ends, as a bug in its loop would end it). Everything else is the
real server, engine and model.
"""

from __future__ import annotations

import copy
import sys

import torch

from llava_next_plugin import serve_cli
from llava_next_plugin.engine import Engine

RUNTIME_MARKER = "RAISE-RUNTIME"
OOM_MARKER = "RAISE-OOM"
STOP_MARKER = "STOP-ENGINE"
INTERNAL_DETAIL = "device-side assert at /opt/secret/kernels.cu:42"


class EngineThreadKiller(BaseException):
    """Not an ``Exception``: it ends the engine thread."""


def inject_faults(engine: Engine) -> Engine:
    """Make *engine*'s model fail on the markers (see the module docstring); returns *engine*.

    The failure is raised where every prefill starts, whichever path runs it: the token embedding of a whole
    prompt (``input_ids [L]`` or ``[B, L]``; a decode step embeds ``[R, 1]`` and is left alone).
    """
    tokenizer = copy.deepcopy(engine.tokenizer)  # its own: the engine's is used by other threads

    def fail_on_markers(module, args, kwargs):
        input_ids = args[0] if args else kwargs.get("input")
        if input_ids is not None and input_ids.shape[-1] > 1:  # a prefill: look at the prompts
            rows = input_ids.reshape(-1, input_ids.shape[-1])
            texts = [tokenizer.decode(row[row != engine.pad_token_id]) for row in rows]
            if any(RUNTIME_MARKER in t for t in texts):
                raise RuntimeError(INTERNAL_DETAIL)
            if any(OOM_MARKER in t for t in texts):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            if any(STOP_MARKER in t for t in texts):
                raise EngineThreadKiller(INTERNAL_DETAIL)

    engine.model.get_input_embeddings().register_forward_pre_hook(fail_on_markers, with_kwargs=True)
    return engine


def main(argv: list[str]) -> int:
    load = Engine.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        return inject_faults(load(cls, *args, **kwargs))

    Engine.from_pretrained = classmethod(from_pretrained)
    return serve_cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
