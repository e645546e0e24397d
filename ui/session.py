"""Per-user data, kept in `gr.State` (never in module globals)."""

from __future__ import annotations

from dataclasses import dataclass, field

from personalize.runs.lab import Concept
from personalize.runs.live import Tickets


@dataclass
class Session:
    """Everything here is plain data, so that gradio can deep-copy it per user and ZeroGPU
    can pickle it into its worker."""
    concept: Concept
    history: list = field(default_factory=list)        # run cards with scores, newest last
    background: list = field(default_factory=list)     # rows of an uploaded sweep results.csv
    training: Tickets = field(default_factory=Tickets)  # the Train tab's runs: Stop supersedes the one going
