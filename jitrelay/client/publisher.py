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
from jitrelay.client.errors import CLOSE_TIMEOUT, DISCARD_CHUNK, RelayConnectionError, connect
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
    ) -> None:
        if linger < 0:
            raise ValueError("linger must be at least 0")
        super().__init__(domain, socket_path, source, checksum, publish_only, flush_size, version)
        self.linger = linger
        self._sock: socket.socket | None = connect(domain, self.socket_path)
        self._sock.setblocking(False)
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN | select.POLLOUT)
        self._scratch = bytearray(DISCARD_CHUNK)
        self._batching = 0
        self._flush_at = flush_size if linger else 1  # buffered bytes that make publish write out
        self._lock: _thread.LockType | None = None
        self._lingering: threading.Event | None = None
        try:
            self._write_out()  # the publish-only declaration
        except BaseException:
            self._sock.close()
            raise
        if linger:
            self._lock = threading.Lock()
            self._link = Link.LOCKED
            self._lingering = threading.Event()
            threading.Thread(target=self._linger_loop, name="jitrelay-publisher-linger", daemon=True).start()

    publish = Encoder._append  # the one fast path: see encoder.py

    def _publish_guarded(
        self, records: Iterable[tuple[int, bytes]], flags: int, sequence: int | None, timestamp_ns: int | None
    ) -> int:
        """``publish`` beside the linger thread (under its lock), or once closed (where writing out raises)."""
        with self._lock if self._lock is not None else contextlib.nullcontext():
            number = self._encode(records, flags, sequence, timestamp_ns)
            if self._fill >= self._flush_at:
                self._write_out()
            return number

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
            self._discard()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write out what is buffered, then close once the relay has read everything, waiting at most ``timeout`` s."""
        if self._lingering is not None:
            self._lingering.set()
        sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(RelayConnectionError):
            self._locked(self._write_out)
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

    def _locked(self, action: Callable[..., None], *args: Any) -> None:
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
            raise self._closed()
        return self._sock

    def _send_after(self, data: Buffer) -> None:
        self._write_out()
        self._send(data)

    def _write_out(self) -> None:
        fill = self._fill
        if not fill:
            return
        sock = self._sock
        if sock is not None and self.publish_only:  # the usual case: one send takes it all
            try:
                sent = sock.send(self._view[:fill])
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise self._lost(exc) from exc
            if sent < fill:
                self._send(self._view[sent:fill])
        else:
            self._send(self._view[:fill])
        self._fill = 0

    _filled = _write_out  # publish writes out once _flush_at bytes are buffered

    def _send(self, data: Buffer) -> None:
        sock = self._socket()
        if not self.publish_only:
            self._discard()
        view = memoryview(data).cast("B")  # type: ignore[arg-type]  # numpy's stubs do not type an array as a buffer
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                # Wait until the relay takes more, reading what it sends us meanwhile.
                for _, events in self._poll.poll():
                    if events & select.POLLIN:
                        self._discard()
            except OSError as exc:
                raise self._lost(exc) from exc

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
