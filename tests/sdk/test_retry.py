"""The retry policy both transports follow: bounded, exponential backoff with jitter, server hints honoured."""

from __future__ import annotations

import pytest
from llava_next_sdk.retry import RetryPolicy


def test_backoff_doubles_up_to_its_cap_jittered_down_and_stops_after_max_retries():
    policy = RetryPolicy(max_retries=5, backoff_base=0.5, backoff_max=2.0)
    for attempt, full in enumerate([0.5, 1.0, 2.0, 2.0, 2.0]):
        delays = [policy.delay(attempt) for _ in range(50)]
        assert all(0.75 * full <= d <= full for d in delays) and len(set(delays)) > 1
    assert policy.delay(5) is None


def test_a_retry_after_hint_is_waited_for_jittered_up_unless_too_long():
    policy = RetryPolicy(max_retries=2, max_retry_after=10.0)
    assert all(1.0 <= policy.delay(0, 1.0) <= 1.25 for _ in range(50))
    assert policy.delay(0, 11.0) is None and policy.delay(2, 1.0) is None
    assert RetryPolicy(max_retries=0).delay(0) is None


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_max_retries_must_be_a_non_negative_integer(bad):
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=bad)
