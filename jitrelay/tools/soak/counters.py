"""What soak clients and the controller share: the run's phase, and each client's counters by name.

Each client process counts into one ``Counters`` structure in shared memory
(``multiprocessing``'s ``RawValue``), which the controller keeps reading after
a SIGKILL. The controller's phase and the publishers' sources are the shared
``ctrl`` array: ``ctrl[0]`` is the phase, ``ctrl[1:]`` each publisher slot's
source byte.

Code that keeps counters in a plain sequence of ints (the tests run client
roles in threads with lists) reaches them through ``named``: the slot of a
counter is its field's place in ``Counters``.
"""

from __future__ import annotations

import ctypes
from collections.abc import MutableSequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

# The controller's phase, in ``ctrl[0]``.
RUNNING, ENDING, STOPPING = 0, 1, 2
# Client states.
STARTING, CONNECTED, CLOSED_BY_RELAY, ENDED, ERROR = range(5)
STATE_NAMES = ("starting", "connected", "closed_by_relay", "ended", "error")
# The stream failures a subscriber counts, each under a counter of its name.
FAILURE_KINDS = ("crc", "sequence", "head", "framing", "subscription")


class Counters(ctypes.Structure):
    """One client's counters: a publisher's, or a subscriber's and its verifier's figures."""

    verified: int
    crc: int
    sequence: int
    head: int
    framing: int
    probes: int
    state: int
    stalls: int
    stall_ms: int
    tail: int  # bytes of an unfinished message at the end
    streams: int
    published: int
    subscription: int
    # A subscriber's subscriptions.
    filtered_verified: int
    subscribed: int
    changes: int
    unsubscribes: int
    markers: int
    by_message: int
    by_echo: int
    # A positioned one: notices read, position failures, gap notices and the messages they say were missed,
    # the positions it recorded, and (resuming) the messages the relay sent before its first notice, set aside.
    notices: int
    position_failures: int
    gap_notices: int
    gap_messages: int
    recorded: int
    before_notice: int
    skipped_ahead: int  # streams that went on further ahead after a subscription change (restarted at the head)
    # A shared-memory reader: granted the mapped log (1), laps that became gaps, the lap that cut it off (1).
    shm_granted: int
    shm_laps: int
    shm_cut_off: int


COUNTER_NAMES = tuple(Counters.__annotations__)
Counters._fields_ = [(name, ctypes.c_int64) for name in COUNTER_NAMES]
SLOTS = {name: slot for slot, name in enumerate(COUNTER_NAMES)}
STATS_LEN = len(COUNTER_NAMES)
FAILURE_SLOTS = {kind: SLOTS[kind] for kind in FAILURE_KINDS}
# Slots, for counters kept in a sequence.
VERIFIED, PROBES, STATE, STALLS, TAIL = (SLOTS[n] for n in ("verified", "probes", "state", "stalls", "tail"))
STREAMS, PUBLISHED, FRAMING = (SLOTS[n] for n in ("streams", "published", "framing"))
FILTERED_VERIFIED, SUBSCRIBED, CHANGES = (SLOTS[n] for n in ("filtered_verified", "subscribed", "changes"))
MARKERS, BY_MESSAGE, BY_ECHO = (SLOTS[n] for n in ("markers", "by_message", "by_echo"))
POSITION_FAILURES, GAP_NOTICES, GAP_MESSAGES = (SLOTS[n] for n in ("position_failures", "gap_notices", "gap_messages"))
SHM_GRANTED, SHM_LAPS, SHM_CUT_OFF = (SLOTS[n] for n in ("shm_granted", "shm_laps", "shm_cut_off"))


class _SlotCounters:
    """``Counters`` by name over a sequence of ints, each counter at its field's slot."""

    _slots: MutableSequence[int]

    def __init__(self, slots: MutableSequence[int]):
        object.__setattr__(self, "_slots", slots)

    def __getattr__(self, name: str) -> int:
        try:
            return self._slots[SLOTS[name]]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: int) -> None:
        self._slots[SLOTS[name]] = value


def named(stats: Counters | MutableSequence[int]) -> Counters:
    """``stats`` as ``Counters``: itself, or a sequence of ``STATS_LEN`` ints seen by name.

    Raises ``ValueError`` for a sequence of another length.
    """
    if isinstance(stats, Counters):
        return stats
    if len(stats) != STATS_LEN:
        raise ValueError(f"a client's counters are {STATS_LEN} ints, not {len(stats)}")
    return cast(Counters, _SlotCounters(stats))


def failures(stats: Counters, extra: tuple[str, ...] = ()) -> int:
    """The stream failures ``stats`` counts, and the ``extra`` counters named; raises nothing."""
    return sum(getattr(stats, name) for name in (*FAILURE_KINDS, *extra))


@dataclass(kw_only=True)
class Client:
    """One client process of the run, what it was started as, and what became of it."""

    kind: str  # "pub" or "sub"
    index: int
    proc: Any
    stats: Counters
    detail_path: Path
    key: int = -1  # publisher's stream key
    slot: int = -1  # publisher's slot: its source byte is the slot's
    from_start: bool = False
    witness: bool = False
    filtered: bool = False  # subscribed at connect
    positioned: bool = False  # asks for positions: recorded in ``state_path``, resumed from when killed
    resumed: bool = False  # started from the position a killed one recorded
    state_path: Path | None = None
    gaps_path: Path | None = None
    killed: bool = False
    replaced: bool = False
    hung: bool = False
    shm: bool = False  # reads the log from shared memory

    @property
    def state(self) -> str:
        """Its state's name, from its counters."""
        return STATE_NAMES[self.stats.state]

    @property
    def pid(self) -> int:
        """Its process id, known once started."""
        return int(self.proc.pid)
