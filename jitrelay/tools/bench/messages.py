"""The messages the workloads send, and the fixed shapes of the workloads that are not options.

Shared by the worker processes (which build and check the messages), the
runs (which probe with them) and the figures (which count what each
subscriber should have had).
"""

from __future__ import annotations

from jitrelay.core import protocol
from jitrelay.core.protocol import MARKET_DATA
from jitrelay.core.units import MiB
from jitrelay.tools.usage import UsageError

BATCH_BYTES = 1 * MiB  # W1: what one publisher send holds
PROBE_SEQUENCE = (1 << 64) - 1
FILTERED_SUBSCRIBERS = 4  # W1f: one subscriber per TLV type 1..4
STUCK_RATE = 200_000  # W3: messages per second, in sends of STUCK_BATCH, to STUCK_HEALTHY subscribers and a stuck one
STUCK_BATCH = 100
STUCK_HEALTHY = 3


def records_for(size: int) -> list[tuple[int, bytes]]:
    """The one type-1 record that makes a market_data message exactly ``size`` bytes long.

    Raises ``UsageError`` for a size no such message has.
    """
    try:
        return [protocol.synthetic_record(MARKET_DATA, size)]
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def probe_message(size: int, types: int = 1) -> bytes:
    """The attach probe: sequence 2**64-1, and never ``size`` bytes long, so a zmq subscriber tells it by length.

    With ``types`` > 1 it carries a record of each type 1..``types``, so every W1f filter selects it.
    """
    records = [(t, b"probe" if size != 39 else b"probe!") for t in range(1, types + 1)]
    probe = protocol.build_message(MARKET_DATA, records, sequence=PROBE_SEQUENCE, timestamp_ns=0)
    if len(probe) == size:
        probe = protocol.build_message(MARKET_DATA, records + [(1, b"")], sequence=PROBE_SEQUENCE, timestamp_ns=0)
    return probe


def share(sent: int, stride: int = 1, first: int = 0) -> tuple[int, int]:
    """Of sequences ``0..sent-1``, how many a subscriber gets and the last one, when it gets ``first + i * stride``.

    Unfiltered (stride 1) that is every message; a W1f subscriber ``k`` gets sequences ``k, k + 4, ...``.
    """
    return (sent - first + stride - 1) // stride, sent - 1 - (sent - 1 - first) % stride


def stride_of(workload: str) -> int:
    """A subscriber gets every ``stride_of``-th message: W1f subscriber ``k`` those with sequence ``k`` modulo 4."""
    return FILTERED_SUBSCRIBERS if workload == "w1f" else 1
