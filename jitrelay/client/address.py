"""Where a client finds its relay: a Unix socket path, ``unix://PATH``, ``tcp://HOST:PORT`` or ``tls://HOST:PORT``.

Parsing is pure (``relay_address``); opening is one function per flavour
(``open_socket`` blocking, ``open_streams`` asyncio), so every client reaches
every kind of address through the same two calls.

A TLS address carries its ``ssl.SSLContext``: one given, or one built from
``ca``, ``cert`` and ``key`` (options, or the URL's query:
``tls://relay1:7443?ca=/etc/jitrelay/ca.pem&cert=...&key=...``), or, with
neither, the system's default trust. The blocking clients get an SSL socket
that reports "not now" as a plain non-blocking socket does
(``BlockingIOError``) and drains what the TLS layer has already decrypted on
each read, since ``poll`` cannot see bytes held there.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

UNIX = "unix"
TCP = "tcp"
TLS = "tls"
_TLS_OPTIONS = ("ca", "cert", "key", "server_name")


@dataclass(frozen=True)
class RelayAddress:
    """A parsed relay address: ``path`` for ``unix``, ``host`` and ``port`` for ``tcp`` and ``tls``."""

    scheme: str
    path: Path | None = None
    host: str = ""
    port: int = 0
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None  # the name the relay's certificate must carry (default: ``host``)

    @property
    def is_unix(self) -> bool:
        """Whether it is a Unix socket (the only kind that can hand over shared memory or peer credentials)."""
        return self.scheme == UNIX

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{shown}:{self.port}"


def client_context(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> ssl.SSLContext:
    """A TLS client context: the relay's certificate checked against ``ca`` (or the system's); ours, if any."""
    context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key is not None else None)
    elif key is not None:
        raise ValueError("a TLS key without its certificate (give cert as well)")
    return context


def relay_address(
    where: str | Path | RelayAddress | None,
    default: Path | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    ca: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
) -> RelayAddress:
    """``where`` as a ``RelayAddress``: None is ``default`` (a client's: its domain's socket), a path a Unix socket.

    Raises ``ValueError`` for an address that is not one, or TLS options on an address that is not ``tls://``.
    """
    tls_given = ssl_context is not None or ca is not None or cert is not None or key is not None
    query: dict[str, str] = {}
    if isinstance(where, RelayAddress):
        address = where
    elif where is None and default is None:
        raise ValueError("no relay address given")
    elif where is None or isinstance(where, Path) or "://" not in where:
        address = RelayAddress(UNIX, Path(where if where is not None else default))  # type: ignore[arg-type]
    else:
        address, query = _parse_url(where)
    if address.scheme != TLS:
        if tls_given:
            raise ValueError(f"TLS options given for {address}, which is not a tls:// address")
        return address
    if ssl_context is None and address.ssl_context is not None and not tls_given:
        return address
    if ssl_context is None:
        ssl_context = client_context(ca or query.get("ca"), cert or query.get("cert"), key or query.get("key"))
    return RelayAddress(TLS, None, address.host, address.port, ssl_context, address.server_hostname)


def _parse_url(text: str) -> tuple[RelayAddress, dict[str, str]]:
    """A URL's address, and a ``tls://`` one's query (ca, cert, key, server_name)."""
    url = urllib.parse.urlsplit(text)
    if url.scheme == UNIX:
        path = text[len("unix://") :]
        if not path:
            raise ValueError(f"not a relay address: {text!r} (a Unix socket is unix:///path/to/relay.sock)")
        return RelayAddress(UNIX, Path(path)), {}
    try:
        port = url.port
    except ValueError:
        port = None
    if url.scheme not in (TCP, TLS) or not url.hostname or port is None or url.path not in ("", "/") or url.fragment:
        raise ValueError(
            f"not a relay address: {text!r} (examples: /tmp/jitrelay/market_data.sock, unix:///run/r.sock, "
            "tcp://10.0.0.5:7001, tls://relay1.example:7443)"
        )
    query = dict(urllib.parse.parse_qsl(url.query, strict_parsing=bool(url.query)))
    unknown = set(query) - set(_TLS_OPTIONS)
    if unknown or (query and url.scheme != TLS):
        raise ValueError(f"{text!r}: unknown query {sorted(unknown or query)} (tls:// takes {', '.join(_TLS_OPTIONS)})")
    return RelayAddress(url.scheme, None, url.hostname, port, None, query.get("server_name")), query


def open_socket(address: RelayAddress, timeout: float | None = None) -> socket.socket:
    """A blocking socket connected to ``address`` (TLS handshaken); raises ``OSError`` as ``connect`` does."""
    if address.path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(address.path))
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection((address.host, address.port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a paced publisher's message goes out at once
        if address.scheme == TLS:
            sock = _wrap(address, sock)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def _wrap(address: RelayAddress, sock: socket.socket) -> TlsSocket:
    """``sock`` handshaken as a ``TlsSocket`` (a context's ``sslsocket_class`` is documented for this)."""
    context = address.ssl_context
    assert context is not None
    kept, context.sslsocket_class = context.sslsocket_class, TlsSocket
    try:
        return context.wrap_socket(sock, server_hostname=address.server_hostname or address.host)  # type: ignore[return-value]
    finally:
        context.sslsocket_class = kept


async def open_streams(address: RelayAddress, limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams connected to ``address``; raises ``OSError`` as ``open_connection`` does."""
    if address.path is not None:
        return await asyncio.open_unix_connection(str(address.path), limit=limit)
    tls: dict[str, Any] = {}
    if address.scheme == TLS:
        tls = {"ssl": address.ssl_context, "server_hostname": address.server_hostname or address.host}
    reader, writer = await asyncio.open_connection(address.host, address.port, limit=limit, **tls)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


class TlsSocket(ssl.SSLSocket):
    """An SSL socket for code written for plain non-blocking sockets.

    ``SSLWantReadError``/``SSLWantWriteError`` become ``BlockingIOError``
    (retry later with the same bytes: TLS wants an unfinished write repeated),
    and a read takes what the TLS layer holds decrypted as well, which
    ``poll`` on the descriptor cannot see.
    """

    def send(self, data: Any, flags: int = 0) -> int:
        """As ``socket.send``; ``BlockingIOError`` when TLS cannot take the bytes now."""
        try:
            return super().send(data, flags)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as exc:
            raise BlockingIOError(errno.EAGAIN, str(exc)) from None

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        """As ``socket.recv_into``, filling ``buffer`` from every record already decrypted."""
        view = memoryview(buffer).cast("B")
        if nbytes:
            view = view[:nbytes]
        try:
            got = super().recv_into(view, 0, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
            raise BlockingIOError(errno.EAGAIN, str(exc)) from None
        while got and got < len(view) and self.pending():
            try:
                got += super().recv_into(view[got:], 0, flags)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
        return got
