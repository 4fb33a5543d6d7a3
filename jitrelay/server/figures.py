"""One consistent reading of a relay's counters: what metrics, ``jitrelay stats`` and the exit summary show."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Figures:
    """One consistent reading of a relay's counters, taken on its event-loop thread."""

    domain: str
    verdicts: dict[str, int]
    bytes_received: int
    bytes_forwarded: int
    faults: dict[str, int]
    connections_open: int
    connections_accepted: int
    refused: dict[str, int]
    pending_max: int
    slow_actions: dict[str, int]
    journal_errors: int
    forward_buckets: tuple[int, ...]  # the relay's log-linear histogram, nanoseconds
    forward_total_ns: int
    subscriber_groups: int = 0

    def to_json(self) -> str:
        """One line of JSON: what tools read of a stopped relay, instead of its log lines."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)
