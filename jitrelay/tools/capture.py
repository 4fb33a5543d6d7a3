"""Captures: a recorded stream in the journal's segments, with the time each batch was received beside them.

Operations: ``CaptureWriter.append`` adds one received batch (whole messages)
with its receive time; ``read_capture`` gives back, for a capture or any
journal, every segment mapped into memory with a table of its batches: where
each ends and when it was received. ``record`` writes with the first,
``replay`` sends with the second.

The messages go into journal segments (``server.journal``) unchanged:
``<FILE>-NNNNNN.journal``, whole Protocol V2 messages back to back, rotated
between appends, a new segment at each start. So ``jitrelay audit FILE``
prints a capture, and ``replay`` replays an execution journal. What the
journal format has no room for is the receive time, so each segment has a
side file ``<segment>.times``: one 16-byte entry per appended batch, two
little-endian int64s, the byte offset in the segment where the batch ends and
the receive time (``CLOCK_REALTIME``, ns since the epoch). Messages of one
batch arrived in one read, so they share its time; one entry per batch
rather than per message keeps the side file about a ten-thousandth of the
capture at full rate and costs one small write per read.

Reading trusts nothing it can check cheaply: each segment is framed once
(``kernels.frame``, compiled), a torn tail is logged and left out, bad magic
is corruption (``ProtocolError`` naming file and offset), a torn last entry
of a side file is ignored, and whole messages the side file does not cover
(the recorder died between the two writes) take the time of the entry
before them. A segment without a side file (a journal the relay wrote) has
no receive times: ``Segment.timed`` is False.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.server.journal import FILE_MODE, Journal, segment_paths

log = logging.getLogger("jitrelay.capture")

TIMES_SUFFIX = ".times"
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
TIMES_DTYPE = np.dtype([("end", "<i8"), ("ns", "<i8")])  # one entry per appended batch


def times_path(segment: Path) -> Path:
    """The side file of ``segment`` that holds its batches' receive times."""
    return segment.with_name(segment.name + TIMES_SUFFIX)


class CaptureWriter:
    """Append received batches to journal segments ``<file>-NNNNNN.journal``, and their receive times beside them.

    ``file`` is a path prefix: ``captures/md`` writes ``captures/md-000001.journal``
    and ``captures/md-000001.journal.times``. Each writer starts a new
    segment, as the journal does. Not thread-safe.
    """

    def __init__(self, file: Path, *, rotate_bytes: int, fsync: str = "none") -> None:
        file = Path(file)
        self.journal = Journal(file.parent, file.name, fsync=fsync, rotate_bytes=rotate_bytes)
        self.segments = 0
        self.batches = 0
        self._segment: Path | None = None
        self._size = 0  # bytes in the current segment
        self._times = -1

    @property
    def path(self) -> Path:
        """The segment being written."""
        return self.journal.path

    @property
    def messages(self) -> int:
        """Messages appended so far."""
        return self.journal.messages

    @property
    def bytes_written(self) -> int:
        """Bytes of messages appended so far."""
        return self.journal.bytes_written

    def append(self, batch: np.ndarray, received_ns: int, count: int) -> None:
        """Append ``batch`` (``count`` whole messages, received at ``received_ns``), then its side-file entry.

        The messages are written first: a crash between the two writes leaves
        messages without an entry, which a reader times from the entry before.
        Raises ``OSError`` when a write fails.
        """
        self.journal.append([batch], count=count)
        if self.journal.path != self._segment:  # the journal rotated: the batch went whole into a new segment
            self._start_times()
        self._size += len(batch)
        entry = np.array([(self._size, received_ns)], dtype=TIMES_DTYPE)
        os.write(self._times, entry.tobytes())
        self.batches += 1

    def sync(self) -> None:
        """Put what is written on disk whatever the fsync policy (the recorder's last step)."""
        self.journal.sync()
        if self._times >= 0:
            os.fsync(self._times)

    def close(self) -> None:
        """Close the segment and its side file. Closing twice is harmless."""
        self.journal.close()
        if self._times >= 0:
            os.close(self._times)
            self._times = -1

    def _start_times(self) -> None:
        if self._times >= 0:
            os.close(self._times)
        self._segment = self.journal.path
        self._size = 0
        self.segments += 1
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        self._times = os.open(times_path(self._segment), flags, FILE_MODE)


@dataclass
class Segment:
    """One segment of a capture, mapped: its whole messages and its batches (``ends``, ``times``).

    ``data`` holds the segment's ``messages`` whole messages (a torn tail left out);
    batch ``i`` is ``data[ends[i - 1]:ends[i]]`` (from 0 for the first),
    received at ``times[i]`` ns, or, when ``timed`` is False (no side
    file), one batch of everything at time 0.
    """

    path: Path
    data: np.ndarray
    messages: int
    ends: np.ndarray
    times: np.ndarray
    timed: bool

    @property
    def starts(self) -> np.ndarray:
        """Where each batch starts."""
        return np.concatenate([[0], self.ends[:-1]]).astype(np.int64)


def read_capture(file: Path) -> Iterator[Segment]:
    """The segments of a capture (or journal) ``file``, in order, each mapped and checked; see the module's notes.

    ``file`` is resolved now (``FileNotFoundError`` when it names nothing);
    segments are mapped one at a time. Raises ``protocol.ProtocolError`` at a
    segment that does not start a message where one should start.
    """
    return (read_segment(path) for path in segment_paths(file))


def read_segment(path: Path) -> Segment:
    """One segment mapped, framed and tabled; see ``read_capture``."""
    data = _map(path)
    messages, whole, fault = kernels.frame(data)
    if fault != protocol.NO_FAULT:
        magic = bytes(data[whole : whole + 4]).hex()
        raise protocol.ProtocolError(f"{path}: bad magic {magic} at byte offset {whole}")
    if whole < len(data):
        log.warning(
            "torn tail in %s at byte offset %d: ignoring %d bytes of an incomplete message",
            path,
            whole,
            len(data) - whole,
        )
    data = data[:whole]
    try:
        raw = times_path(path).read_bytes()
    except FileNotFoundError:
        ends = np.array([whole] if whole else [], dtype=np.int64)
        return Segment(path, data, messages, ends, np.zeros(len(ends), dtype=np.int64), timed=False)
    table = np.frombuffer(raw[: len(raw) - len(raw) % TIMES_DTYPE.itemsize], dtype=TIMES_DTYPE)
    ends, times = table["end"].astype(np.int64), table["ns"].astype(np.int64)
    if len(ends) and (ends[0] <= 0 or np.any(np.diff(ends) <= 0)):
        raise protocol.ProtocolError(f"{times_path(path)}: batch ends do not increase")
    keep = ends <= whole  # entries past a torn tail point at messages that are not whole
    ends, times = ends[keep], times[keep]
    if whole > (ends[-1] if len(ends) else 0):  # messages the side file does not cover: the time before them
        ends = np.append(ends, whole)
        times = np.append(times, times[-1] if len(times) else 0)
    return Segment(path, data, messages, ends, times, timed=True)


def _map(path: Path) -> np.ndarray:
    """The file's bytes, mapped read-only (an empty array for an empty file)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not size:
            return np.zeros(0, dtype=np.uint8)
        # Populated at once: one call maps the pages the page cache holds, rather than a fault per 4 KiB sent.
        mapped = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
    return np.frombuffer(mapped, dtype=np.uint8)
