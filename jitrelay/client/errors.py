"""How a client reaches its relay, and the errors that say it could not or lost it.

Every client names the relay it talks to in its errors (domain and socket
path), so that a service's log says which relay to start or look at.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from jitrelay.core.domains import RelayLogic, logic_for

CLOSE_TIMEOUT = 5.0  # how long a publisher's close waits for the relay to have read everything
DISCARD_CHUNK = 256 * 1024  # what a publisher that reads reads at once, to throw away


_Client = TypeVar("_Client", bound="AsyncConnection")


class RelayConnectionError(ConnectionError):
    """The relay is not there, or went away."""


class PublishTimeout(TimeoutError):
    """The relay took none of a message within the publish's ``timeout``: it holds the publisher (back-pressure).

    The message is not published and its sequence number is not used; what
    was published before it stays buffered, in order, and goes out first.
    """


class AsyncConnection:
    """What the asyncio clients share: ``async with client:`` connects on entry and closes on exit."""

    async def connect(self: _Client) -> _Client:
        """Connect unless connected; the client says how."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close the connection; the client says how."""
        raise NotImplementedError

    async def __aenter__(self: _Client) -> _Client:
        return await self.connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def missing(domain: str, path: Path, exc: OSError) -> RelayConnectionError:
    """The error for a relay that is not running at ``path``, saying how to start one."""
    return RelayConnectionError(
        f"no {domain} relay at {path} ({exc.strerror or exc}); start one with `jitrelay run {domain}`"
    )


def connect(domain: str, path: Path) -> socket.socket:
    """A blocking Unix socket connected to the relay at ``path``.

    Raises ``RelayConnectionError`` when no relay listens there, and whatever
    else ``connect`` raises; the socket is closed then.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise missing(domain, path, exc) from exc
    except BaseException:
        sock.close()
        raise
    return sock


async def open_connection(domain: str, path: Path, limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams to the relay at ``path``; raises ``RelayConnectionError`` when no relay listens there."""
    try:
        return await asyncio.open_unix_connection(str(path), limit=limit)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise missing(domain, path, exc) from exc


class Endpoint:
    """What every client shares: the relay it talks to, and the errors that name it.

    Raises ``ValueError`` for a domain jitrelay does not know (``logic_for``).
    """

    kind = "client"

    def __init__(self, domain: str, socket_path: str | Path | None) -> None:
        self.logic: RelayLogic = logic_for(domain)
        self.socket_path = Path(socket_path) if socket_path is not None else self.logic.socket_path
        self.domain = domain

    def _closed(self) -> RelayConnectionError:
        return RelayConnectionError(f"{self.kind} to the {self.domain} relay at {self.socket_path} is closed")

    def _lost(self, exc: OSError | None = None) -> RelayConnectionError:
        why = f" ({exc.strerror or exc})" if exc is not None else ""
        return RelayConnectionError(f"the {self.domain} relay at {self.socket_path} closed the connection{why}")
