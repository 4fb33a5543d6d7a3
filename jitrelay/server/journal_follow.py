"""Following a journal the relay is still writing: every message already there, then each one as it is appended.

``follow_journal`` is ``read_journal`` that does not stop at the end: it
reads each segment to its end, and at the end of the newest one waits
(polling every ``poll`` seconds) for more bytes or a new segment. The bytes
of a message being written are held back until the message is whole, so a
message is never shown torn or twice. Rotation closes a segment before the
next one is created, so once a newer segment exists the older one is read to
its end once more and left; what is left over there is a real torn tail,
logged as ``read_journal`` logs it. Segments that retention deletes before
they are reached are skipped with a warning naming them; the one being read
stays readable after it is deleted (it is open).

It stops, between polls, when ``stopped()`` says so.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.server.journal import _READ_CHUNK, _segments_named, decode_at

log = logging.getLogger("jitrelay.journal")

POLL_SECONDS = 0.1


def followed_journal(path: Path) -> tuple[Path, str]:
    """The folder and name of the one journal ``path`` names (a folder holding one, or ``DIR/NAME``)."""
    path = Path(path)
    if path.is_dir():
        names = sorted({p.name.rsplit("-", 1)[0] for p, _ in _segments_named(path, None)})
        if len(names) == 1:
            return path, names[0]
        if not names:
            raise FileNotFoundError(errno.ENOENT, "no journal segments (*-NNNNNN.journal) in", str(path))
        raise ValueError(f"{path} holds several journals ({', '.join(names)}): follow one, such as {path / names[0]}")
    if path.is_file():
        raise ValueError(f"{path} is one segment: follow its journal (the folder, or the folder and name)")
    if not _segments_named(path.parent, path.name):
        raise FileNotFoundError(errno.ENOENT, "no journal file, directory or segments named", str(path))
    return path.parent, path.name


class _SegmentTail:
    """One open segment read as it grows: whole messages out, the bytes of an unfinished one kept."""

    def __init__(self, path: Path, file: BinaryIO) -> None:
        self.path = path
        self.file = file
        self.pending = b""
        self.base = 0  # file offset of pending[0]

    def read(self) -> Iterator[protocol.Message]:
        """The whole messages appended since the last call."""
        while chunk := self.file.read(_READ_CHUNK):
            self.pending = self.pending + chunk if self.pending else chunk
            count, consumed, fault = kernels.frame(np.frombuffer(self.pending, dtype=np.uint8))
            pos = 0
            for _ in range(count):
                message, pos = decode_at(self.pending, pos, self.path, self.base)
                yield message
            if fault != protocol.NO_FAULT:
                magic = self.pending[consumed : consumed + 4].hex()
                raise protocol.ProtocolError(f"{self.path}: bad magic {magic} at byte offset {self.base + consumed}")
            self.pending = self.pending[consumed:]
            self.base += consumed

    def finish(self) -> None:
        """The segment is complete: anything left is a torn tail."""
        self.file.close()
        if self.pending:
            log.warning(
                "torn tail in %s at byte offset %d: ignoring %d bytes of an incomplete message",
                self.path,
                self.base,
                len(self.pending),
            )


def follow_journal(
    path: Path,
    stopped: Callable[[], bool],
    since_ns: int | None = None,
    until_ns: int | None = None,
    *,
    idle: Callable[[], object] = lambda: None,
    poll: float = POLL_SECONDS,
) -> Iterator[protocol.Message]:
    """The journal's messages in order, then the ones appended later, until ``stopped()`` (checked each poll).

    ``path`` names one journal (``followed_journal``); a missing journal raises
    here. ``since_ns`` and ``until_ns`` filter as in ``read_journal``.
    ``idle()`` is called before each wait (to flush what was printed).
    """
    directory, name = followed_journal(path)
    messages = _follow(directory, name, stopped, idle, poll)
    return (m for m in messages if _within(m, since_ns, until_ns))


def _within(message: protocol.Message, since_ns: int | None, until_ns: int | None) -> bool:
    stamp = message.header.timestamp_ns
    return (since_ns is None or stamp >= since_ns) and (until_ns is None or stamp < until_ns)


def _follow(
    directory: Path, name: str, stopped: Callable[[], bool], idle: Callable[[], object], poll: float
) -> Iterator[protocol.Message]:
    index = 0  # the segment number being read; 0 before the first
    tail: _SegmentTail | None = None
    try:
        while True:
            if tail is not None:
                yield from tail.read()
            later = [(path, i) for path, i in _segments_named(directory, name) if i > index]
            if later:
                if tail is not None:  # a newer segment exists: this one is complete; read what is left of it
                    yield from tail.read()
                    tail.finish()
                tail, index = _open_first(later, index)
                if tail is not None:
                    continue
            if stopped():
                return
            idle()
            time.sleep(poll)
    finally:
        if tail is not None:
            tail.file.close()


def _open_first(later: list[tuple[Path, int]], index: int) -> tuple[_SegmentTail | None, int]:
    """The first of ``later`` that still exists, opened; the ones retention deleted first are named."""
    missed = []
    for path, i in later:
        try:
            file = open(path, "rb")  # noqa: SIM115 - closed by _SegmentTail.finish
        except FileNotFoundError:
            missed.append(path.name)
            continue
        if missed:
            log.warning("segments deleted before they were read: %s", ", ".join(missed))
        return _SegmentTail(path, file), i
    if missed:
        log.warning("segments deleted before they were read: %s", ", ".join(missed))
    return None, max((i for _, i in later), default=index) if missed else index
