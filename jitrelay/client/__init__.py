"""Publishers and subscribers for applications, blocking and asyncio.

One job per module:

- ``errors``: how a client reaches its relay, ``RelayConnectionError`` and ``PublishTimeout``;
- ``reconnect``: when a client tries a lost relay again (``Reconnect``, ``ReconnectFailed``);
- ``encoder``: the wire encoder every publisher builds messages with (its one fast path);
- ``publisher``, ``async_publisher``: writing the encoder's buffer out, blocking and asyncio;
- ``stream``: a subscriber's stream state (framer, subscription, positions, notices, gaps), no I/O;
- ``subscriber``, ``async_subscriber``: reading that stream, blocking and asyncio;
- ``shared_log``: the reader of a relay's log mapped from shared memory.
"""

from __future__ import annotations

from jitrelay.client.async_publisher import AsyncPublisher
from jitrelay.client.async_subscriber import AsyncSubscriber
from jitrelay.client.encoder import DEFAULT_FLUSH_SIZE
from jitrelay.client.errors import CLOSE_TIMEOUT, PublishTimeout, RelayConnectionError
from jitrelay.client.publisher import Publisher
from jitrelay.client.reconnect import Reconnect, ReconnectBufferFull, ReconnectFailed
from jitrelay.client.shared_log import CutOff
from jitrelay.client.stream import SubscriberMode
from jitrelay.client.subscriber import Subscriber
from jitrelay.core.views import MessageView
from jitrelay.kernels.framer import MessageFramer

__all__ = [
    "CLOSE_TIMEOUT",
    "DEFAULT_FLUSH_SIZE",
    "AsyncPublisher",
    "AsyncSubscriber",
    "CutOff",
    "MessageFramer",
    "MessageView",
    "PublishTimeout",
    "Publisher",
    "Reconnect",
    "ReconnectBufferFull",
    "ReconnectFailed",
    "RelayConnectionError",
    "Subscriber",
    "SubscriberMode",
]
