"""The relay's Unix socket path: claimed with its folder's modes, a stale socket replaced, a live one refused."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from pathlib import Path

log = logging.getLogger("jitrelay.relay")


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


def bind_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``: folder 0770, socket 0660, stale file replaced."""
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o770, parents=True, exist_ok=True)
        os.chmod(folder, 0o770)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise RelayAlreadyRunning(f"{path} exists and is not a socket; not replacing it")
        if _probe(path):
            raise RelayAlreadyRunning(f"another relay is already listening on {path}")
        log.info("replacing stale socket %s", path)
        path.unlink()
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
    sock.listen(1024)
    sock.setblocking(False)
    return sock
