"""A subscriber's stream state: the framer, the subscription, positions, notices and gaps. Pure: no I/O.

A relay connection carries whole messages back to back with no framing besides
the header, so a subscriber must cut its byte stream into messages itself.
``MessageFramer`` does that once for both flavours: it owns a numpy receive
buffer, hands out its free tail for the next read (``recv_into`` or a copy of
what asyncio read), and returns every complete message as one batch, keeping
the unfinished tail for the next read. Framing is ``kernels.frame``, the same
walk the relay does, so a batch costs one compiled call however many messages
it holds, and a partial message costs a re-read of its header only.

What the subscribers read, and how they wait, is theirs (``subscriber``,
``async_subscriber``); what they do with the bytes read is here, the same for
both.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jitrelay.client.address import RelayAddress
from jitrelay.client.errors import Endpoint, RelayConnectionError
from jitrelay.client.reconnect import ReconnectFailed
from jitrelay.client.shared_log import MappedStream
from jitrelay.core import protocol
from jitrelay.core.views import MessageView, batch_headers, iter_views, message_offsets
from jitrelay.kernels.framer import MessageFramer

_FROM_MAPPING: Any = object()  # ``_position`` when it is the mapped reader's own


class SubscriberMode(enum.Enum):
    """Which stream a subscriber reads, and so how it reads it."""

    SOCKET = "the relay's stream over the socket, as sent"
    POSITIONED = "the relay's stream over the socket, with position notices taken out here"
    MAPPED = "the relay's log mapped from shared memory, once granted"


def _subscription(tlv_types: Iterable[int] | None, sources: Iterable[int] | None) -> bytes | None:
    """The control message for a subscription, or None for the whole domain."""
    if tlv_types is None and sources is None:
        return None
    return protocol.subscribe_message(tlv_types, sources)


class SubscriberStream(Endpoint):
    """What both subscribers share: the target, the framer, the subscription sent on connecting, how a stream ends.

    Raises ``ValueError`` for a subscription or position that is not one.

    With positions (``positions=True``, or ``resume_from``) the relay puts
    notices in the stream (docs/protocol.md, "Positions"); they are taken out
    here: ``position`` is where the stream stands after the last message
    handed out, and ``gaps`` what the relay said was missed.

    With ``shared_memory=True`` the stream, once the relay has granted it,
    comes from the relay's log mapped into this process (``client.shared_log``)
    instead of the socket: the same bytes, in the same order, without a send
    per subscriber. A subscription is then applied here, with the relay's own
    compiled routing.
    """

    kind = "subscriber"

    def __init__(
        self,
        domain: str,
        socket_path: str | Path | RelayAddress | None,
        buffer_size: int,
        tlv_types: Iterable[int] | None,
        sources: Iterable[int] | None,
        positions: bool = False,
        resume_from: protocol.Position | str | None = None,
        shared_memory: bool = False,
    ) -> None:
        super().__init__(domain, socket_path)
        if shared_memory and not self.address.is_unix:
            raise ValueError(
                f"shared memory needs the relay's Unix socket on this host; {self.address} is a network address"
            )
        self._framer = MessageFramer(buffer_size)
        initial = _subscription(tlv_types, sources)  # before connecting: a bad value raises with nothing open
        self._selection = protocol.apply_control(protocol.EVERYTHING, initial) if initial else protocol.EVERYTHING
        if isinstance(resume_from, str):
            resume_from = protocol.Position.parse(resume_from)
        self.positioned = positions or resume_from is not None
        self._resume_from = resume_from  # where a reconnection resumes until the relay has said where it stands
        if self.positioned:
            initial = (initial or b"") + protocol.positions_message(resume_from)
        self._mode = SubscriberMode.POSITIONED if self.positioned else SubscriberMode.SOCKET
        if shared_memory:
            self._mode = SubscriberMode.MAPPED  # positions, if asked for, come with the mapped reader's
            initial = (initial or b"") + protocol.shared_memory_message()
        self._initial = initial
        self._position: protocol.Position | None = None
        # A connection's data before its first notice is not the positioned stream: the relay forwarded it
        # before it read the request for positions. True from a reconnection until that notice.
        self._awaiting_notice = False
        self.gaps: list[protocol.Gap] = []
        self._mapped: MappedStream | None = None
        self._gave_up: ReconnectFailed | None = None  # why a subscriber stopped reconnecting

    def _resume_message(self) -> bytes | None:
        """What a new connection after a lost one starts with: the subscription in force, positions, shared memory.

        With positions, the stream resumes right after the last message handed
        out: the relay says what that position's loss means (``GAP`` for an
        epoch it does not know, its journal's replay on execution).
        """
        message = b""
        if self._selection != protocol.EVERYTHING:
            message += protocol.subscribe_message(*self._selection)
        if self.positioned:
            message += protocol.positions_message(self.position or self._resume_from)
        if self._mode is SubscriberMode.MAPPED:
            message += protocol.shared_memory_message()
        return message or None

    def _fresh_framer(self) -> None:
        """Forget what a connection that failed before the grant had read: the next one reads it again."""
        self._framer = MessageFramer(self._framer.capacity)

    def _forget_connection(self) -> int:
        """Drop what belonged to a lost connection (the mapping, an unfinished message); return that message's bytes.

        The next connection starts with ``_resume_message``.
        """
        position = self.position
        partial = self._framer.buffered
        self._fresh_framer()
        self._mapped = None
        self._position = position
        self._awaiting_notice = self.positioned
        self._initial = self._resume_message()
        return partial

    headers = staticmethod(batch_headers)  # every header of a batch as one structured array, in one call

    @property
    def mode(self) -> SubscriberMode:
        """Which stream this subscriber reads (fixed when it is made): the one question both flavours ask."""
        return self._mode

    @property
    def shared_memory(self) -> bool:
        """Whether the stream comes from the relay's log mapped into this process (once granted)."""
        return self._mode is SubscriberMode.MAPPED

    @property
    def position(self) -> protocol.Position | None:
        """Where the stream stands after the last message handed out: give it as ``resume_from`` to go on from there."""
        if self._position is _FROM_MAPPING:
            return self._mapped.reader.position if self._mapped is not None else None
        return self._position

    def _segments(self, batch: np.ndarray) -> list[tuple[np.ndarray, protocol.Position | None]]:
        """The runs of data messages in ``batch``, each with the position it starts at; notices taken out.

        ``position`` is left where the batch ends.
        """
        if not self.positioned:
            return [(batch, None)]
        starts = message_offsets(batch)
        notices = np.flatnonzero(batch[starts + protocol.OFF_DOMAIN] == protocol.CONTROL_DOMAIN)
        ends = np.append(starts[1:], len(batch))
        found: list[tuple[np.ndarray, protocol.Position | None]] = []
        at = 0
        for k in [*notices.tolist(), len(starts)]:
            first = starts[k] if k < len(starts) else len(batch)
            # Before a connection's first notice: not this stream's (forwarded before the relay read the request).
            if first > at and self._position is not None and not self._awaiting_notice:
                found.append((batch[at:first], self._position))
                self._advance(batch[at:first], int(np.searchsorted(starts, first) - np.searchsorted(starts, at)))
            if k < len(starts):
                notice = protocol.read_notice(batch[first : ends[k]].data)  # the same bytes, as a memoryview
                self._awaiting_notice = False
                if isinstance(notice, protocol.Position):
                    self._position = notice
                else:
                    self.gaps.append(notice)  # type: ignore[arg-type]  # a grant is read before: take_grant
                at = int(ends[k])
        return found

    def _advance(self, data: np.ndarray, messages: int) -> None:
        if self._position is not None:
            epoch, offset, number = self._position
            self._position = protocol.Position(epoch, offset + len(data), number + messages)

    def _views(self, batch: np.ndarray) -> Iterator[MessageView]:
        """Views of a batch's messages; with positions, ``position`` moves past each as it is handed out."""
        segments = self._segments(batch)
        end = self._position
        for data, start in segments:
            if start is None:
                yield from iter_views(data.tobytes())
                continue
            epoch, offset, number = start
            for view in iter_views(data.tobytes()):
                offset += view.size
                number += 1
                self._position = protocol.Position(epoch, offset, number)
                yield view
        self._position = end

    def _data(self, batch: np.ndarray) -> np.ndarray | None:
        """The batch without notices (None if it held nothing else); ``position`` at its end."""
        if not self.positioned:
            return batch
        segments = self._segments(batch)
        if not segments:
            return None
        return segments[0][0] if len(segments) == 1 else np.concatenate([data for data, _ in segments])

    def _select(self, message: bytes) -> bytes:
        """Note the subscription ``message`` sets: a reader of the mapped log filters by it itself."""
        self._selection = protocol.apply_control(self._selection, message)
        if self._mapped is not None:
            self._mapped.select(self._selection)
        return message

    def _buffered_batch(self) -> np.ndarray | None:
        """The next batch of data messages the framer holds already, notices taken out; None when it holds none."""
        while self._framer.buffered:
            raw = self._framer.maybe_extract_batch()
            if raw is None:
                break
            batch = self._data(raw)
            if batch is not None:
                return batch
        return None

    def _reading_mapping(self) -> MappedStream:
        """The mapped reader, from now on the one that says where the stream stands (asked only when wanted)."""
        assert self._mapped is not None
        self._position = _FROM_MAPPING
        return self._mapped

    def _mapped_views(self, batch: np.ndarray) -> Iterator[MessageView]:
        """A mapped batch's views; unfiltered, ``position`` moves past each as it is handed out."""
        views = list(iter_views(batch.tobytes()))
        kept, end = self._position, self.position
        if end is None or (self._mapped is not None and self._mapped.filtered):
            yield from views
            return
        offset, number = end.offset - len(batch), end.message - len(views)
        for view in views:
            offset += view.size
            number += 1
            self._position = protocol.Position(end.epoch, offset, number)
            yield view
        self._position = kept

    def _ended(self) -> EOFError | RelayConnectionError:
        """What the relay closing the connection means: the end between messages, a lost connection within one."""
        if self._framer.buffered:
            return RelayConnectionError(
                f"the {self.domain} relay at {self.socket_path} closed the connection in the middle of a message "
                f"({self._framer.buffered} bytes of it received)"
            )
        return EOFError(f"the {self.domain} relay at {self.socket_path} closed the connection")
