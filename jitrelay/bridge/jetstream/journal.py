"""The relay's journal as the JetStream sender's source."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.units import MiB
from jitrelay.core.views import message_offsets

log = logging.getLogger("jitrelay.bridge")

TAIL_READ = 1 * MiB


class JournalTail:
    """Reads the relay's journal segments ``<dir>/<name>-<NNNNNN>.journal`` from a position on, whole messages."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = Path(directory)
        self.name = name
        self._segment = re.compile(re.escape(name) + r"-(\d+)\.journal")
        self.position = self.end()

    def segments(self) -> list[int]:
        """The journal's segment numbers, in order; none if the folder is missing."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := self._segment.fullmatch(n)))

    def path(self, index: int) -> Path:
        """Where segment ``index`` is (it may not exist)."""
        return self.directory / f"{self.name}-{index:06d}.journal"

    def end(self) -> tuple[int, int]:
        """The position just after the journal's last byte now."""
        found = self.segments()
        if not found:
            return (1, 0)
        return (found[-1], self.path(found[-1]).stat().st_size)

    def read(self) -> tuple[np.ndarray, tuple[int, int]] | None:
        """The next whole messages after ``position`` (up to about 1 MiB) and the position after them; or None."""
        segment, offset = self.position
        final = False  # a later segment exists, so this one will not grow any more
        while True:
            try:
                with open(self.path(segment), "rb") as f:
                    f.seek(offset)
                    data = f.read(TAIL_READ)
            except FileNotFoundError:
                data = b""
                if final:
                    log.warning("journal segment %s is gone: what it held past byte %d is not sent", segment, offset)
            if data:
                buf = np.frombuffer(data, dtype=np.uint8)
                count, consumed, fault = kernels.frame(buf)
                if fault != protocol.NO_FAULT:
                    raise protocol.ProtocolError(f"{self.path(segment)}: not a message at byte offset {offset}")
                if consumed == 0 and len(data) == TAIL_READ:  # one message longer than a read
                    payload = buf[protocol.OFF_PAYLOAD_SIZE : protocol.OFF_PAYLOAD_SIZE + 4].view("<u4")
                    size = protocol.HEADER_SIZE + int(payload[0])
                    with open(self.path(segment), "rb") as f:
                        f.seek(offset)
                        data = f.read(size)
                    buf = np.frombuffer(data, dtype=np.uint8)
                    count, consumed, _ = kernels.frame(buf)
                if consumed:
                    return buf[:consumed], (segment, offset + consumed)
            later = [s for s in self.segments() if s > segment]
            if not later:
                return None
            if not final:  # the relay may have appended to it before it moved on: read it once more
                final = True
                continue
            if data:  # a finished segment ends in a torn message: the relay died mid-append
                log.warning("journal %s ends in %d bytes of a torn message; skipped", self.path(segment), len(data))
            segment, offset, final = later[0], 0, False
            self.position = (segment, offset)


def message_bounds(buf: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each message of ``buf``, a batch of whole messages."""
    starts = message_offsets(buf)
    return list(zip(starts.tolist(), [*starts[1:].tolist(), len(buf)], strict=True))
