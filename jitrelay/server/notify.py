"""systemd's readiness protocol (``sd_notify``): a few datagrams on the socket ``$NOTIFY_SOCKET`` names.

A ``Type=notify`` unit starts the relay with ``NOTIFY_SOCKET`` set to an
``AF_UNIX`` datagram socket; the relay sends ``READY=1`` once every listener
accepts, ``STOPPING=1`` when it begins to stop, and, when the unit sets
``WatchdogSec=`` (systemd then sets ``WATCHDOG_USEC``), ``WATCHDOG=1`` at
least every half of that interval from the event loop, so that a loop that
stops turning stops the pings and systemd restarts the relay. The protocol
is one line per field in one datagram (``sd_notify(3)``); a dozen lines of
socket code, so no library is needed. Without ``NOTIFY_SOCKET`` every call
does nothing. A datagram that cannot be sent is logged once, never raised:
the relay serves the same with or without its supervisor.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("jitrelay.relay")


def notify_address(value: str) -> str | bytes | None:
    """Where ``$NOTIFY_SOCKET`` points: a path, or (``@name``) an abstract socket name; None if unusable."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # systemd also passes vsock addresses ("vsock:CID:PORT"), which a relay has no use for


def watchdog_seconds(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog interval systemd asks for (``WATCHDOG_USEC``), if it is meant for process ``pid``."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (owner and owner != str(pid)):
        return None
    return int(usec) / 1e6


class Notifier:
    """Sends state changes to the service manager, when there is one (``from_environ``)."""

    def __init__(self, address: str | bytes | None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog if address is not None else None  # seconds; pings are due every half of it
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` describe (none: a silent one)."""
        env = os.environ if environ is None else environ
        address = notify_address(env.get("NOTIFY_SOCKET", ""))
        return cls(address, watchdog_seconds(env, os.getpid()))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str) -> None:
        """Every listener accepts: systemd may start the units that wait for this one."""
        self.send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def stopping(self, status: str = "stopping") -> None:
        """The relay has begun to stop (SIGTERM, SIGINT)."""
        self.send(f"STOPPING=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        """A line ``systemctl status`` shows."""
        self.send(f"STATUS={status}")

    def ping(self) -> None:
        """The event loop turns: one watchdog keep-alive (only when the unit asked for a watchdog)."""
        if self.watchdog is not None:
            self.send("WATCHDOG=1")

    def send(self, state: str) -> None:
        """One datagram of ``KEY=value`` lines; nothing without a notify socket."""
        if self.address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(state.encode(), self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify the service manager on %r: %s", self.address, exc)
                self._failed = True

    def close(self) -> None:
        """Close the socket; later calls open it again."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
