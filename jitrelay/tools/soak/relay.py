"""The relay under test: the options it runs with, and the controller's echo connection to it.

The echo connection answers every subscriber's beacon, which closes that
subscriber's switch window.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from jitrelay.core import protocol
from jitrelay.core.units import MiB
from jitrelay.tools.soak.verify import BEACON_FLAGS, ECHO_FLAGS, SOAK_SOURCE
from jitrelay.tools.soak.workers import ClientConfig, soak_message

RELAY_OPTIONS = {
    # A stalled subscriber more than 1 MiB behind has 0.5 s to catch up, and one the 16 MiB log leaves
    # behind is cut off at once; the others never wait for it.
    "disconnect": (
        "--slow-policy",
        "disconnect",
        "--pending-limit",
        "1MiB",
        "--slow-timeout",
        "0.5",
        "--log-size",
        "16MiB",
    ),
    # Nothing is dropped: publishers wait only when the log is full up to a stalled subscriber.
    "block": ("--slow-policy", "block", "--log-size", "16MiB"),
}


class SoakError(RuntimeError):
    """The soak could not run: the relay would not start, clients would not attach."""


def relay_options(slow_policy: str, log_size: int) -> tuple[str, ...]:
    """The relay's command-line options for a domain's slow policy, with ``log_size`` bytes of log unless 0.

    Raises ``KeyError`` for a slow policy the soak has no options for.
    """
    options = list(RELAY_OPTIONS[slow_policy])
    if log_size:
        options[options.index("--log-size") + 1] = str(log_size)
    return tuple(options)


class Echo:
    """The controller's connection that answers every subscriber's beacon with an echo.

    It subscribes to the soak's source only. The relay reads an echo only
    after it has finished with the beacon it answers, and so with the
    subscription sent just before that beacon: the echo reaches the
    subscriber under its new subscription. Raises ``SoakError`` when it cannot
    connect and subscribe; a later failure is kept in ``error``.
    """

    def __init__(self, config: ClientConfig):
        self.domain_id = config.domain_id
        self.beacons = 0
        self.echoes = 0
        self.error: str | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(config.socket_path)
            self.sock.sendall(protocol.subscribe_message(sources=[SOAK_SOURCE]))
        except OSError as exc:
            self.sock.close()
            raise SoakError(f"the echo connection could not subscribe: {exc}") from exc
        self._thread = threading.Thread(target=self._run, name="soak-echo", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray()
        try:
            while data := self.sock.recv(MiB):
                buf += data
                pos = self._answer(buf)
                if pos is None:
                    return
                del buf[:pos]
        except OSError as exc:
            self.error = repr(exc)

    def _answer(self, buf: bytearray) -> int | None:
        """Echo every beacon whole in ``buf``: where the unfinished rest starts, None on lost framing."""
        pos = 0
        while len(buf) - pos >= protocol.HEADER_SIZE:
            magic, _, _, source, flags, seq, _, size, _ = protocol.HEADER_STRUCT.unpack_from(buf, pos)
            if magic != protocol.MAGIC:
                self.error = f"bad magic after {self.beacons} beacons"
                return None
            stop = pos + protocol.HEADER_SIZE + size
            if stop > len(buf):
                break
            if source == SOAK_SOURCE and flags == BEACON_FLAGS:
                self.beacons += 1
                self.sock.sendall(soak_message(self.domain_id, ECHO_FLAGS, seq))
                self.echoes += 1
            pos = stop
        return pos

    def close(self, timeout: float = 10.0) -> None:
        """Send nothing more: the relay reads what was sent, then closes its side and the reader ends."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self._thread.join(timeout)
        self.sock.close()
