"""Leave the CPU's cores to the engine thread's OpenMP workers.

torch runs every CPU op above a small size on OpenMP threads. GNU OpenMP (libgomp, in torch's Linux wheels)
gives each thread that runs such an op a team of worker threads of its own, which stay alive and idle after it.
While the teams of all threads hold more threads than the machine has cores, libgomp stops letting idle
workers spin: every parallel op then wakes its workers from sleep, which takes tens of microseconds on a quiet
machine and up to milliseconds on a busy VM. The thread that loaded the model holds such a team, and so does
every thread that prepared a large image, so the engine thread's own team was always in that state.
Measured on a 2-core VM (small checkpoint, 16 rows): the decode step took 5.6 ms with the loading thread's
team alive and 4.1 ms without it (medians of ten runs, taking turns); the LM head alone 0.9-2.3 ms and 0.9 ms.

:func:`release_idle_workers` lets the calling thread's idle workers go (OpenMP's soft pause of the host: the
next parallel op in that thread starts them again, a few tens of microseconds once). The engine calls it in
the thread that starts it and at the end of every ``prepare``, so the engine thread's team is the one that
stays; and in the engine thread whenever its batch empties, so that an idle engine leaves the cores' spinning
to the application's own threads. Any other OpenMP runtime (LLVM's libomp pauses every thread's workers at
once, Intel's likewise), or none, is left alone.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["release_idle_workers"]

logger = logging.getLogger(__name__)

_SOFT = 1  # omp_pause_soft


@functools.cache
def _pause() -> Callable[[], int] | None:
    """``omp_pause_resource(omp_pause_soft, host)`` of the libgomp torch runs on, or ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    import torch

    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    libraries = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    if not libraries:
        return None
    try:
        # RTLD_NOLOAD: the copy torch has loaded, or nothing (never a second copy of the runtime)
        gomp = ctypes.CDLL(str(libraries[0]), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        pause, host = gomp.omp_pause_resource, gomp.omp_get_initial_device
    except (OSError, AttributeError) as exc:
        logger.debug("OpenMP workers are not released: %s", exc)
        return None
    pause.argtypes, pause.restype, host.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int, ctypes.c_int
    device = host()
    return lambda: pause(_SOFT, device)


def release_idle_workers() -> bool:
    """Let the calling thread's idle OpenMP worker threads go; whether they were (or there were none).

    Only the calling thread's own workers: another thread's parallel ops, even running now, are untouched."""
    pause = _pause()
    return pause is not None and pause() == 0
