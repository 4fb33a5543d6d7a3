"""One consistent reading of a relay's counters: what metrics, ``jitrelay stats`` and the exit summary show."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Figures:
    """One consistent reading of a relay's counters, taken on its event-loop thread.

    The counters are what metrics export; the derived figures after them
    (message totals, forwarding percentiles, slow drops by pid, torn messages,
    kernel build) are there so that tools read a stopped relay's summary file
    instead of parsing its log lines.
    """

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
    messages_received: int = 0  # every complete message judged, control messages included
    messages_forwarded: int = 0
    batches: int = 0  # batches forwarded: the histogram's sample count
    # Forwarding time per batch (read to last subscriber write issued), from the histogram; 0 with no batch.
    forward_p50_us: float = 0.0
    forward_p99_us: float = 0.0
    forward_p99_9_us: float = 0.0
    forward_max_us: float = 0.0
    forward_ns_per_message: float = 0.0
    slow_disconnected_pids: tuple[int, ...] = ()  # the latest ones, bounded; TCP peers have no pid and are left out
    torn_messages: int = 0  # connections that closed with part of a message unread: the part was discarded
    kernel_build: str = ""  # which build of the loops runs: aot, jit or python
    kernel_load_seconds: float = 0.0  # loading (or building) and first calls, before the relay listened
    # The log and the cursors into it.
    log_size: int = 0
    log_used: int = 0  # bytes retained: from the oldest batch kept to the head
    log_epoch: int = 0  # names this process's stream: positions of another epoch are not positions here
    log_head: int = 0  # stream offset of the next byte appended
    subscribers_behind: int = 0  # cursors not at the head now
    fell_behind: int = 0  # times a subscriber's socket took less than a batch (it then caught up on its own)
    reads_polled: int = 0  # reads the relay made from its own epoll set, in compiled code (``--read-path compiled``)
    # (peer, bytes, messages) behind the head, for each subscriber that is behind now or reads shared memory
    lags: tuple[tuple[str, int, int], ...] = ()
    shared_readers: int = 0  # subscribers reading the log from shared memory
    # The relay's own time per batch (read to the send loop's call) and the time inside the send loop.
    own_buckets: tuple[int, ...] = ()
    own_total_ns: int = 0
    own_p50_us: float = 0.0
    own_p99_us: float = 0.0
    send_buckets: tuple[int, ...] = ()
    send_total_ns: int = 0
    send_p50_us: float = 0.0
    send_p99_us: float = 0.0
    # Publishers found never to read their socket: detached, never cut off, never holding anyone.
    never_reading: int = 0  # found since the start
    never_reading_open: int = 0  # of them, still connected
    unread_messages: int = 0  # others' messages they would have been sent and were not, open and closed ones
    unread_bytes: int = 0

    def to_dict(self) -> dict:
        """The figures as plain JSON-ready values."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """One line of JSON: what tools read of a stopped relay, instead of its log lines."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def write(self, path: Path) -> None:
        """Write the JSON to ``path`` atomically (a temp file beside it, then a rename): never half a file.

        The file is readable by the relay's user only, as ``mkstemp`` makes it.
        """
        path = Path(path)
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(self.to_json() + "\n")
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise


def read_figures(path: Path) -> dict:
    """The figures a relay wrote to its summary file, as a dict (the fields of :class:`Figures`)."""
    return json.loads(Path(path).read_text())
