"""The workloads of ``jitrelay bench``, one row each: its name, what it runs, and how it is reported.

Each relay workload has one publisher process and N subscriber processes,
spawned (docs/benchmarks.md describes them and how to read their figures):

- ``w1``, throughput: market_data messages of ``--size`` bytes (one type-1
  record; to ``jitrelay-exec`` execution messages, one type-40 record and
  their checksums), renumbered before each 1 MiB batch, published as fast as
  the relay takes them for ``--duration`` seconds, to each of ``--subscribers``;
- ``w2``, latency: ``--rate`` messages per second, one per send, each
  stamped with its intended send time (its slot on the schedule, on
  ``time.time_ns()``'s clock); every subscriber records receive time
  minus that stamp for every message;
- ``w1f``, W1 filtered (the market_data jitrelay relays): four subscribers, each
  subscribed at the relay to one of four TLV types, set against the
  unfiltered W1 with four subscribers of the same run;
- ``w3``, a subscriber that never reads (jitrelay and raw): W2's latency for
  three subscribers beside it, at 200,000 msg/s in sends of 100;
- ``fanout`` (jitrelay, jitrelay-shm and raw): one message every
  ``--fanout-interval`` ms, timed until the last of ``--fanout-subscribers``
  subscribers has it;
- ``client``, not one run per relay: publish and receive through the
  clients, one call per message, against pyzmq and nats-py (``clients``);
- ``records``, not one run per relay either: Torq trades decoded and
  encoded by the compiled record kernels against ``struct``, and a
  subscriber of typed trade arrays against one of bytes (``records``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jitrelay.tools.bench.clients import client_workload
from jitrelay.tools.bench.messages import FILTERED_SUBSCRIBERS, STUCK_HEALTHY
from jitrelay.tools.bench.options import FILTERING, Options
from jitrelay.tools.bench.records import records_workload
from jitrelay.tools.bench.report import (
    Notes,
    fanout_lines,
    filtered_lines,
    format_client,
    format_records,
    stuck_lines,
)
from jitrelay.tools.bench.runs import run_fanout, run_one

OneRun = Callable[[str, int, Options], dict]  # relay, subscriber count, options -> the run's figures


def _none(opts: Options) -> Sequence[int]:
    return ()


@dataclass(frozen=True)
class Workload:
    """One row of the table: what ``--workloads NAME`` runs and how its figures are reported.

    A relay workload makes one ``run`` per subscriber count (``counts``) and
    relay (those in ``relays``, without policy; None for every relay asked
    for), relays side by side. A workload that is not run per relay
    (``client``, ``records``) is ``alone``: run once, its figures (with an ``errors``
    dict) under its name in the JSON, ``alone_report`` printed after the
    table.
    """

    name: str
    about: str  # its part of ``--workloads``' help
    counts: Callable[[Options], Sequence[int]] = _none
    relays: tuple[str, ...] | None = None
    run: OneRun | None = None
    notes: Notes | None = None  # its lines under the table
    alone: Callable[[Options], dict] | None = None
    alone_report: Callable[[dict], str] | None = None

    def steps(self, opts: Options) -> list[tuple[int, str]]:
        """(subscribers, relay) of each run it makes with ``opts``, in the order they run."""
        return [
            (n, relay)
            for n in self.counts(opts)
            for relay in opts.relays
            if self.relays is None or relay.partition(":")[0] in self.relays
        ]


def _stream(workload: str) -> OneRun:
    """``run_one`` of ``workload``: a stream relay's or zmq's run with the subscribers of ``workers``."""

    def run(relay: str, subscribers: int, opts: Options) -> dict:
        return run_one(relay, workload, subscribers, opts)

    return run


W1 = Workload("w1", "w1 (throughput)", lambda opts: opts.subscribers, run=_stream("w1"))
W2 = Workload("w2", "w2 (latency)", lambda opts: [opts.latency_count], run=_stream("w2"))
W1F = Workload(
    "w1f",
    "w1f (w1 with 4 filtered subscribers)",
    lambda opts: [FILTERED_SUBSCRIBERS],
    relays=FILTERING,  # jitrelay filters (shared memory: in the reader)
    run=_stream("w1f"),
    notes=filtered_lines,
)
W3 = Workload(
    "w3",
    "w3 (latency of 3 subscribers beside one that never reads)",
    lambda opts: [STUCK_HEALTHY],
    relays=("jitrelay", "raw"),  # a stuck stream subscriber
    run=_stream("w3"),
    notes=stuck_lines,
)
FANOUT = Workload(
    "fanout",
    "fanout (time for one message to reach every one of --fanout-subscribers subscribers)",
    lambda opts: opts.fanout_subscribers,
    relays=("jitrelay", "jitrelay-shm", "raw"),  # stream relays whose subscribers a host process polls
    run=run_fanout,
    notes=fanout_lines,
)
CLIENT = Workload(
    "client",
    "client (per-message publish and receive through the clients against pyzmq and nats-py, and W2 through them)",
    alone=client_workload,
    alone_report=format_client,
)

RECORDS = Workload(
    "records",
    "records (Torq trades decoded and encoded by the record kernels against struct, and received as typed arrays "
    "against bytes)",
    alone=records_workload,
    alone_report=format_records,
)

WORKLOADS = (W1, W2, W1F, W3, FANOUT, CLIENT, RECORDS)
NAMES = tuple(w.name for w in WORKLOADS)
REPORTED = (W3, W1F, FANOUT)  # the order of the workloads' own lines under the table


def notes() -> list[Notes]:
    """The workloads' own lines under the table, in the report's order."""
    return [w.notes for w in REPORTED if w.notes is not None]
