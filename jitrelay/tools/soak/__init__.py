"""``jitrelay soak``: run a relay under load and faults for a while, and check every message it delivers.

The soak starts a relay (``python -m jitrelay run DOMAIN``) and client
processes that connect, publish, subscribe, stall and get killed with SIGKILL
at random, and replaces every client it kills. It answers three questions:

- did any subscriber receive a message that is not exactly what a publisher
  sent (CRC-32), miss or repeat one (per-stream sequence with no gap), or
  receive one its subscription did not ask for?
- did the relay lose anything for subscribers that stayed connected (a
  subscriber attached before any publisher must verify exactly as many
  messages as the relay says it forwarded)?
- does its resident memory stay flat once warm?

Streams. Each publisher process is a new stream, and its sequence numbers
run from 0. Its key is 16 bits written in the header's ``source`` (low byte)
and ``flags`` (high byte): the source byte is its publisher slot's (slot 0
starts on source 1, slot 1 on source 2, ...), so the publishers running at
any one time have distinct sources and a subscription by source selects whole
publishers; the flags byte counts the starts on that source, so a replacement
never continues an old stream. A subscriber checks for every key that each
message is the previous one plus 1. Keys are not reused: a source moves to a
free byte after 256 starts, which bounds a run to 65,280 publisher starts.
Source 0 is the soak's own traffic: the controller's attach probes and the
subscription beacons and echoes below.

Subscriptions. A ``--filtered`` share of the subscribers (never the witness)
subscribes at connect to a random subset of the publishers' sources, and any
subscriber but the witness changes its subscription now and then (another
subset, or everything again). A change takes effect once the relay has read
it, so for a while only ``old | new`` is checked; the switch window closes at
the first message only the new set allows or at the subscriber's echo,
whichever comes first. The echo makes narrowing changes checkable (from
everything, no message is ever allowed by the new set only): right behind its
control message the subscriber sends a beacon on the same connection, and the
controller's echo connection answers every beacon it receives. The relay
reads that echo only after it has finished with the beacon, and so with the
control message before it: the echo, and whatever reaches the subscriber
after it, was forwarded under the new subscription.

Faults. Publishers write their stream cut at random byte offsets, so the relay
nearly always holds part of a message from each of them; killing one leaves a
torn message the relay must discard (it logs "closed mid-message"). A stalling
subscriber stops reading for 0.1 s to ``--stall-max`` seconds; under the
``disconnect`` policy a long enough stall gets it dropped, under ``block``
(execution) every stall ends and the publishers simply wait. One subscriber,
the witness, never stalls and is never killed, so every run has one complete
stream to count.

Shared memory. A ``--shm`` share of the subscribers (never the witness) reads
the relay's log from shared memory (``MappedFeed``) and is checked by the same
verifier; a lap is a gap for a positioned one and a cut-off for the others,
each matched against the relay's figures.

Clients are forked from a ``multiprocessing`` forkserver that has the workers
loaded, so churning costs milliseconds, not an interpreter start. They report
through shared counters (a ``Counters`` structure each), which stay readable
after a SIGKILL, and write failure details to one file each in the run folder.

The modules, one job each: ``options`` (the settings and their command line),
``command`` (``add_arguments``, ``run``), ``controller`` (the run: relay,
clients, churn, memory), ``workers`` (the publisher and subscriber
processes), ``verify`` (the checks on a received stream and its gaps; pure),
``counters`` (what clients and the controller share), ``relay`` (the relay's
options, the echo connection) and ``report`` (figures to JSON and text; pure).
"""

from __future__ import annotations

from jitrelay.tools.soak.command import add_arguments, run
from jitrelay.tools.soak.controller import Soak
from jitrelay.tools.soak.counters import (
    BY_ECHO,
    BY_MESSAGE,
    CLOSED_BY_RELAY,
    ENDED,
    ENDING,
    FAILURE_SLOTS,
    FILTERED_VERIFIED,
    GAP_MESSAGES,
    GAP_NOTICES,
    MARKERS,
    POSITION_FAILURES,
    PROBES,
    PUBLISHED,
    RUNNING,
    SHM_CUT_OFF,
    SHM_GRANTED,
    SHM_LAPS,
    STALLS,
    STATE,
    STATS_LEN,
    STOPPING,
    STREAMS,
    SUBSCRIBED,
    TAIL,
    VERIFIED,
    Counters,
)
from jitrelay.tools.soak.options import SoakOptions
from jitrelay.tools.soak.relay import Echo, SoakError
from jitrelay.tools.soak.report import format_report, relay_summary
from jitrelay.tools.soak.verify import ECHO_FLAGS, StreamVerifier
from jitrelay.tools.soak.workers import ClientConfig, SubscriberRole, pick_sources, run_publisher, run_subscriber

run_soak = run  # the name the command had

__all__ = [
    "BY_ECHO",
    "BY_MESSAGE",
    "CLOSED_BY_RELAY",
    "ECHO_FLAGS",
    "ENDED",
    "ENDING",
    "FAILURE_SLOTS",
    "FILTERED_VERIFIED",
    "GAP_MESSAGES",
    "GAP_NOTICES",
    "MARKERS",
    "POSITION_FAILURES",
    "PROBES",
    "PUBLISHED",
    "RUNNING",
    "SHM_CUT_OFF",
    "SHM_GRANTED",
    "SHM_LAPS",
    "STALLS",
    "STATE",
    "STATS_LEN",
    "STOPPING",
    "STREAMS",
    "SUBSCRIBED",
    "TAIL",
    "VERIFIED",
    "ClientConfig",
    "Counters",
    "Echo",
    "Soak",
    "SoakError",
    "SoakOptions",
    "StreamVerifier",
    "SubscriberRole",
    "add_arguments",
    "format_report",
    "pick_sources",
    "relay_summary",
    "run",
    "run_publisher",
    "run_soak",
    "run_subscriber",
]
