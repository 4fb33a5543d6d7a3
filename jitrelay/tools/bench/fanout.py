"""The fanout workload's subscriber process: many subscribers of one kind, polled in one loop.

Every relay's fanout run spreads its subscribers over the same number of
these processes (``runs.hosting``), so what differs between relays is the
relay, not how the subscribers wait.
"""

from __future__ import annotations

import selectors
import time
from array import array
from typing import Any

from jitrelay.client.shared_log import CutOff
from jitrelay.core.protocol import MAGIC, MAGIC_FIELD, OFF_MAGIC, OFF_SEQUENCE, SEQUENCE_TIMESTAMP_FIELDS
from jitrelay.tools.bench.receive import POLL_SECONDS, Ending, await_probe, mapped_await_probe, shared_subscriber
from jitrelay.tools.bench.relays import Endpoint, connect

FANOUT_BUFFER = 64 * 1024  # a host's receive buffer (sockets: one for all; shared memory: each reader's)


class Tally:
    """What each of a host's ``count`` subscribers has received: sequences, delays, gaps, why it ended."""

    def __init__(self, count: int, size: int):
        self.size = size
        self.seqs = [array("Q") for _ in range(count)]
        self.delays = [array("q") for _ in range(count)]
        self.received = [0] * count
        self.gaps = [0] * count
        self.bad_magic = [0] * count
        self.ended: list[str | None] = [None] * count
        self.partial = [b""] * count  # a socket subscriber's bytes of a message not yet whole

    def take(self, k: int, data: Any, end_at: int, now: int) -> None:
        """Subscriber ``k``'s whole messages in ``data[:end_at]``, read at monotonic ``now``."""
        got_seq, got_delay = self.seqs[k], self.delays[k]
        for pos in range(0, end_at, self.size):
            if MAGIC_FIELD.unpack_from(data, pos + OFF_MAGIC)[0] != MAGIC:
                self.bad_magic[k] += 1
                continue
            seq, sent_ns = SEQUENCE_TIMESTAMP_FIELDS.unpack_from(data, pos + OFF_SEQUENCE)
            if seq != self.received[k]:
                self.gaps[k] += 1
            got_seq.append(seq)
            got_delay.append(now - sent_ns)
            self.received[k] += 1

    def finished(self, expected: Any) -> bool:
        """Whether every subscriber has every message sent (once the publisher has said how many)."""
        return 0 <= expected.value <= min(self.received)

    def result(self, cpu: float, stop: str | None) -> dict:
        """The host's figures: its CPU time and each subscriber's counts, sequences and delays (as bytes)."""
        return {
            "cpu_s": cpu,
            "stop": stop,
            "subscribers": [
                {
                    "received": self.received[k],
                    "partial_bytes": len(self.partial[k]),
                    "sequence_gaps": self.gaps[k],
                    "bad_magic": self.bad_magic[k],
                    "last_sequence": self.seqs[k][-1] if self.received[k] else None,
                    "stop": self.ended[k] or stop,
                    "sequences": self.seqs[k].tobytes(),
                    "delays_ns": self.delays[k].tobytes(),
                }
                for k in range(len(self.received))
            ],
        }


def fanout_host(
    who: str, reports: Any, end: Endpoint, size: int, count: int, probe: bytes, expected: Any, limit_s: float
) -> dict:
    """A fanout subscriber process: ``count`` subscribers of one kind, polled in one loop, every arrival stamped.

    Socket subscribers (``end.transport == "unix"``: the raw forwarder's, a
    jitrelay relay's) are non-blocking sockets in one epoll set
    (``_poll_sockets``); shared-memory subscribers (``"shm"``) are
    ``Subscriber(shared_memory=True)`` objects (``_poll_shared``). Either way
    one wait per wake-up, then one read per subscriber. Each message a
    subscriber reads is stamped ``time.monotonic_ns()`` right after its read,
    less the publisher's ``time.monotonic_ns()`` stamp in the message.
    Raises ``BenchError`` when a subscriber's first message is not the probe.
    """
    shared = end.transport == "shm"
    subs: list[Any] = [
        shared_subscriber(end.address, FANOUT_BUFFER) if shared else connect(end.address) for _ in range(count)
    ]
    reports.put(("connected", who, None))
    for sub in subs:
        (mapped_await_probe if shared else await_probe)(sub, probe)
    reports.put(("ready", who, None))
    tally = Tally(count, size)
    ending = Ending(expected, limit_s)
    cpu = time.process_time()
    stop = (_poll_shared if shared else _poll_sockets)(subs, tally, ending, expected)
    cpu = time.process_time() - cpu
    for sub in subs:
        sub.close()
    return tally.result(cpu, stop)


def _poll_shared(subs: list[Any], tally: Tally, ending: Ending, expected: Any) -> str | None:
    """Sleep in the first live reader's ``recv_batch`` (the log's futex word), then ask each other without waiting."""

    def read(k: int, timeout: float) -> Any:
        try:
            batch = subs[k].recv_batch(timeout)
        except EOFError as exc:
            tally.ended[k] = "lapped" if isinstance(exc, CutOff) else "closed by relay"
            return None
        if batch is not None:
            tally.take(k, batch, len(batch), time.monotonic_ns())
        return batch

    stop = None
    while stop is None:
        live = [k for k in range(len(subs)) if tally.ended[k] is None]
        if not live:
            stop = "closed by relay"
            continue
        # The first reader is never behind the others (it reads first each round), so while it waits on the
        # log's futex word none of them has anything left to read.
        if read(live[0], POLL_SECONDS) is None:
            if tally.ended[live[0]] is None:
                stop = ending.on_timeout(min(tally.received))
            continue
        for k in live[1:]:
            read(k, 0)
        ending.data()
        stop = "all received" if tally.finished(expected) else None
    return stop


def _poll_sockets(subs: list[Any], tally: Tally, ending: Ending, expected: Any) -> str | None:
    """Sleep in ``epoll_wait`` until a socket is readable, then read each readable one into one shared buffer."""
    selector = selectors.EpollSelector()
    for k, sock in enumerate(subs):
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, k)
    buf = bytearray(FANOUT_BUFFER)
    view = memoryview(buf)
    size, partial = tally.size, tally.partial
    stop = None
    while stop is None:
        events = selector.select(POLL_SECONDS)
        if not events:
            stop = ending.on_timeout(min(tally.received))
            continue
        for key, _ in events:
            k = key.data
            try:
                n = subs[k].recv_into(buf)
            except BlockingIOError:
                continue
            now = time.monotonic_ns()
            if n == 0:
                tally.ended[k] = "closed by relay"
                selector.unregister(subs[k])
                continue
            data = partial[k] + bytes(view[:n]) if partial[k] else view[:n]
            whole = len(data) - len(data) % size
            tally.take(k, data, whole, now)
            partial[k] = bytes(data[whole:])
        if all(e is not None for e in tally.ended):
            stop = "closed by relay"
        else:
            ending.data()
            stop = "all received" if tally.finished(expected) else stop
    selector.close()
    return stop
