"""The execution audit journal: every forwarded message, appended to disk in the wire format.

Operations: ``Journal.append`` writes whole messages, back to back, exactly as
they went out; ``read_journal`` gives them back in order. There is no framing
of its own: a segment is a stream of Protocol V2 messages, so the relay
writes the bytes it already holds and a reader frames them like a subscriber.

Goals:

- Append-only. A segment is opened with ``O_EXCL | O_APPEND`` and never
  reopened for writing; a restart starts the next segment.
- Messages never straddle segments: rotation happens between appends, and an
  append holds whole messages only.
- After a crash the journal reads back up to its last complete message. A
  segment that ends in the middle of a message (a torn tail) loses that one
  message, with a warning; it is never misread. Anything else that is wrong
  (bad magic, a malformed record, a checksum mismatch where the domain carries
  checksums) is corruption and raises ``ProtocolError`` naming file and offset.
- A failed write never leaves a torn message in front of later ones: the
  segment is cut back to its last whole append, or, if that fails too, closed
  and the next append starts a new one.

Durability is the ``fsync`` policy: ``every`` (each append is on disk before
``append`` returns), ``batch`` (at most ``sync_interval`` seconds of appends are
at risk, provided ``maybe_sync`` keeps being called), ``none`` (the OS writes
back when it likes; a process crash loses nothing, a power cut may).

Not measured yet: the cost of ``every`` on the relay's throughput.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.domains import FSYNC_BATCH, FSYNC_EVERY, FSYNC_NONE, RelayLogic, checksum_expected
from jitrelay.core.domains import JOURNAL_FSYNC as FSYNC_POLICIES
from jitrelay.core.units import MiB
from jitrelay.server import retention

log = logging.getLogger("jitrelay.journal")

SUFFIX = ".journal"
DIRECTORY_MODE = 0o770
FILE_MODE = 0o640
_READ_CHUNK = 4 * MiB
_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)
_SEGMENT = re.compile(r"(.+)-(\d+)" + re.escape(SUFFIX))


def segment_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}{SUFFIX}"


class Journal:
    """Append-only segments ``<directory>/<name>-<NNNNNN>.journal`` of raw wire messages.

    Not thread-safe; one writer per name and directory (the relay refuses to
    run twice, and ``O_EXCL`` refuses to share a segment).
    """

    def __init__(
        self,
        directory: Path,
        name: str,
        *,
        fsync: str = RelayLogic.journal_fsync,
        rotate_bytes: int = RelayLogic.journal_rotate_bytes,
        sync_interval: float = 0.05,
        keep_bytes: int | None = None,
        keep_seconds: float | None = None,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, not {fsync!r}")
        if rotate_bytes <= 0:
            raise ValueError("rotate_bytes must be positive")
        if sync_interval < 0:
            raise ValueError("sync_interval must not be negative")
        if (keep_bytes is not None and keep_bytes <= 0) or (keep_seconds is not None and keep_seconds <= 0):
            raise ValueError("keep_bytes and keep_seconds must be positive")
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"not a journal name: {name!r}")
        self.directory = Path(directory)
        self.name = name
        self.fsync = fsync
        self.rotate_bytes = rotate_bytes
        self.sync_interval = sync_interval
        self.keep_bytes = keep_bytes
        self.keep_seconds = keep_seconds
        self.failure: str | None = None  # why the last append or fsync failed; None once one succeeds again
        self.segments_deleted = 0
        self.bytes_written = 0
        self.messages = 0  # counted from ``append(..., count=n)``; 0 if callers do not pass counts
        self._fd = -1
        self._path = self.directory
        self._index = 0
        self._size = 0  # bytes in the current segment
        self._unsynced = False
        self._broken = False  # a failed write could not be undone: the next append starts a new segment
        self._positioned = False  # the current segment starts with where in the relay's stream it is
        self._last_sync = time.monotonic()
        if not self.directory.exists():
            self.directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
            os.chmod(self.directory, DIRECTORY_MODE)
        self._index = max((index for _, index in _segments_named(self.directory, name)), default=0)
        self._open_next()

    @property
    def path(self) -> Path:
        """The segment being written."""
        return self._path

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def append(self, pieces: Sequence, count: int | None = None, at: tuple[int, int, int] | None = None) -> None:
        """Write ``pieces`` (buffers holding whole messages back to back) at the end of the journal.

        ``count``, when given, is how many messages the pieces hold; it only
        feeds ``messages``. ``at`` is the relay's stream position of the first
        of them, ``(epoch, offset, message)``: a segment's first append records
        it beside the segment (``<segment>.position``), so that a subscriber
        can resume from the journal after the relay's log has let it go, even
        across restarts. Under ``every`` the bytes are on disk when this returns.
        """
        if self._fd < 0:
            raise ValueError("append to a closed journal")
        views = [v for v in (memoryview(p).cast("B") for p in pieces) if len(v)]
        total = sum(len(v) for v in views)
        if self._broken or (self._size and self._size + total > self.rotate_bytes):
            self._rotate()
        if at is not None and self._size == 0 and not self._positioned:
            _write_position(self._path, at)
            self._positioned = True
        try:
            _write_all(self._fd, views)
        except BaseException as exc:
            self.failure = f"append to {self._path} failed: {exc}"
            self._undo_partial_write()
            raise
        self.failure = None
        self._size += total
        self.bytes_written += total
        if count is not None:
            self.messages += count
        if total:
            self._unsynced = True
            if self.fsync == FSYNC_EVERY:
                self._sync()

    def maybe_sync(self) -> None:
        """Under ``batch``: fsync if anything is unsynced and ``sync_interval`` has passed since the last fsync.

        The relay calls it after each batch; an idle relay should call it
        once more after ``sync_interval`` so that its last batch reaches disk.
        """
        due = time.monotonic() - self._last_sync >= self.sync_interval
        if self.fsync == FSYNC_BATCH and self._unsynced and self._fd >= 0 and due:
            self._sync()

    def sync(self) -> None:
        """fsync now whatever is unsynced, whatever the policy."""
        if self._unsynced and self._fd >= 0:
            self._sync()

    def close(self) -> None:
        """fsync (unless the policy is ``none``) and close. Closing twice is harmless."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            if self.fsync != FSYNC_NONE and self._unsynced:
                os.fsync(fd)
                self._unsynced = False
        finally:
            os.close(fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Journal {self._path} fsync={self.fsync} {self.bytes_written} bytes written>"

    @property
    def keeps_all(self) -> bool:
        """Whether no retention limit is set: the journal never deletes a segment."""
        return self.keep_bytes is None and self.keep_seconds is None

    def prune(self, now: float | None = None) -> list[Path]:
        """Delete whole old segments over ``keep_bytes`` or ``keep_seconds``, never the one being written.

        Called after each rotation and, for the age limit, every so often by
        the relay; each deletion is logged (``retention.prune``).
        """
        if self.keeps_all or self._fd < 0:
            return []
        paths = [path for path, _ in _segments_named(self.directory, self.name)]
        when = time.time() if now is None else now
        deleted = retention.prune(paths, self._path, self.keep_bytes, self.keep_seconds, when)
        self.segments_deleted += len(deleted)
        return deleted

    def _sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self.failure = f"fsync of {self._path} failed: {exc}"
            raise
        self._unsynced = False
        self._last_sync = time.monotonic()

    def _open_next(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        while True:
            self._index += 1
            path = self.directory / segment_name(self.name, self._index)
            try:
                self._fd = os.open(path, flags, FILE_MODE)
                break
            except FileExistsError:  # another writer took this number; never touch its file
                continue
        self._path = path
        self._size = 0
        self._broken = False
        self._positioned = False  # its first append writes where in the relay's stream it starts
        if self.fsync != FSYNC_NONE:
            _sync_directory(self.directory)  # the new name survives a power cut too

    def _rotate(self) -> None:
        try:
            self.close()
        finally:  # even when the old segment's fsync failed, later appends get a segment of their own
            self._unsynced = False
            self._open_next()
        try:
            self.prune()
        except OSError as exc:  # retention must never refuse an append
            log.error("journal retention: cannot list %s: %s", self.directory, exc)

    def _undo_partial_write(self) -> None:
        """Cut the segment back to its last whole append, so that no torn message precedes later ones."""
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            self._broken = True


POSITION_SUFFIX = retention.POSITION_SUFFIX
CHUNK_BYTES = 1 * MiB  # what a replay reads from a segment at once


def _write_position(segment: Path, at: tuple[int, int, int]) -> None:
    """``<segment>.position``: the epoch, stream offset and message number the segment's first message has."""
    epoch, offset, message = at
    final = segment.with_name(segment.name + POSITION_SUFFIX)
    temp = final.with_name(final.name + ".tmp")
    temp.write_text(f"{epoch:x} {offset} {message}\n")
    os.replace(temp, final)


def segment_positions(directory: Path, name: str) -> list[tuple[Path, int, int, int]]:
    """Each positioned segment of journal ``name`` in writing order: ``(path, epoch, offset, message)``."""
    found = []
    for path, _ in _segments_named(directory, name):
        try:
            epoch, offset, message = path.with_name(path.name + POSITION_SUFFIX).read_text().split()
        except (FileNotFoundError, ValueError):
            continue
        found.append((path, int(epoch, 16), int(offset), int(message)))
    return found


class Replay:
    """A journal read back from a stream position onwards, in chunks of whole messages, for a resuming subscriber.

    ``next_chunk`` gives the bytes of the next messages and the position of
    the first of them, until it reaches ``until`` in epoch ``current`` (or
    the journal's end); positions move on across restarts (epochs).
    """

    def __init__(
        self,
        segments: list[tuple[Path, int, int, int]],
        start: int,
        offset: int,
        message: int,
        gap: protocol.Gap | None = None,
    ) -> None:
        self._segments = segments[start:]
        path, epoch, first, _ = self._segments[0]
        self._file = open(path, "rb")  # noqa: SIM115 - read across many calls, closed by close()
        self._file.seek(offset - first)
        self.epoch, self.offset, self.message = epoch, offset, message
        self._gap = gap  # history retention deleted before the replay reached it, to be told before the rest

    def take_gap(self) -> protocol.Gap | None:
        """The gap to tell the subscriber of before the next chunk (segments deleted by retention), once."""
        gap, self._gap = self._gap, None
        return gap

    def next_chunk(self, current: int, until: int, limit: int = CHUNK_BYTES) -> bytes | None:
        """Whole messages from the position reached, at most ``limit`` bytes, not past ``until`` of ``current``."""
        while True:
            if self.epoch == current and self.offset >= until:
                return None
            room = limit if self.epoch != current else min(limit, until - self.offset)
            data = self._file.read(room)
            if data:
                whole = _whole_prefix(data)
                if whole < len(data):
                    self._file.seek(whole - len(data), os.SEEK_CUR)
                if whole:
                    return data[:whole]
                if room < limit:  # a message larger than what is left before ``until``: the journal lies
                    raise protocol.ProtocolError(f"journal {self._file.name}: no whole message at {self.offset}")
            if not self._next_segment():
                return None

    def advance(self, data: bytes) -> None:
        """``data`` (whole messages from ``next_chunk``) went out."""
        self.offset += len(data)
        self.message += kernels.frame(np.frombuffer(data, dtype=np.uint8))[0]

    def _next_segment(self) -> bool:
        """Open the next segment; segments retention deleted are skipped, and the history lost is a gap.

        Within an epoch a segment starts where the one before ended, so a
        jump in offsets is exactly what was deleted; deleted segments between
        epochs leave the count unknown.
        """
        self._file.close()
        skipped = False
        while True:
            self._segments = self._segments[1:]
            if not self._segments:
                return False
            path, epoch, offset, message = self._segments[0]
            try:
                self._file = open(path, "rb")  # noqa: SIM115
                break
            except FileNotFoundError:
                skipped = True
        if (skipped and epoch != self.epoch) or (epoch == self.epoch and offset != self.offset):
            self._gap = missing_history(self.epoch, self.offset, self.message, epoch, offset, message)
        self.epoch, self.offset, self.message = epoch, offset, message
        return True

    def close(self) -> None:
        self._file.close()


def _whole_prefix(data: bytes) -> int:
    """The length of the whole messages at the start of ``data``."""
    return kernels.frame(np.frombuffer(data, dtype=np.uint8))[1]


def find_replay(directory: Path, name: str, epoch: int, offset: int, message: int) -> Replay | None:
    """A replay of journal ``name`` from ``(epoch, offset)`` if the journal holds that position, else None.

    A position in a segment retention has deleted replays from the oldest
    segment kept of its epoch, with the exact gap (``Replay.take_gap``).
    """
    segments = segment_positions(directory, name)
    best = None
    for i, (path, segment_epoch, first, _) in enumerate(segments):
        if segment_epoch == epoch and first <= offset:
            following = segments[i + 1] if i + 1 < len(segments) else None
            last_of_epoch = following is None or following[1] != epoch or offset <= following[2]
            if last_of_epoch and offset - first <= path.stat().st_size:
                best = i
    if best is not None:
        return Replay(segments, best, offset, message)
    kept = next((i for i, segment in enumerate(segments) if segment[1] == epoch and segment[2] > offset), None)
    if kept is None:
        return None
    # Retention deleted the segment that held the position: the rest of the epoch from the oldest kept one.
    _, _, first, number = segments[kept]
    return Replay(segments, kept, first, number, missing_history(epoch, offset, message, epoch, first, number))


def missing_history(
    epoch: int, offset: int, message: int, to_epoch: int, to_offset: int, to_message: int
) -> protocol.Gap:
    """The gap between a position and the next one the journal holds: exact within an epoch, unknown across."""
    if epoch != to_epoch:
        return protocol.Gap(protocol.GAP_UNKNOWN_EPOCH, protocol.UNKNOWN, protocol.UNKNOWN)
    return protocol.Gap(protocol.GAP_LEFT_LOG, to_message - message, to_offset - offset)


def _write_all(fd: int, views: list[memoryview]) -> None:
    """Write every byte of ``views``: one ``writev`` per ``IOV_MAX`` buffers, resumed after partial writes."""
    i = 0
    while i < len(views):
        written = os.writev(fd, views[i : i + _IOV_MAX])
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        while written:
            size = len(views[i])
            if written >= size:
                written -= size
                i += 1
            else:
                views[i] = views[i][written:]
                written = 0


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _segments_named(directory: Path, name: str | None) -> list[tuple[Path, int]]:
    """(path, index) of the segments in ``directory`` (of one name, or of all), in writing order."""
    found = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        match = _SEGMENT.fullmatch(entry.name)
        if match and (name is None or match.group(1) == name) and entry.is_file():
            found.append((match.group(1), int(match.group(2)), Path(entry.path)))
    found.sort(key=lambda item: (item[0], item[1]))
    return [(path, index) for _, index, path in found]


def segment_paths(path: Path) -> list[Path]:
    """The segments ``path`` names, in order: one file, every ``*.journal`` of a directory, or a name prefix.

    ``/var/lib/jitrelay/execution`` names ``/var/lib/jitrelay/execution-*.journal``
    when it is neither a file nor a directory. Raises ``FileNotFoundError`` when
    it names nothing.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [p for p, _ in _segments_named(path, None)]
        if not found:
            raise FileNotFoundError(errno.ENOENT, "no journal segments (*-NNNNNN.journal) in", str(path))
        return found
    found = [p for p, _ in _segments_named(path.parent, path.name)]
    if not found:
        raise FileNotFoundError(errno.ENOENT, "no journal file, directory or segments named", str(path))
    return found


def read_journal(path: Path, since_ns: int | None = None, until_ns: int | None = None) -> Iterator[protocol.Message]:
    """The messages of a journal in the order they were written.

    ``path`` is as for ``segment_paths``, which is resolved now (a missing
    journal raises here); the segments are read lazily. ``since_ns`` and
    ``until_ns`` keep messages whose header timestamp is in
    ``[since_ns, until_ns)``; every message is still checked. A torn tail at
    the end of a segment is logged and skipped; corruption raises
    ``ProtocolError`` after the messages before it have been yielded.
    """
    return _read_segments(segment_paths(path), since_ns, until_ns)


def _read_segments(segments: list[Path], since_ns: int | None, until_ns: int | None) -> Iterator[protocol.Message]:
    for segment in segments:
        for message in read_segment(segment):
            stamp = message.header.timestamp_ns
            if (since_ns is None or stamp >= since_ns) and (until_ns is None or stamp < until_ns):
                yield message


def read_segment(path: Path) -> Iterator[protocol.Message]:
    """The messages of one segment file; see ``read_journal``."""
    with open(path, "rb") as f:
        pending = b""  # bytes read but not yet decoded
        base = 0  # file offset of pending[0]
        want = _READ_CHUNK
        while True:
            chunk = f.read(want)
            if not chunk:
                break
            pending = pending + chunk if pending else chunk
            count, consumed, fault = kernels.frame(np.frombuffer(pending, dtype=np.uint8))
            pos = 0
            for _ in range(count):
                message, pos = decode_at(pending, pos, path, base)
                yield message
            if fault != protocol.NO_FAULT:
                magic = pending[consumed : consumed + 4].hex()
                raise protocol.ProtocolError(f"{path}: bad magic {magic} at byte offset {base + consumed}")
            pending = pending[consumed:]
            base += consumed
            want = _READ_CHUNK
            if len(pending) >= protocol.HEADER_SIZE:  # read the rest of a long message at once
                payload = pending[protocol.OFF_PAYLOAD_SIZE : protocol.OFF_CHECKSUM]
                size = protocol.HEADER_SIZE + int.from_bytes(payload, "little")
                want = max(_READ_CHUNK, size - len(pending))
                want = min(want, max(1, os.fstat(f.fileno()).st_size - f.tell()))
        if pending:
            log.warning(
                "torn tail in %s at byte offset %d: ignoring %d bytes of an incomplete message",
                path,
                base,
                len(pending),
            )


def decode_at(data: bytes, pos: int, path: Path, base: int) -> tuple[protocol.Message, int]:
    """The message at ``pos`` of ``data`` (``path`` from offset ``base``), checked; ProtocolError if not."""
    try:
        message, end = protocol.decode_message(data, pos)
    except protocol.ProtocolError as exc:
        raise protocol.ProtocolError(f"{path}: corrupt message at byte offset {base + pos}: {exc}") from exc
    # A domain that verifies checksums let only correct CRC-32s in: a mismatch in its journal is damage on disk.
    if checksum_expected(message.header.relay_domain, message.header.checksum) and not message.checksum_ok:
        raise protocol.ProtocolError(
            f"{path}: checksum mismatch at byte offset {base + pos} "
            f"(header says 0x{message.header.checksum:08x}, bytes give 0x{protocol.message_checksum(message.raw):08x})"
        )
    return message, end
