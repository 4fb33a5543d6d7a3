"""The relay's log in a memory file that local readers map: created here, handed out only over a checked socket.

Two anonymous memory files (``memfd_create``): the log (header page, ring,
mirror; ``core.shared_log`` says the layout) and the reader slots. Neither has
a name in ``/dev/shm`` or anywhere else: they exist while some process holds a
descriptor or a mapping, so nothing is left behind when the relay or a reader
dies, however it dies. A reader gets the log through a read-only descriptor
(opened anew from ``/proc/self/fd``), so it cannot write the ring, and the
slots writable, so it can say how far it read. Both files are sealed at their
size: no reader can shrink them under the relay.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os

import numpy as np

from jitrelay.core import shared_log
from jitrelay.kernels import futex

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def _memory_file(name: str, length: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, length)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        return fd, mmap.mmap(fd, length)
    except BaseException:
        os.close(fd)
        raise


class SharedLogMemory:
    """The memory of one relay's log and its reader slots; the engine's ``RelayLog`` keeps its ring here."""

    def __init__(self, size: int, mirror: int, readers: int) -> None:
        self.size, self.mirror, self.readers = size, mirror, readers
        self.log_fd, self._log_map = _memory_file("jitrelay-log", shared_log.HEADER_BYTES + size + mirror)
        self.reader_fd = os.open(f"/proc/self/fd/{self.log_fd}", os.O_RDONLY | os.O_CLOEXEC)
        self.slots_fd, self._slots_map = _memory_file("jitrelay-readers", readers * shared_log.SLOT_BYTES)
        self.header = shared_log.header_view(self._log_map)
        self.ring = shared_log.ring_view(self._log_map, size, mirror)
        self.slots = shared_log.slots_view(self._slots_map)
        self._wake = futex.Waker(self.header.ctypes.data + 8 * shared_log.W_WAKE)
        self._free = list(range(readers - 1, -1, -1))

    def start(self, epoch: int) -> None:
        """Write the header of the log of relay process ``epoch``: readers may map it from now on."""
        shared_log.initialise(self.header, epoch, self.size, self.mirror)

    @property
    def descriptors(self) -> list[int]:
        """What a granted reader receives: the log read-only, and the slots."""
        return [self.reader_fd, self.slots_fd]

    def claim(self, owner: int, position: int) -> int:
        """A free slot for connection ``owner``, starting at ``position``; -1 if all are taken."""
        if not self._free:
            return -1
        slot = self._free.pop()
        self.slots[slot, shared_log.S_POSITION] = position
        self.slots[slot, shared_log.S_OWNER] = owner
        return slot

    def release(self, slot: int) -> None:
        if self.slots[slot, shared_log.S_OWNER]:
            self.slots[slot] = 0
            self._free.append(slot)

    @property
    def claimed(self) -> int:
        """Slots given to readers now."""
        return self.readers - len(self._free)

    def positions(self, slots: list[int]) -> np.ndarray:
        """How far the readers in ``slots`` say they have read."""
        return self.slots[slots, shared_log.S_POSITION]

    def publish(self, extent: shared_log.Snapshot) -> None:
        shared_log.publish(self.header, extent)

    def wake(self) -> None:
        """Tell every sleeping reader the head moved: one system call, whatever their number."""
        self.header[shared_log.W_WAKE] = (int(self.header[shared_log.W_WAKE]) + 1) & 0xFFFFFFFF
        self._wake()

    def close(self) -> None:
        """The relay is going: readers drain to the head and end; the files go with the last mapping."""
        self.header[shared_log.W_CLOSED] = 1
        with contextlib.suppress(OSError):
            self.wake()
        for fd in (self.log_fd, self.reader_fd, self.slots_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
