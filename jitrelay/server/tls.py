"""The relay's TLS listeners: the handshake and the certificate check, then a pump into the engine.

The engine sends from its log with compiled ``sendmsg`` calls on each
connection's descriptor, so it cannot speak TLS itself. A TLS peer is
therefore served in two halves inside the relay process:

- the TLS side: a plain TCP accept, the peer's address checked against the
  allowed networks, then ``loop.start_tls`` (so that a failed handshake comes
  back here, to be logged and counted, rather than vanishing inside the event
  loop), then the peer certificate's names checked against ``allowed_names``;
- the engine side: a Unix socketpair, one end handed to the engine as an
  ordinary accepted connection that carries the peer's address and names
  (``TlsPeer``) in place of ``SO_PEERCRED``, the other end pumped to and from
  the TLS transport with flow control both ways.

So the engine treats a TLS peer as it treats a TCP one (no shared memory,
its address in the log lines), and the refusal decisions for TLS are the
same three as for every peer: network, identity, connection limit.

Costs: one more copy through the socketpair and encryption on the event
loop's thread; ``benchmarks/tls_ratio.py`` measures W1 over TLS against W1
over plain TCP. TLS cannot half-close, so a publisher's close over TLS
proves that the relay process has its bytes, not that the engine has read
them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from jitrelay.core.domains import RelayLogic

log = logging.getLogger("jitrelay.relay")
HANDSHAKE_SECONDS = 10.0  # a peer that has not finished its handshake by then is refused
PUMP_HIGH_WATER = 4 * 1024 * 1024  # bytes one side may hold for the other before the other is paused


@dataclass(frozen=True)
class TlsPeer:
    """Who a TLS connection is: its address and the names its verified certificate carries."""

    host: str
    port: int
    names: tuple[str, ...]

    @property
    def label(self) -> str:
        """The peer as log lines name it: ``addr=HOST:PORT``, and its first name when it has one."""
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"addr={shown}:{self.port}" + (f" name={self.names[0]}" if self.names else "")


def server_context(logic: RelayLogic) -> ssl.SSLContext:
    """The TLS listeners' context: the relay's certificate, and the client CA when clients must present one."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert logic.tls_cert is not None and logic.tls_key is not None  # RelayLogic refuses a tls:// listener without
    context.load_cert_chain(logic.tls_cert, logic.tls_key)
    if logic.tls_client_ca is not None:
        context.load_verify_locations(cafile=logic.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def certificate_names(certificate: dict[str, Any] | None) -> tuple[str, ...]:
    """The names a verified peer certificate carries: subject CNs first, then DNS and URI alternative names."""
    if not certificate:
        return ()
    names = [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
    names += [value for kind, value in certificate.get("subjectAltName", ()) if kind in ("DNS", "URI")]
    return tuple(dict.fromkeys(names))


class TlsFront:
    """Admits the TLS listeners' connections for one relay and hands each admitted peer to the engine."""

    def __init__(
        self, logic: RelayLogic, refused: Counter[str], engine_connection: Callable[[TlsPeer], asyncio.BaseProtocol]
    ) -> None:
        self.logic = logic
        self.context = server_context(logic)
        self.refused = refused  # the relay's refusal counts, by reason
        self.engine_connection = engine_connection  # the engine's protocol for an admitted peer
        self.gates: set[_Gate] = set()
        self.handshakes: set[asyncio.Task[None]] = set()

    def listener(self, host: str, port: int) -> TlsListener:
        """A listener bound to ``host:port`` (every address it resolves to), listening once ``start_serving``."""
        return TlsListener(self, host, port)

    def accepted(self, conn: socket.socket, host: str, port: int) -> None:
        """A new TCP connection: refused at once outside the allowed networks, else its handshake starts."""
        label = f"addr={f'[{host}]' if ':' in host else host}:{port}"
        if not self.logic.admits_address(host):
            self.refuse(label, "not_allowed", f"address {host} is not in an allowed network")
            conn.close()
            return
        task = asyncio.get_running_loop().create_task(self._handshake(conn, host, port, label))
        self.handshakes.add(task)
        task.add_done_callback(self.handshakes.discard)

    async def _handshake(self, conn: socket.socket, host: str, port: int, label: str) -> None:
        """The TLS handshake on ``conn``: a failure is logged and counted here (the event loop would keep quiet)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: _Gate(self, host, port), conn, ssl=self.context, ssl_handshake_timeout=HANDSHAKE_SECONDS
            )
        except (OSError, asyncio.TimeoutError) as exc:  # ssl.SSLError is an OSError
            self.refuse(label, "tls_handshake", f"TLS handshake failed ({_reason(exc)})")
            conn.close()

    def refuse(self, label: str, reason: str, why: str) -> None:
        """Count and log one refused peer."""
        self.refused[reason] += 1
        log.warning("refusing tls %s: %s", label, why)

    def close(self) -> None:
        """Close every connection still being admitted or pumped."""
        for task in list(self.handshakes):
            task.cancel()
        for gate in list(self.gates):
            gate.close()


class TlsListener(asyncio.AbstractServer):
    """A TLS listener's sockets: bound when made, accepting from ``start_serving`` (as ``create_server``'s).

    It accepts itself rather than through ``loop.create_server(ssl=...)`` so that each handshake is awaited
    by the relay, which then logs a failed one, and so that no byte is read before TLS owns the connection.
    """

    def __init__(self, front: TlsFront, host: str, port: int) -> None:
        self.front = front
        self.sockets: list[socket.socket] = []
        self._loop = asyncio.get_running_loop()
        self._serving = False
        seen = set()
        try:
            for family, kind, proto, _, address in socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            ):
                if (family, address) in seen:
                    continue
                seen.add((family, address))
                sock = socket.socket(family, kind, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.setblocking(False)
        except BaseException:
            self.close()
            raise

    async def start_serving(self) -> None:
        """Listen, and accept from now on."""
        for sock in self.sockets:
            sock.listen(1024)
            self._loop.add_reader(sock.fileno(), self._accept, sock)
        self._serving = True

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(64):  # a burst of connections is taken in one go, a flood does not starve the loop
            try:
                conn, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, for one: the peer stays in the backlog
                log.warning("cannot accept a TLS connection: %s", exc)
                return
            conn.setblocking(False)
            self.front.accepted(conn, address[0], address[1])

    def close(self) -> None:
        """Stop accepting and close the listening sockets."""
        for sock in self.sockets:
            if self._serving:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._serving = False

    def is_serving(self) -> bool:
        """Whether it accepts connections."""
        return self._serving

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop it accepts on."""
        return self._loop

    async def wait_closed(self) -> None:
        """Closing is immediate."""

    async def serve_forever(self) -> None:
        """Accept until closed (the relay does not call it: it waits for its stop event instead)."""
        await self.start_serving()
        while self._serving:
            await asyncio.sleep(1.0)


class _Gate(asyncio.Protocol):
    """One handshaken TLS connection: its certificate's names checked, then pumped to and from the engine."""

    def __init__(self, front: TlsFront, host: str, port: int) -> None:
        self.front = front
        self.host, self.port = host, port
        self.tls: asyncio.Transport | None = None
        self.link: asyncio.Transport | None = None  # our end of the socketpair into the engine
        self.early: list[bytes] = []  # what the peer sent before the link was up
        self.peer_closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = self.tls = cast(asyncio.Transport, transport)
        peer = TlsPeer(self.host, self.port, certificate_names(tls.get_extra_info("peercert")))
        if self.front.logic.verifies_clients and not self.front.logic.admits_names(peer.names):
            shown = ", ".join(peer.names) or "no name"
            self.front.refuse(peer.label, "not_allowed", f"certificate names {shown}: none is in allowed_names")
            tls.abort()
            return
        tls.set_write_buffer_limits(high=PUMP_HIGH_WATER)
        self.front.gates.add(self)
        task = asyncio.get_running_loop().create_task(self._link_to_engine(peer))
        self.front.handshakes.add(task)
        task.add_done_callback(self.front.handshakes.discard)

    async def _link_to_engine(self, peer: TlsPeer) -> None:
        """Hand one end of a socketpair to the engine as ``peer``'s connection; pump the other."""
        loop = asyncio.get_running_loop()
        assert self.tls is not None
        theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await loop.connect_accepted_socket(lambda: self.front.engine_connection(peer), theirs)
            link, _ = await loop.connect_accepted_socket(lambda: _Link(self), ours)
        except OSError as exc:
            log.warning("refusing tls %s: %s", peer.label, exc)
            theirs.close()
            ours.close()
            self.tls.abort()
            self.front.gates.discard(self)
            return
        self.link = link
        self.link.set_write_buffer_limits(high=PUMP_HIGH_WATER)
        for data in self.early:
            self.link.write(data)
        self.early.clear()
        if self.peer_closed:
            self._peer_done()

    # the TLS side (the protocol the TLS transport calls)

    def data_received(self, data: bytes) -> None:
        if self.link is None:
            self.early.append(data)
        else:
            self.link.write(data)

    def eof_received(self) -> bool:
        self.peer_closed = True
        if self.link is not None:
            self._peer_done()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer_closed = True
        if self.link is not None:
            self._peer_done()

    def pause_writing(self) -> None:  # the TLS peer reads slower than the engine sends: stop reading the engine
        if self.link is not None:
            self.link.pause_reading()

    def resume_writing(self) -> None:
        if self.link is not None and not self.link.is_closing():
            self.link.resume_reading()

    def _peer_done(self) -> None:
        """The TLS peer is gone or sent its last byte: the engine reads the end once it has read the rest."""
        assert self.link is not None
        if not self.link.is_closing() and self.link.can_write_eof():
            self.link.write_eof()

    def close(self) -> None:
        """Close both sides at once (the relay is stopping)."""
        for transport in (self.link, self.tls):
            if transport is not None and not transport.is_closing():
                transport.close()


class _Link(asyncio.Protocol):
    """Our end of the socketpair: what the engine sends goes to the TLS peer, and the engine closing closes it."""

    def __init__(self, gate: _Gate) -> None:
        self.gate = gate

    def data_received(self, data: bytes) -> None:
        tls = self.gate.tls
        if tls is not None and not tls.is_closing():
            tls.write(data)

    def eof_received(self) -> bool:
        self._engine_done()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._engine_done()

    def pause_writing(self) -> None:  # the engine reads slower than the TLS peer sends: stop reading the peer
        tls = self.gate.tls
        if tls is not None and not tls.is_closing():
            tls.pause_reading()

    def resume_writing(self) -> None:
        tls = self.gate.tls
        if tls is not None and not tls.is_closing():
            tls.resume_reading()

    def _engine_done(self) -> None:
        """The engine closed the connection: close the TLS side once what it sent is out."""
        tls = self.gate.tls
        if tls is not None and not tls.is_closing():
            tls.close()
        link = self.gate.link
        if link is not None and not link.is_closing():
            link.close()
        self.gate.front.gates.discard(self.gate)


def _reason(exc: BaseException) -> str:
    """A failed handshake's reason as OpenSSL names it (``CERTIFICATE_VERIFY_FAILED``), else the error's text."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, asyncio.TimeoutError):
        return f"not finished within {HANDSHAKE_SECONDS:g} s"
    return str(exc) or type(exc).__name__
