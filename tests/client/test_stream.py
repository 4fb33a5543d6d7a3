"""A subscriber's positioned stream without sockets: what a new connection sends before its first notice.

The relay treats a new connection as a plain subscriber until it has read the
connection's request for positions, so a batch published in between reaches
it twice: once as plain data, then again from its cursor after the notice
that says where the positioned stream resumes. A reconnected subscriber must
hand out the second copy only.
"""

from __future__ import annotations

import numpy as np

from jitrelay.client.stream import SubscriberStream
from jitrelay.core import protocol
from jitrelay.kernels.framer import DEFAULT_BUFFER_SIZE


def numbered(n: int) -> bytes:
    return protocol.build_message(protocol.EXECUTION, [(40, b"%08d" % n)], sequence=n, timestamp_ns=n)


def stream_at(position: protocol.Position) -> SubscriberStream:
    stream = SubscriberStream("execution", "/nonexistent/execution.sock", DEFAULT_BUFFER_SIZE, None, None, True)
    stream._position = position  # as after handing out the messages before ``position``
    return stream


def handed_out(stream: SubscriberStream, data: bytes) -> list[bytes]:
    return [view.raw for view in stream._views(np.frombuffer(data, dtype=np.uint8))]


def test_a_reconnected_stream_drops_what_came_before_the_new_connections_first_notice() -> None:
    size = len(numbered(0))
    stream = stream_at(protocol.Position(5, 10 * size, 10))
    stream._forget_connection()  # the relay went away and came back
    stray = numbered(12) + numbered(13)  # forwarded to the new connection before the relay read its request
    resumed = protocol.position_notice(protocol.Position(5, 10 * size, 10)) + b"".join(map(numbered, range(10, 14)))
    assert handed_out(stream, stray + resumed) == [numbered(n) for n in range(10, 14)]
    assert stream.position == protocol.Position(5, 14 * size, 14)
    assert handed_out(stream, numbered(14)) == [numbered(14)]  # from then on the connection's data is the stream
    assert stream.position == protocol.Position(5, 15 * size, 15)


def test_a_stream_that_has_not_reconnected_goes_on_from_where_it_stands() -> None:
    size = len(numbered(0))
    stream = stream_at(protocol.Position(5, 10 * size, 10))
    assert handed_out(stream, numbered(10) + numbered(11)) == [numbered(10), numbered(11)]
    assert stream.position == protocol.Position(5, 12 * size, 12)
