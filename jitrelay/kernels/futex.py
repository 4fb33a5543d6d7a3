"""Sleep on, and wake, a 32-bit word in shared memory: one call wakes every reader of the log, however many.

Besides the send loop, the only system call of the hot path: the relay bumps
the word after each append and wakes all its waiters at once (``FUTEX_WAKE``
on a word no one may be waiting on costs a hash lookup in the kernel); a
reader that has caught up waits until the word moves from what it last saw.
Shared (not ``FUTEX_PRIVATE``) futexes: waker and waiters are processes
mapping the same memory file.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine(), -1)  # -1: ENOSYS
FUTEX_WAIT = 0
FUTEX_WAKE = 1
EVERYONE = 0x7FFFFFFF  # wake this many: all

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Waker:
    """``FUTEX_WAKE`` of every waiter on one word, its arguments converted once: the relay calls it per append."""

    def __init__(self, address: int) -> None:
        self._args = (
            ctypes.c_long(SYS_FUTEX), ctypes.c_void_p(address), ctypes.c_int(FUTEX_WAKE), ctypes.c_int(EVERYONE),
            None, None, ctypes.c_int(0),
        )  # fmt: skip

    def __call__(self) -> int:
        """Wake everyone waiting on the word; how many were."""
        woken = _syscall(*self._args)
        if woken < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return woken


class Waiter:
    """``wait`` on one word, its arguments made once: a reader sleeps on the same word after every batch."""

    def __init__(self, address: int) -> None:
        self._seen = ctypes.c_uint(0)
        self._timespec = _Timespec(0, 0)
        self._args = (
            ctypes.c_long(SYS_FUTEX), ctypes.c_void_p(address), ctypes.c_int(FUTEX_WAIT), self._seen,
            ctypes.byref(self._timespec), None, ctypes.c_int(0),
        )  # fmt: skip

    def __call__(self, seen: int, timeout: float) -> bool:
        """Sleep while the word still holds ``seen`` (its low 32 bits), at most ``timeout`` seconds.

        Returns on a wake, on a timeout, at once if the word already moved, or
        on a signal; the caller looks at the log again in every case. False
        only when the whole timeout passed.
        """
        timeout = max(0.0, timeout)
        self._seen.value = seen & 0xFFFFFFFF
        self._timespec.tv_sec = int(timeout)
        self._timespec.tv_nsec = int((timeout % 1.0) * 1e9)
        return _syscall(*self._args) == 0 or ctypes.get_errno() != errno.ETIMEDOUT
