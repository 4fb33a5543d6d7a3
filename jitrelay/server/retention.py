"""Journal retention: which whole segments to delete, oldest first, by total size and by age.

A pure decision (``expired``) over what the folder holds, and ``prune``, which
applies it and logs each deletion. Only a prefix of the journal is ever
deleted: the oldest segments, up to the first one that both limits keep, so
the segments left are always one unbroken run that ends in the segment being
written, which is never deleted. A subscriber resuming from a position in a
deleted segment hears of the gap (``journal.find_replay``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("jitrelay.journal")

POSITION_SUFFIX = ".position"


class SegmentFile(NamedTuple):
    """A segment as retention sees it: where, how big, when last written (seconds since the epoch)."""

    path: Path
    size: int
    mtime: float


def expired(
    segments: Sequence[SegmentFile], current: Path, keep_bytes: int | None, keep_seconds: float | None, now: float
) -> list[tuple[SegmentFile, str]]:
    """The segments to delete, oldest first, each with why; ``segments`` in writing order, ``current`` never.

    A segment goes while the closed segments (all but the one being written)
    hold more than ``keep_bytes``, or when it was last written more than
    ``keep_seconds`` ago. Applied at each rotation, this keeps the journal
    within ``keep_bytes`` plus the segment being written.
    """
    total = sum(segment.size for segment in segments if segment.path != current)
    chosen = []
    for segment in segments:
        if segment.path == current:
            break
        if keep_bytes is not None and total > keep_bytes:
            why = f"the closed segments hold {total} bytes, more than the {keep_bytes} it keeps"
        elif keep_seconds is not None and now - segment.mtime > keep_seconds:
            why = f"last written {now - segment.mtime:.0f} s ago, longer than the {keep_seconds:g} s it keeps"
        else:
            break
        chosen.append((segment, why))
        total -= segment.size
    return chosen


def prune(
    paths: Sequence[Path], current: Path, keep_bytes: int | None, keep_seconds: float | None, now: float
) -> list[Path]:
    """Delete the segments of ``paths`` (writing order) that ``expired`` names, and their position files.

    Each deletion is logged; one that fails is logged and ends this pass (the
    next pass tries again), so that what is left stays one unbroken run.
    """
    segments = []
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        segments.append(SegmentFile(path, stat.st_size, stat.st_mtime))
    deleted = []
    for segment, why in expired(segments, current, keep_bytes, keep_seconds, now):
        try:
            os.unlink(segment.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("journal retention: cannot delete %s: %s", segment.path, exc)
            break
        try:
            os.unlink(segment.path.with_name(segment.path.name + POSITION_SUFFIX))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("journal retention: cannot delete the position file of %s: %s", segment.path, exc)
        log.info("journal retention: deleted %s (%d bytes): %s", segment.path, segment.size, why)
        deleted.append(segment.path)
    return deleted


def prune_interval(keep_seconds: float) -> float:
    """How often a running relay applies the age limit between rotations: a tenth of it, from 1 s to 60 s."""
    return min(60.0, max(1.0, keep_seconds / 10))


class PruneTimer:
    """Applies retention every ``interval`` seconds on the event loop, so that an idle journal ages out too."""

    def __init__(self, prune: Callable[[], object], interval: float, loop: asyncio.AbstractEventLoop) -> None:
        self.prune = prune
        self.interval = interval
        self.loop = loop
        self._handle: asyncio.TimerHandle | None = loop.call_later(interval, self._run)

    def _run(self) -> None:
        try:
            self.prune()
        except OSError as exc:
            log.error("journal retention: %s", exc)
        self._handle = self.loop.call_later(self.interval, self._run)

    def stop(self) -> None:
        """No more passes."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
