"""A warning that a flood of bad input cannot turn into a flood of log lines."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Hashable

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Logs a warning at most once per key every ``interval_s``; the next report
    of a key says how many were left out.  Past ``max_keys`` distinct keys,
    new keys share one, so that varied garbage cannot grow the table."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, max_keys: int = 64) -> None:
        self.logger, self.interval_s, self.max_keys = logger, interval_s, max_keys
        self._last: dict[Hashable, float] = {}
        self._suppressed: Counter = Counter()

    def key(self, key: Hashable) -> Hashable:
        """``key``, or ``"*"`` (the key shared by the rest) once ``max_keys`` are known."""
        return key if len(self._last) < self.max_keys or key in self._last else "*"

    def warning(self, key: Hashable, message: str, *args: object, exc_info: bool = False) -> bool:
        """Log ``message % args`` unless ``key`` was logged less than ``interval_s`` ago;
        True if it was logged."""
        key = self.key(key)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] += 1
            return False
        self._last[key] = now
        more = self._suppressed.pop(key, 0)
        note = f" ({more} more since the last report)" if more else ""
        self.logger.warning(message + "%s", *args, note, exc_info=exc_info)
        return True
