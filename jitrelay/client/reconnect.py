"""When a client tries its relay again after losing it: the settings, the backoff schedule, and the retry loop.

A relay restarted under its clients (a deploy, systemd's ``Restart=``) must
not end a strategy's stream or a publisher's life. Every client takes a
``Reconnect`` (on by default, as NATS clients reconnect by default): on a lost
relay it waits a little, tries again, waits longer, and so on up to
``max_delay``, for at most ``attempts`` tries, calling ``on_disconnected`` once
and ``on_reconnected`` once it is back. What each client restores on the new
connection (its subscription, positions, publish-only declaration, unwritten
messages) is the client's own; the schedule and the loop are here.

``delays`` is pure (the random source is passed in); ``retry`` and
``retry_async`` are the thin loops that sleep between tries.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from jitrelay.client.errors import RelayConnectionError
from jitrelay.core import protocol

log = logging.getLogger("jitrelay.client")

_T = TypeVar("_T")
_PAYLOAD_SIZE = struct.Struct("<I")


class ReconnectFailed(RelayConnectionError):
    """A client lost its relay and gave up trying it again: its ``attempts`` were used up (or reconnecting is off)."""


class ReconnectBufferFull(RelayConnectionError):
    """An asyncio publisher reconnecting to its relay already keeps ``buffer_limit`` bytes: this message is not
    published (its sequence number is not used). Memory stays bounded however long the relay is away."""


@dataclass(frozen=True)
class Reconnect:
    """How a client reconnects to a relay it lost. ``Reconnect()`` is the default every client uses.

    Before try ``n`` (from 1) it waits ``first_delay * multiplier ** (n - 2)``
    seconds (no wait before the first), at most ``max_delay``, each delay
    spread by up to ``jitter`` of itself either way so that many clients of
    one relay do not come back in step. The defaults try at once, then after
    10, 20, 40, 80, 160 ms and every 200 ms after that: a relay back up is
    heard from within about 0.2 s; 600 tries are about two minutes. ``attempts=None``
    tries forever; ``give_up_after`` (seconds) bounds the time instead of, or as
    well as, the tries. An asyncio publisher keeps what ``publish_nowait`` is
    given meanwhile up to ``buffer_limit`` bytes, then raises
    ``ReconnectBufferFull`` (a blocking publisher's ``publish`` waits instead).

    ``on_disconnected(error)`` is called once when the connection is lost,
    ``on_reconnected(attempts)`` once it is back (with the tries it took), on
    the thread (or event loop) that was using the client. Both are logged as
    well (logger ``jitrelay.client``), as is giving up, which raises
    ``ReconnectFailed``.
    """

    attempts: int | None = 600
    give_up_after: float | None = None  # seconds: no try starts once the relay has been gone this long
    buffer_limit: int = 8 * 1024 * 1024  # bytes an asyncio publisher keeps while reconnecting (as NATS's)
    first_delay: float = 0.01
    max_delay: float = 0.2
    multiplier: float = 2.0
    jitter: float = 0.2
    on_disconnected: Callable[[RelayConnectionError], None] | None = None
    on_reconnected: Callable[[int], None] | None = None

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("attempts must be at least 1, or None to try forever")
        if self.buffer_limit < 0:
            raise ValueError("buffer_limit must be at least 0")
        if self.give_up_after is not None and self.give_up_after <= 0:
            raise ValueError("give_up_after must be positive, or None for no time limit")
        if not 0 <= self.first_delay <= self.max_delay:
            raise ValueError("delays must satisfy 0 <= first_delay <= max_delay")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The wait before each try, in seconds: 0 first, then growing to ``max_delay``; ``attempts`` of them."""
        uniform = (rng or random).uniform
        tries = 0
        delay = self.first_delay
        while self.attempts is None or tries < self.attempts:
            if tries == 0:
                yield 0.0
            else:
                yield delay * uniform(1 - self.jitter, 1 + self.jitter)
                delay = min(delay * self.multiplier, self.max_delay)
            tries += 1


def policy_for(reconnect: bool | Reconnect) -> Reconnect | None:
    """The policy a client's ``reconnect`` argument asks for: True the default one, False none."""
    if reconnect is True:
        return Reconnect()
    if reconnect is False:
        return None
    if isinstance(reconnect, Reconnect):
        return reconnect
    raise TypeError(f"reconnect must be True, False or a Reconnect, not {reconnect!r}")


def announce_lost(policy: Reconnect, what: str, error: RelayConnectionError) -> None:
    """Log the loss and call ``on_disconnected``."""
    log.warning("%s lost its relay (%s); reconnecting", what, error)
    if policy.on_disconnected is not None:
        policy.on_disconnected(error)


def _announce_back(policy: Reconnect, what: str, tries: int, since: float) -> None:
    log.warning("%s reconnected after %d tries in %.3f s", what, tries, time.monotonic() - since)
    if policy.on_reconnected is not None:
        policy.on_reconnected(tries)


def _gave_up(what: str, tries: int, since: float, last: BaseException | None) -> ReconnectFailed:
    message = f"{what} gave up reconnecting after {tries} tries in {time.monotonic() - since:.1f} s: {last}"
    log.error("%s", message)
    return ReconnectFailed(message)


def _out_of_time(policy: Reconnect, since: float, delay: float) -> bool:
    """Whether the next try would start after ``give_up_after`` (never before the first)."""
    limit = policy.give_up_after
    return limit is not None and delay > 0 and time.monotonic() + delay - since > limit


def retry(policy: Reconnect, what: str, attempt: Callable[[], _T]) -> _T:
    """``attempt()`` until it returns, sleeping ``policy.delays()`` between tries; ``ReconnectFailed`` at the end.

    A try fails with ``OSError`` (``RelayConnectionError`` included, a relay
    that is not there yet); anything else is not a lost relay and goes to the caller.
    """
    since, tries, last = time.monotonic(), 0, None
    for delay in policy.delays():
        if _out_of_time(policy, since, delay):
            break
        time.sleep(delay)
        tries += 1
        try:
            result = attempt()
        except OSError as exc:
            last = exc
            continue
        _announce_back(policy, what, tries, since)
        return result
    raise _gave_up(what, tries, since, last) from last


async def retry_async(policy: Reconnect, what: str, attempt: Callable[[], Awaitable[_T]]) -> _T:
    """``retry`` for asyncio: ``await attempt()`` until it returns, ``asyncio.sleep`` between tries."""
    since, tries, last = time.monotonic(), 0, None
    for delay in policy.delays():
        if _out_of_time(policy, since, delay):
            break
        await asyncio.sleep(delay)
        tries += 1
        try:
            result = await attempt()
        except OSError as exc:
            last = exc
            continue
        _announce_back(policy, what, tries, since)
        return result
    raise _gave_up(what, tries, since, last) from last


def whole_from(data: memoryview, sent: int) -> int:
    """Where the message holding byte ``sent`` of ``data`` (messages back to back from 0) starts.

    What a publisher writes again on a new connection: a message the old one
    took only part of never reached any subscriber (a relay forwards whole
    messages only), so it goes again whole. Bytes that are not messages
    (``publish_raw``) are resumed at ``sent``.
    """
    at = 0
    while at < sent:
        if len(data) - at < protocol.HEADER_SIZE or bytes(data[at : at + 4]) != protocol.MAGIC_BYTES:
            return sent
        end = at + protocol.HEADER_SIZE + _PAYLOAD_SIZE.unpack_from(data, at + protocol.OFF_PAYLOAD_SIZE)[0]
        if end > sent:
            return at
        at = end
    return at
