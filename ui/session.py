"""Per-user data, kept in `gr.State` (never in module globals)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from personalize.runs.lab import Concept


@dataclass
class Session:
    concept: Concept
    history: list = field(default_factory=list)        # run cards with scores, newest last
    background: list = field(default_factory=list)     # rows of an uploaded sweep results.csv
    _stop: threading.Event | None = None               # made on first use: gradio deep-copies the initial value

    @property
    def stop(self) -> threading.Event:
        """Set by the Stop button; the running generation checks it every step."""
        if self._stop is None:
            self._stop = threading.Event()
        return self._stop
