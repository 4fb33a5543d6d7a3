"""Cutting a received byte stream into batches of whole messages, with the compiled frame walk."""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np

from jitrelay import kernels
from jitrelay.core import protocol
from jitrelay.core.units import MiB

DEFAULT_BUFFER_SIZE = 4 * MiB
_MAGIC_AND_SIZE = struct.Struct(f"<I{protocol.OFF_PAYLOAD_SIZE - 4}xI")  # a header's magic and payload_size

Buffer = bytes | bytearray | memoryview | np.ndarray


class MessageFramer:
    """Cut a byte stream into batches of whole messages, in one growing numpy buffer.

    Bytes ``[start, end)`` of the buffer are received but not yet returned.
    ``maybe_extract_batch`` frames them from ``start``; complete messages are
    copied out and ``start`` moves past them, so no byte is framed twice and
    only the unfinished tail (less than one message) is ever moved back to the
    front. A message larger than the buffer doubles it until it fits; growth
    follows the bytes that actually arrive, never a size a header claims.
    """

    def __init__(self, buffer_size: int = DEFAULT_BUFFER_SIZE):
        if buffer_size < 1:
            raise ValueError("buffer_size must be positive")
        self._buf = np.empty(buffer_size, dtype=np.uint8)
        self._bytes = self._buf.data  # the same memory: cheaper to slice, for reads and copies out
        self._start = 0
        self._end = 0

    @property
    def capacity(self) -> int:
        return len(self._buf)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned in a batch."""
        return self._end - self._start

    def space(self) -> np.ndarray:
        """The free tail of the buffer, where the next read should land; never empty."""
        if self._start == self._end:  # everything returned: start again at the front, nothing to move
            self._start = self._end = 0
        elif self._start:
            tail = self._end - self._start
            self._buf[:tail] = self._buf[self._start : self._end]
            self._start, self._end = 0, tail
        if self._end == len(self._buf):
            grown = np.empty(2 * len(self._buf), dtype=np.uint8)
            grown[: self._end] = self._buf[: self._end]
            self._buf, self._bytes = grown, grown.data
        return self._buf[self._end :]

    def commit(self, count: int) -> None:
        """Record that ``count`` bytes were written at the start of ``space()``."""
        if not 0 <= count <= len(self._buf) - self._end:
            raise ValueError(f"cannot commit {count} bytes to {len(self._buf) - self._end} free")
        self._end += count

    def feed(self, data: Buffer) -> None:
        """Copy ``data`` in, growing the buffer if it must."""
        incoming = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
        while len(incoming):
            space = self.space()
            count = min(len(space), len(incoming))
            space[:count] = incoming[:count]
            self.commit(count)
            incoming = incoming[count:]

    def maybe_extract_batch(self) -> np.ndarray | None:
        """A copy of every complete message received so far, or None if there is none yet.

        Raises ``ProtocolError`` at a header whose magic is wrong, once the
        messages before it have been returned.
        """
        framed = self._claim_framed()
        return None if framed is None else self._buf[framed].copy()

    def take(self) -> bytes | None:
        """As ``maybe_extract_batch``, as ``bytes``: one copy, what message views read from."""
        framed = self._claim_framed()
        return None if framed is None else self._bytes[framed].tobytes()

    def read_from(self, recv_into: Callable[[memoryview], int]) -> int:
        """Read once into the free tail with ``recv_into`` (a socket's) and keep what it read; return the count."""
        if self._start == self._end:  # the usual case: everything returned, read at the front
            self._start = self._end = 0
        else:
            self.space()
        received = recv_into(self._bytes[self._end :])
        self._end += received
        return received

    def _claim_framed(self) -> slice | None:
        """The complete messages buffered, now returned, or None if there is none (the kernel only if bytes wait)."""
        start, end = self._start, self._end
        if start == end:
            return None
        if end - start >= protocol.HEADER_SIZE:  # exactly one message (a paced stream's read): no kernel call
            magic, payload_size = _MAGIC_AND_SIZE.unpack_from(self._bytes, start)
            if magic == protocol.MAGIC and protocol.HEADER_SIZE + payload_size == end - start:
                self._start = end
                return slice(start, end)
        count, consumed, fault = kernels.frame(self._buf, start, end)
        if count == 0:
            if fault != protocol.NO_FAULT:
                raise protocol.ProtocolError(
                    f"{protocol.FAULT_NAMES[fault]}: the stream holds no message header where one should start"
                )
            return None
        self._start = consumed
        return slice(start, consumed)
