"""What the JetStream carrier keeps across a restart: the state file, and the echoes it must skip."""

from __future__ import annotations

import collections
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("jitrelay.bridge")


class BridgeState:
    """What a bridge must remember across its own restart, in one JSON file replaced atomically.

    ``streams``: per sending host, the next (sequence, offset) the receiver
    expects. ``echo``: headers of messages the receiver wrote into the relay
    that the journal reader has not passed yet. ``sender``: where the sending
    side stands (sequence, offset, journal position), for when the stream holds
    nothing of this host's. ``pending``: the batch being written into the relay
    (saved before the write, cleared after it), for a restart to find out from
    the journal how much of it the relay took.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.streams: dict[str, tuple[int, int]] = {}
        self.echo: collections.Counter[bytes] = collections.Counter()
        self.sender: dict[str, Any] = {}
        self.pending: list[list[Any]] = []  # the batch being written: [sender, sequence, offset, headers, sizes]
        self.writes = 0

    def load(self) -> BridgeState:
        """Read the file, if there is one; an unreadable one is logged and ignored, so this raises nothing."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return self
        except (OSError, ValueError) as exc:
            log.warning("ignoring the bridge state in %s: %s", self.path, exc)
            return self
        self.streams = {k: (int(v[0]), int(v[1])) for k, v in data.get("streams", {}).items()}
        self.echo = collections.Counter(bytes.fromhex(h) for h in data.get("echo", []))
        self.sender = dict(data.get("sender", {}))
        self.pending = list(data.get("pending", []))
        return self

    def save(self, echo_extra: collections.Counter[bytes] | None = None) -> None:
        """Replace the file atomically, with ``echo_extra`` among the echoes; raises OSError if it cannot be written."""
        echo = self.echo + echo_extra if echo_extra else self.echo
        data = {
            "streams": {k: list(v) for k, v in self.streams.items()},
            "echo": [key.hex() for key, n in echo.items() for _ in range(n)],
            "sender": self.sender,
            "pending": self.pending,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)
        self.writes += 1


@dataclass
class EchoFilter:
    """Headers of messages the receiver wrote into the relay, to be skipped when the journal reader meets them.

    A matched header is kept until the stream has acknowledged a publish whose
    journal position is past it, so that a sender resuming from the stream's
    last message meets it again and skips it again.
    """

    waiting: collections.Counter[bytes] = field(default_factory=collections.Counter)
    matched: collections.deque[tuple[tuple[int, int], bytes]] = field(default_factory=collections.deque)

    def persisted(self) -> collections.Counter[bytes]:
        """Every header still to be skipped, matched or not: what a restart must remember."""
        kept = collections.Counter(self.waiting)
        for _, key in self.matched:
            kept[key] += 1
        return kept

    def take(self, key: bytes, position: tuple[int, int]) -> bool:
        """Whether the journal message with header ``key`` at ``position`` is one of ours, to be skipped."""
        if self.waiting.get(key, 0) <= 0:
            return False
        self.waiting[key] -= 1
        if not self.waiting[key]:
            del self.waiting[key]
        self.matched.append((position, key))
        return True

    def passed(self, position: tuple[int, int]) -> None:
        """The stream acknowledged a publish up to ``position``: forget the echoes before it."""
        while self.matched and self.matched[0][0] <= position:
            self.matched.popleft()
