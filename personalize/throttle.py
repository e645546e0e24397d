"""A sliding-window rate per key (a client address, a study participant), for what the
app serves to the public."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from personalize.errors import UserError

WINDOW_S = 60.0


class Throttle:
    """At most `per_minute` events per key in any 60 s. The table keeps the `keys` most
    recently seen keys only, so that many keys cannot fill the memory."""

    def __init__(self, per_minute: int, *, what: str = "requests", keys: int = 10_000, clock=time.monotonic):
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute, self.what, self.keys, self.clock = per_minute, what, keys, clock
        self.seen: OrderedDict[str, list[float]] = OrderedDict()
        self.lock = threading.Lock()

    def take(self, key: str) -> None:
        """Count one event of `key`; UserError (nothing counted) when it is over its rate."""
        now = self.clock()
        with self.lock:
            times = [t for t in self.seen.pop(key, []) if now - t < WINDOW_S]
            if len(times) >= self.per_minute:
                self.seen[key] = times
                raise UserError(f"too many {self.what}: at most {self.per_minute} a minute; "
                                f"try again in {WINDOW_S - (now - times[0]):.0f} s")
            times.append(now)
            self.seen[key] = times
            while len(self.seen) > self.keys:
                self.seen.popitem(last=False)
