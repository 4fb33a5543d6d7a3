"""The blocking publisher: messages built into a buffer, written out at once or coalesced.

Publishing writes each message into a preallocated buffer (``encoder``) and
writes the buffer out: at once by default, or coalesced (``Publisher.batch()``,
``linger``), so that a burst costs one system call per ``flush_size`` bytes
rather than one per message.

The relay fans every message out to every other connection, publishers
included. A publisher that never read would look like a slow subscriber: the
relay would drop it (``disconnect`` policy) or stop reading from everyone while
it waited for it (``block``). So a publisher's first bytes declare it
publish-only (a ``PUBLISH_ONLY`` control message): the relay then sends it
nothing, and it never reads. (With ``publish_only=False`` it reads away and
discards what the relay sends it, as before.)

Closing with unread input would reset the connection, and the relay could lose
the publisher's last messages; so a publisher closes gracefully: it writes out
its buffer, shuts down its sending side, reads until the relay, having read
everything, closes its side, then closes.

A relay lost while writing is reconnected to (``client.reconnect``): the
publisher declares itself publish-only again and writes the messages the old
connection had not taken whole, first. What the old connection had taken but
the relay had not read yet died with it, and cannot be known here.
"""

from __future__ import annotations

import _thread
import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from jitrelay.client.address import RelayAddress
from jitrelay.client.encoder import DEFAULT_FLUSH_SIZE, Encoder, Link
from jitrelay.client.errors import CLOSE_TIMEOUT, DISCARD_CHUNK, PublishTimeout, RelayConnectionError, connect
from jitrelay.client.reconnect import Reconnect, ReconnectFailed, announce_lost, log, policy_for, retry, whole_from
from jitrelay.client.records import RecordWriter
from jitrelay.core import protocol
from jitrelay.kernels.framer import Buffer


class Publisher(Encoder, RecordWriter):
    """Publish messages into a relay over its Unix socket.

    ``publish`` numbers messages from 0 unless given a ``sequence``, after
    which numbering continues from it. Raises ``RelayConnectionError`` when
    the relay is not running or has closed the connection.

    When a message goes out (the bound on how long it may wait):

    - by default (``linger=0``), each ``publish`` writes its message before
      it returns: a paced publisher adds no latency;
    - inside ``with pub.batch():`` messages collect in the buffer and go out
      whenever ``flush_size`` bytes are buffered and when the block ends;
    - with ``linger=L`` seconds, messages collect the same way and a
      background thread writes out whatever has waited, every ``L / 2``
      seconds, so no message waits much longer than ``L`` (scheduling
      permitting);
    - ``flush()`` and ``close()`` write out everything buffered.

    Only whole messages are ever buffered or written, so a publisher killed
    with messages still buffered loses those messages, never part of one.

    Headers carry ``version`` (jitrelay's 2 unless told; a relay accepts
    what its ``versions`` setting lists, 1 and 2 by default). The checksum is
    computed when the domain's policy checks it, unless ``checksum`` says.

    The publisher tells the relay it only publishes (a ``PUBLISH_ONLY``
    control message, see docs/protocol.md), so the relay sends it nothing and
    it never reads. With ``publish_only=False`` it stays an ordinary
    connection and reads away what the relay forwards to it before each write.

    Back-pressure: a relay that holds the publisher (``block``) makes a write
    wait. ``publish(..., timeout=T)`` writes out at once and waits at most
    ``T`` seconds (0: not at all): ``PublishTimeout`` then says the relay took
    none of the message, which is not published; what was published before
    stays buffered and goes out first. Without a timeout it waits as long as
    the relay holds it.

    A relay lost while writing is reconnected to as ``reconnect`` says (a
    ``Reconnect``; True, the default, its defaults; False: raise
    ``RelayConnectionError`` at once, as before): the write waits meanwhile,
    then the messages not yet written go out on the new connection, whole.
    ``ReconnectFailed`` when it gives up. The first connection is not retried:
    a relay that is not running when the publisher is made raises at once.
    """

    def __init__(
        self,
        domain: str,
        socket_path: str | Path | RelayAddress | None = None,
        *,
        source: int = 0,
        checksum: bool | None = None,
        linger: float = 0.0,
        flush_size: int = DEFAULT_FLUSH_SIZE,
        publish_only: bool = True,
        version: int = protocol.VERSION,
        reconnect: bool | Reconnect = True,
    ) -> None:
        if linger < 0:
            raise ValueError("linger must be at least 0")
        super().__init__(domain, socket_path, source, checksum, publish_only, flush_size, version)
        self.linger = linger
        self.reconnect = policy_for(reconnect)
        self.reconnects = 0  # how many times a lost relay was reconnected to
        self._fill = 0  # the encoder's publish-only declaration: _open sends it on every connection
        self._written = 0  # bytes at the buffer's start already written (a timed publish leaves some)
        self._closing = False
        self._gave_up: ReconnectFailed | None = None
        self._poll = select.poll()
        self._sock: socket.socket | None = self._open()
        self._scratch = bytearray(DISCARD_CHUNK)
        self._batching = 0
        self._flush_at = flush_size if linger else 1  # buffered bytes that make publish write out
        self._lock: _thread.LockType | None = None
        self._lingering: threading.Event | None = None
        if linger:
            self._lock = threading.Lock()
            self._link = Link.LOCKED
            self._lingering = threading.Event()
            threading.Thread(target=self._linger_loop, name="jitrelay-publisher-linger", daemon=True).start()

    publish = Encoder._append  # the one fast path: see encoder.py

    @property
    def buffered(self) -> int:
        """Bytes of whole messages published but not yet written to the socket."""
        return self._fill - self._written

    def _publish_guarded(
        self,
        records: Iterable[tuple[int, bytes]],
        flags: int,
        sequence: int | None,
        timestamp_ns: int | None,
        timeout: float | None,
    ) -> int:
        """``publish`` beside the linger thread (under its lock), with a timeout, or once closed (then it raises)."""
        with self._lock if self._lock is not None else contextlib.nullcontext():
            if timeout is not None:
                return self._publish_within(records, flags, sequence, timestamp_ns, timeout)
            number = self._encode(records, flags, sequence, timestamp_ns)
            if self._fill >= self._flush_at:
                self._write_out()
            return number

    def _publish_within(
        self,
        records: Iterable[tuple[int, bytes]],
        flags: int,
        sequence: int | None,
        timestamp_ns: int | None,
        timeout: float,
    ) -> int:
        """Write out what is buffered, then the message, within ``timeout``; ``PublishTimeout`` if none of it went."""
        deadline = time.monotonic() + timeout
        self._socket()
        if not self._write_out(deadline):
            raise PublishTimeout(
                f"the {self.domain} relay at {self.socket_path} held the publisher for {timeout} s: the message "
                f"is not published ({self.buffered} bytes published before it are still buffered)"
            )
        following = self.next_sequence
        number = self._encode(records, flags, sequence, timestamp_ns)
        if self._write_out(deadline) or self._written:
            return number  # written, or part of it taken: it goes out whole with the next write
        self._fill, self.next_sequence = 0, following
        raise PublishTimeout(
            f"the {self.domain} relay at {self.socket_path} held the publisher for {timeout} s: the message "
            "is not published"
        )

    def publish_raw(self, message: Buffer) -> None:
        """Send bytes exactly as given, valid or not, after everything buffered."""
        self._locked(self._send_after, message)

    def publish_batch(self, buffer: Buffer) -> None:
        """Send a buffer of complete messages (e.g. from ``protocol.build_batch``) in one write."""
        self._locked(self._send_after, buffer)

    @contextlib.contextmanager
    def batch(self) -> Iterator[Publisher]:
        """Within the block, publish writes out by size only; leaving it writes out everything."""
        self._batching += 1
        self._flush_at = self.flush_size
        try:
            yield self
        finally:
            self._batching -= 1
            if self._sock is not None:
                if not self._batching and not self.linger:
                    self._flush_at = 1
                self.flush()

    def flush(self) -> None:
        """Write out everything buffered; when it returns, the kernel holds every message published."""
        self._locked(self._write_out)
        if not self.publish_only:
            try:
                self._discard()
            except RelayConnectionError:
                if self.reconnect is None or self._closing:
                    raise
                self._locked(self._recover, memoryview(b""), 0, self._lost())

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write out what is buffered, then close once the relay has read everything, waiting at most ``timeout`` s."""
        if self._lingering is not None:
            self._lingering.set()
        sock = self._sock
        if sock is None:
            return
        self._closing = True  # a relay lost now is not reconnected to: closing waits for nobody
        with contextlib.suppress(RelayConnectionError):
            self._locked(self._write_out)
        if self.buffered:
            log.warning("publisher to the %s relay closed with %d bytes unwritten", self.domain, self.buffered)
        self._sock = None
        self._link = Link.CLOSED
        self._flush_at = 0  # any later publish reaches _write_out, which raises
        try:
            sock.shutdown(socket.SHUT_WR)
            self._poll.modify(sock, select.POLLIN)
            deadline = time.monotonic() + timeout
            while (remaining := deadline - time.monotonic()) > 0 and self._poll.poll(remaining * 1000):
                with contextlib.suppress(BlockingIOError):
                    if sock.recv_into(self._scratch) == 0:
                        break
        except OSError:
            pass
        finally:
            sock.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _locked(self, action: Callable[..., object], *args: Any) -> None:
        if self._lock is None:
            action(*args)
        else:
            with self._lock:
                action(*args)

    def _linger_loop(self) -> None:
        """Write out, every ``linger / 2`` seconds, whatever has been buffered meanwhile."""
        assert self._lingering is not None and self._lock is not None
        while not self._lingering.wait(self.linger / 2):
            with self._lock:
                if self._sock is None:
                    return
                if self._fill:
                    try:
                        self._write_out()
                    except RelayConnectionError:
                        return  # the next publish raises it

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise self._gave_up or self._closed()
        return self._sock

    def _send_after(self, data: Buffer) -> None:
        self._write_out()
        self._send(data)

    def _write_out(self, deadline: float | None = None) -> bool:
        """Write the buffer out (by ``deadline``, if given); False when the relay held part of it back until then."""
        fill = self._fill
        if not fill:
            return True
        sock = self._sock
        at = self._written
        if sock is not None and self.publish_only and not at:  # the usual case: one send takes it all
            try:
                at = sock.send(self._view[:fill])
            except OSError:
                at = 0  # blocked, or lost: _send waits, or reconnects
            if at == fill:
                self._fill = 0
                return True
        at = self._send(self._view[:fill], deadline, at)
        if at < fill:
            self._written = at
            return False
        self._fill = self._written = 0
        return True

    def _filled(self) -> None:
        """Publish writes out once ``_flush_at`` bytes are buffered."""
        self._write_out()

    def _send(self, data: Buffer, deadline: float | None = None, at: int = 0) -> int:
        """Write ``data`` from byte ``at`` on; return how far it got (all of it, unless ``deadline`` passed first).

        A lost relay is reconnected to (``_recover``) and the data written
        again from the first message the old connection did not take whole.
        """
        view = memoryview(data).cast("B")  # type: ignore[arg-type]  # numpy's stubs do not type an array as a buffer
        while at < len(view):
            sock = self._socket()
            try:
                if not self.publish_only:
                    self._discard()
                at += sock.send(view[at:])
            except BlockingIOError:
                if not self._wait_writable(deadline):
                    return at
            except OSError as exc:
                if self.reconnect is None or self._closing:
                    raise (exc if isinstance(exc, RelayConnectionError) else self._lost(exc)) from exc
                at = self._recover(view, at, exc)
        return at

    def _wait_writable(self, deadline: float | None) -> bool:
        """Wait until the relay takes more, reading what it sends us meanwhile; False once ``deadline`` has passed."""
        if deadline is None:
            events = self._poll.poll()
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            events = self._poll.poll(remaining * 1000)
        for _, event in events:
            if event & select.POLLIN and not self.publish_only:
                self._discard()
        return True

    def _open(self) -> socket.socket:
        """A new connection to the relay, declared publish-only (if so), non-blocking, watched by ``_poll``."""
        sock = connect(self.domain, self.socket_path)
        try:
            if self.publish_only:
                sock.sendall(protocol.publish_only_message(source=self.source))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN | select.POLLOUT)
        return sock

    def _recover(self, data: memoryview, at: int, exc: OSError) -> int:
        """Reconnect after losing the relay at byte ``at`` of ``data``; where to write ``data`` again from.

        ``ReconnectFailed`` on giving up; the caller raises the loss itself when reconnecting is off or closing.
        """
        lost = exc if isinstance(exc, RelayConnectionError) else self._lost(exc)
        assert self.reconnect is not None and self._sock is not None  # the caller raised the loss otherwise
        what = f"publisher to the {self.domain} relay at {self.socket_path}"
        announce_lost(self.reconnect, what, lost)
        self._sock.close()
        self._sock = None
        try:
            self._sock = retry(self.reconnect, what, self._open)
        except ReconnectFailed as failed:
            self._gave_up = failed
            raise
        self.reconnects += 1
        return whole_from(data, at)

    def _discard(self) -> None:
        sock = self._socket()
        while True:
            try:
                received = sock.recv_into(self._scratch)
            except BlockingIOError:
                return
            except OSError as exc:
                raise self._lost(exc) from exc
            if received == 0:
                raise self._lost()
            if received < len(self._scratch):
                return
