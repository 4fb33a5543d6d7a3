"""jitrelay: a Protocol V2 message relay whose hot path is Numba-compiled.

What applications use, in one place: the clients, the message builder and
decoder, and the domains. The relay itself (``jitrelay.server``), the kernels
(``jitrelay.kernels``), the bridge and the tools are imported by name.

    from jitrelay import Publisher, Subscriber
"""

__version__ = "0.1.0"

from jitrelay.client import (
    AsyncPublisher,
    AsyncSubscriber,
    Publisher,
    PublishTimeout,
    Reconnect,
    ReconnectBufferFull,
    ReconnectFailed,
    RelayConnectionError,
    Subscriber,
)
from jitrelay.core.domains import LOGICS, RelayLogic, logic_for
from jitrelay.core.protocol import Message, ProtocolError, build_message, decode_messages

__all__ = [
    "LOGICS",
    "AsyncPublisher",
    "AsyncSubscriber",
    "Message",
    "ProtocolError",
    "PublishTimeout",
    "Publisher",
    "Reconnect",
    "ReconnectBufferFull",
    "ReconnectFailed",
    "RelayConnectionError",
    "RelayLogic",
    "Subscriber",
    "__version__",
    "build_message",
    "decode_messages",
    "logic_for",
]
