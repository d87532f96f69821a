"""One retry policy for everything that talks over a network: tenacity, exponential backoff.

Only :class:`~snapsync.errors.TransientError` is retried (connection failures, timeouts, throttling,
5xx); anything else is permanent and fails at once with its reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from snapsync.errors import TransientError

log = logging.getLogger("snapsync")
ATTEMPTS = 4
_attempts: ContextVar[int] = ContextVar("snapsync_retry_attempts", default=ATTEMPTS)


@contextmanager
def attempts(n: int) -> Iterator[None]:
    """At most ``n`` attempts for whatever runs inside: a monitoring plugin has a deadline."""
    token = _attempts.set(n)
    try:
        yield
    finally:
        _attempts.reset(token)


def retry_policy() -> tuple[int, float]:
    """Attempts per operation and seconds before the first retry (doubling, capped at 30 s).

    ``SNAPSYNC_RETRY_ATTEMPTS`` and ``SNAPSYNC_RETRY_WAIT`` override them (tests, flaky links).
    """
    configured = os.environ.get("SNAPSYNC_RETRY_ATTEMPTS")
    count = int(configured) if configured is not None else _attempts.get()
    return count, float(os.environ.get("SNAPSYNC_RETRY_WAIT", "2"))


def retrying(what: str | Callable[[], str]) -> Retrying:
    attempts, wait = retry_policy()

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        label = what() if callable(what) else what
        text = str(error) if str(error).startswith(label) else f"{label}: {error}"
        log.warning("%s; retrying (attempt %d of %d)", text, state.attempt_number + 1, attempts,
                    extra={"event": "retry", "attempt": state.attempt_number + 1, "attempts": attempts})

    return Retrying(
        retry=retry_if_exception_type(TransientError),
        stop=stop_after_attempt(max(1, attempts)),
        wait=wait_exponential(multiplier=wait, max=30),
        reraise=True,
        before_sleep=before_sleep,
    )
