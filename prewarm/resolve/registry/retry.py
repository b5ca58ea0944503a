"""When to try a registry request again, and how long to wait first.

Only :class:`prewarm.errors.Transient` failures are retried (connection errors,
timeouts, 5xx, 429); auth errors, 404s and corrupt content fail at once.  The wait
is bounded exponential backoff with full jitter (so a fleet of nodes hitting the
same registry does not retry in lock step), except that a 429's ``Retry-After``
is honoured as a floor.  After the last attempt the last error is raised as is: it
already names registry, repository, digest and status.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from prewarm.errors import RateLimited, Transient

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter.

    Attributes:
        attempts: tries in total (1 = no retry).
        base_delay: the first backoff ceiling in seconds; doubles each attempt.
        max_delay: the largest backoff ceiling.
        max_retry_after: the longest Retry-After we are willing to wait.
        retry_rate_limited: retry a 429 here; fleet workers say False so the 429 reaches
            the fleet-wide budget at once (every worker backs off, not just this request).
    """

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 20.0
    max_retry_after: float = 60.0
    retry_rate_limited: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")

    def delay(self, attempt: int, retry_after: float | None = None,
              rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        wait = ceiling * rng()
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_retry_after))
        return wait

    def run(self, operation: Callable[[], T], what: str = "registry request",
            sleep: Callable[[float], None] = time.sleep) -> T:
        """Call ``operation`` until it succeeds, fails for good, or attempts run out.

        Raises:
            Whatever ``operation`` raised last; non-transient errors at once.
        """
        attempt = 1
        while True:
            try:
                return operation()
            except Exception as err:
                if not isinstance(err, Transient) or attempt >= self.attempts:
                    raise
                if isinstance(err, RateLimited) and not self.retry_rate_limited:
                    raise
                retry_after = err.retry_after if isinstance(err, RateLimited) else None
                wait = self.delay(attempt, retry_after)
                log.info("%s failed (%s); retry %d/%d in %.2fs", what, err, attempt, self.attempts - 1, wait)
                sleep(wait)
                attempt += 1


#: No retries at all: for callers that run their own (the fleet budget, tests).
NO_RETRY = RetryPolicy(attempts=1)
