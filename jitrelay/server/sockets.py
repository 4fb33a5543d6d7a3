"""The relay's Unix socket path: claimed with its folder's modes, a stale socket replaced, a live one refused.

The relay claims its path before anything slow (so a second relay is refused
at once) but listens only when it can serve (``claim_socket`` binds without
listening: a client meanwhile gets ECONNREFUSED and can retry, never a
connection nobody reads). The claim is a lock on ``<socket>.lock`` held for
the relay's life, since a bound socket that does not listen looks stale to a
probe. The folder must be one the relay can trust (``core.folders``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
from pathlib import Path

from jitrelay.core.folders import check_folder

log = logging.getLogger("jitrelay.relay")
SOCKET_FOLDER_MODE = 0o770  # the relay's group may connect (and clean up), nobody else


class RelayAlreadyRunning(RuntimeError):
    """Another relay is listening on the socket path."""


def _probe(path: Path) -> bool:
    """True when something accepts connections on ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
    return True


def socket_folder(folder: Path) -> None:
    """Make the socket folder (0770) if missing; ``UntrustedFolder`` unless only this user and group can write it."""
    if not os.path.lexists(folder):
        folder.mkdir(mode=SOCKET_FOLDER_MODE, parents=True, exist_ok=True)
        os.chmod(folder, SOCKET_FOLDER_MODE)
    check_folder(folder, "socket folder", group_may_write=True)


def _replace_stale(path: Path) -> None:
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise RelayAlreadyRunning(f"{path} exists and is not a socket; not replacing it")
        if _probe(path):
            raise RelayAlreadyRunning(f"another relay is already listening on {path}")
        log.info("replacing stale socket %s", path)
        path.unlink()


def _bound(path: Path) -> socket.socket:
    """A Unix socket bound to ``path`` with mode 0660, not yet listening."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
    sock.setblocking(False)
    return sock


def bind_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``: folder 0770, socket 0660, stale file replaced."""
    socket_folder(path.parent)
    _replace_stale(path)
    sock = _bound(path)
    sock.listen(1024)
    return sock


class SocketClaim:
    """The relay's hold on its socket path: the lock, and the socket bound there, listening only once served."""

    def __init__(self, path: Path, sock: socket.socket, lock_fd: int) -> None:
        self.path = path
        self.sock = sock
        self.inode = os.stat(path).st_ino
        self._lock_fd = lock_fd

    def release(self) -> None:
        """Close the socket, remove the socket file (if still ours) and the lock."""
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self.inode:
                self.path.unlink()
        if self._lock_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock_path(self.path)).st_ino == os.fstat(self._lock_fd).st_ino:
                    lock_path(self.path).unlink()
            os.close(self._lock_fd)
            self._lock_fd = -1


def lock_path(path: Path) -> Path:
    """The file whose lock says a relay holds ``path``."""
    return path.with_name(path.name + ".lock")


def _lock(path: Path) -> int:
    """The locked descriptor of ``path``'s lock file; ``RelayAlreadyRunning`` when another relay holds it."""
    where = lock_path(path)
    while True:
        fd = os.open(where, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o660)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RelayAlreadyRunning(f"another relay is already running on {path} (it holds {where})") from None
        try:
            current = os.stat(where).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:  # else its last holder removed it between our open and our lock: take the new one
            return fd
        os.close(fd)


def claim_socket(path: Path) -> SocketClaim:
    """Claim ``path`` for this relay: trusted folder, lock taken, stale socket replaced, bound but not listening."""
    socket_folder(path.parent)
    fd = _lock(path)
    try:
        _replace_stale(path)
        sock = _bound(path)
    except BaseException:
        os.close(fd)
        raise
    return SocketClaim(path, sock, fd)
