"""How a client reaches its relay, and the errors that say it could not or lost it.

Every client names the relay it talks to in its errors (domain and socket
path or address), so that a service's log says which relay to start or look
at. What an address is, and how each kind is opened, is ``client.address``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from jitrelay.client.address import UNIX, RelayAddress, open_socket, open_streams, relay_address
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


def missing(domain: str, path: Path | RelayAddress, exc: OSError) -> RelayConnectionError:
    """The error for a relay that is not running at ``path``, saying how to start one."""
    return RelayConnectionError(
        f"no {domain} relay at {path} ({exc.strerror or exc}); start one with `jitrelay run {domain}`"
    )


def _refused(domain: str, address: RelayAddress, exc: ssl.SSLError) -> RelayConnectionError:
    """The error for a TLS handshake that failed: the relay's certificate, or ours, was not accepted."""
    return RelayConnectionError(f"the {domain} relay at {address} did not complete the TLS handshake ({exc})")


def connect(domain: str, path: Path | RelayAddress) -> socket.socket:
    """A blocking socket connected to the relay at ``path`` (``client.address``: Unix, TCP or TLS).

    Raises ``RelayConnectionError`` when no relay listens there or the TLS
    handshake fails, and whatever else ``connect`` raises; the socket is
    closed then.
    """
    address = path if isinstance(path, RelayAddress) else RelayAddress(UNIX, path)
    try:
        return open_socket(address)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise missing(domain, path, exc) from exc
    except ssl.SSLError as exc:
        raise _refused(domain, address, exc) from exc


async def open_connection(
    domain: str, path: Path | RelayAddress, limit: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams to the relay at ``path``; raises ``RelayConnectionError`` as ``connect`` does."""
    address = path if isinstance(path, RelayAddress) else RelayAddress(UNIX, path)
    try:
        return await open_streams(address, limit)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise missing(domain, path, exc) from exc
    except ssl.SSLError as exc:
        raise _refused(domain, address, exc) from exc


class Endpoint:
    """What every client shares: the relay it talks to, and the errors that name it.

    Raises ``ValueError`` for a domain jitrelay does not know (``logic_for``).
    """

    kind = "client"

    def __init__(self, domain: str, socket_path: str | Path | RelayAddress | None) -> None:
        self.logic: RelayLogic = logic_for(domain)
        self.address = relay_address(socket_path, self.logic.socket_path)  # ValueError for one that is not
        # What ``connect`` takes and errors name: the path of a Unix socket, else the address itself.
        self.socket_path: Path | RelayAddress = self.address.path if self.address.path is not None else self.address
        self.domain = domain

    def _closed(self) -> RelayConnectionError:
        return RelayConnectionError(f"{self.kind} to the {self.domain} relay at {self.socket_path} is closed")

    def _lost(self, exc: OSError | None = None) -> RelayConnectionError:
        why = f" ({exc.strerror or exc})" if exc is not None else ""
        return RelayConnectionError(f"the {self.domain} relay at {self.socket_path} closed the connection{why}")
