"""The source relay's byte stream, framed and judged with the local relay's rules as it arrives.

Operations: hand out the free tail of one buffer for the next read
(``space``), take what was read (``commit``), and judge every complete
message received so far (``judge``), keeping the unfinished tail for the
next read. A Torq relay sends raw read chunks, so a message may arrive in
any number of pieces, and a chunk may end anywhere.

Plan, as the client's ``MessageFramer``: one numpy buffer; bytes
``[start, end)`` are received and not yet judged. ``judge`` is one call of
the compiled scan (``kernels.scan_into``: frame, verdict per message,
forwarded runs) from ``start``, which then moves past the last complete
message; no byte is judged twice, a partial message costs a re-read of its
header only, and only that tail (less than one message) is ever moved back
to the front, when the free tail runs out. The scan stops at a header whose
magic is wrong or whose payload is over the domain's maximum: the stream
cannot be trusted past it, so the fault is returned with the messages before
it and nothing after it is judged.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol


class Judged(NamedTuple):
    """The complete messages of one ``judge``: their bytes, offsets in them, verdicts, and what should go on."""

    batch: np.ndarray  # whole messages back to back: a view into the buffer, valid until the next ``space``
    starts: np.ndarray  # int64, where each message starts in ``batch``
    verdicts: np.ndarray  # uint8, ``protocol`` verdict codes
    forwarded: bytes  # the messages with verdict FORWARD, back to back
    forwarded_count: int
    fault: int  # protocol.NO_FAULT, BAD_MAGIC or OVERSIZE, at the end of ``batch``


class SourceStream:
    """A byte stream judged by one domain's rules (``kernels.tables_for(logic)``), read into one buffer."""

    def __init__(self, tables: kernels.KernelTables, buffer_size: int) -> None:
        self.tables = tables
        self._buf = np.empty(max(buffer_size, 2 * (protocol.HEADER_SIZE + tables.max_payload)), dtype=np.uint8)
        self._out = kernels.ScanBuffers(len(self._buf))
        self._counts = np.zeros(len(protocol.VERDICT_NAMES), dtype=np.int64)
        self._start = 0
        self._end = 0
        self.judged_bytes = 0  # stream offset of the first byte not yet judged

    @property
    def buffered(self) -> int:
        """Bytes received and not judged yet: the start of a message still on its way."""
        return self._end - self._start

    def unjudged(self, limit: int) -> bytes:
        """The first ``limit`` bytes not judged yet: after a fault, the bytes where a header should have been."""
        return self._buf[self._start : min(self._end, self._start + limit)].tobytes()

    def space(self) -> memoryview:
        """The free tail of the buffer, where the next read lands; never empty."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf) and self._start:
            tail = self._end - self._start
            self._buf[:tail] = self._buf[self._start : self._end]
            self._start, self._end = 0, tail
        if self._end == len(self._buf):  # one partial message fills it all: only past the domain's maximum
            grown = np.empty(2 * len(self._buf), dtype=np.uint8)
            grown[: self._end] = self._buf[: self._end]
            self._buf = grown
            self._out = kernels.ScanBuffers(len(grown))
        return self._buf.data[self._end :]

    def commit(self, count: int) -> None:
        """``count`` bytes were read into the start of ``space()``."""
        if not 0 <= count <= len(self._buf) - self._end:
            raise ValueError(f"cannot commit {count} bytes to {len(self._buf) - self._end} free")
        self._end += count

    def judge(self) -> Judged | None:
        """Every complete message buffered, judged; None when there is none and no fault."""
        start, end = self._start, self._end
        if end - start < protocol.HEADER_SIZE and end - start < 4:
            return None
        out = self._out
        result = kernels.scan_into(self._buf, start, end, self.tables, out, self._counts)
        if result.count == 0 and result.fault == protocol.NO_FAULT:
            return None
        n = result.count
        forwarded = kernels.compact(self._buf, out.runs, result.runs).tobytes() if result.runs else b""
        verdicts = out.verdicts[:n].copy()
        judged = Judged(
            self._buf[start : result.consumed],
            out.offsets[:n] - start,
            verdicts,
            forwarded,
            int(np.count_nonzero(verdicts == protocol.FORWARD)),
            result.fault,
        )
        self._start = result.consumed
        self.judged_bytes += result.consumed - start
        return judged
