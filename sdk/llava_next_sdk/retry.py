"""When a failed request is tried again, and after how long: one policy for both transports.

The HTTP transport retries connect errors, 429 and 5xx before a response starts; the local transport retries
an :class:`~llava_next_sdk.errors.OverloadedError` (the engine's queue is full) before any token is produced.
Both wait what :meth:`RetryPolicy.delay` says.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["RetryPolicy", "DEFAULT_MAX_RETRIES"]

DEFAULT_MAX_RETRIES = 2


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter.

    :param max_retries: retries after the first attempt (0 disables them).
    :param backoff_base: the n-th retry (from 0) waits ``min(backoff_max, backoff_base * 2**n)`` seconds,
        jittered down by up to 25 %; when the error carries a ``retry_after``, that, jittered up by up to 25 %.
    :param backoff_max: the longest backoff, in seconds (see *backoff_base*).
    :param max_retry_after: a ``retry_after`` longer than this is not waited for: the error is raised.
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_retries, int) or isinstance(self.max_retries, bool) or self.max_retries < 0:
            raise ValueError(f"max_retries={self.max_retries!r} must be an integer >= 0")

    def delay(self, attempt: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retrying after failed attempt number *attempt* (from 0), or ``None`` when
        no retry is left or *retry_after* (the other side's hint, in seconds) is beyond ``max_retry_after``."""
        if attempt >= self.max_retries:
            return None
        if retry_after is not None:  # the other side's hint, jittered up so that a crowd does not return at once
            return retry_after * (1 + 0.25 * random.random()) if retry_after <= self.max_retry_after else None
        backoff = min(self.backoff_max, self.backoff_base * (2**attempt))
        return backoff * (1 - 0.25 * random.random())
