"""The messages the workloads send, and the fixed shapes of the workloads that are not options.

Shared by the worker processes (which build and check the messages), the
runs (which probe with them) and the figures (which count what each
subscriber should have had).
"""

from __future__ import annotations

import struct

from jitrelay.core import protocol
from jitrelay.core.domains import CHECKSUM_OFF, CHECKSUM_POLICY_BY_DOMAIN
from jitrelay.core.protocol import MARKET_DATA, OFF_CHECKSUM
from jitrelay.core.units import MiB
from jitrelay.tools.usage import UsageError

BATCH_BYTES = 1 * MiB  # W1: what one publisher send holds
PROBE_SEQUENCE = (1 << 64) - 1
FILTERED_SUBSCRIBERS = 4  # W1f: one subscriber per TLV type 1..4
STUCK_RATE = 200_000  # W3: messages per second, in sends of STUCK_BATCH, to STUCK_HEALTHY subscribers and a stuck one
STUCK_BATCH = 100
STUCK_HEALTHY = 3
CHECKSUM_FIELD = struct.Struct("<I")  # at OFF_CHECKSUM


def first_type(domain: int) -> int:
    """The domain's first TLV type: what its messages carry (market_data 1, execution 40)."""
    return protocol.DOMAIN_TLV_RANGES[domain][0][0]


def checksummed(domain: int) -> bool:
    """Whether the relay of ``domain`` verifies checksums by default, so its publishers must fill them in."""
    return CHECKSUM_POLICY_BY_DOMAIN[domain] != CHECKSUM_OFF


def stamp_checksum(message: bytearray) -> None:
    """Refill one message's CRC-32 after its header changed: a relay that verifies it rejects a stale one."""
    CHECKSUM_FIELD.pack_into(message, OFF_CHECKSUM, protocol.message_checksum(memoryview(message)))


def records_for(size: int, domain: int = MARKET_DATA) -> list[tuple[int, bytes]]:
    """The one record of the domain's first type that makes its message exactly ``size`` bytes long.

    Raises ``UsageError`` for a size no such message has.
    """
    try:
        return [protocol.synthetic_record(domain, size)]
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def probe_message(size: int, types: int = 1, domain: int = MARKET_DATA) -> bytes:
    """The attach probe: sequence 2**64-1, and never ``size`` bytes long, so a zmq subscriber tells it by length.

    It is a message of ``domain``, checksum filled in, so that relay forwards
    it. With ``types`` > 1 it carries a record of each of the domain's first
    ``types`` types, so every W1f filter selects it.
    """
    first = first_type(domain)
    records = [(t, b"probe" if size != 39 else b"probe!") for t in range(first, first + types)]
    probe = protocol.build_message(domain, records, sequence=PROBE_SEQUENCE, timestamp_ns=0)
    if len(probe) == size:
        probe = protocol.build_message(domain, records + [(first, b"")], sequence=PROBE_SEQUENCE, timestamp_ns=0)
    return probe


def share(sent: int, stride: int = 1, first: int = 0) -> tuple[int, int]:
    """Of sequences ``0..sent-1``, how many a subscriber gets and the last one, when it gets ``first + i * stride``.

    Unfiltered (stride 1) that is every message; a W1f subscriber ``k`` gets sequences ``k, k + 4, ...``.
    """
    return (sent - first + stride - 1) // stride, sent - 1 - (sent - 1 - first) % stride


def stride_of(workload: str) -> int:
    """A subscriber gets every ``stride_of``-th message: W1f subscriber ``k`` those with sequence ``k`` modulo 4."""
    return FILTERED_SUBSCRIBERS if workload == "w1f" else 1
