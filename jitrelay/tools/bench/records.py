"""``jitrelay bench --workloads records``: Torq's trades as numpy columns, against ``struct`` one message at a time.

The messages are Torq trades: a 32-byte header, a 2-byte record head and a
40-byte ``TradeTLV`` (74 bytes), with a random-walk price. In one run:

- **decode**, records per second: ``records.decode(batch, "trade")`` of a
  1 MiB batch of trade messages, as the strided view of a uniform batch
  (``view``, the default) and copied into a contiguous array
  (``copy=True``), against a Python loop over the same bytes that reads
  each message with ``struct.unpack_from`` (its header's sequence,
  timestamp and payload size; the record head; the 40-byte record) and
  collects the tuples;
- **encode**, records per second: ``records.encode`` of a structured array of
  as many trades into a preallocated buffer (as ``Publisher.publish_records``
  does), against ``struct.pack_into`` of each whole message into a
  preallocated bytearray from a list of tuples built beforehand; both write
  the same bytes (checked);
- **end to end**, messages per second: a relay (``--slow-policy block``, so
  the subscriber is the bottleneck) fed 1 MiB batches of trades as fast as it
  takes them, received by one ``Subscriber`` reading ``record_batches("trade")``
  and summing each batch's price column, then, in a second run, by one
  reading ``batches()`` and counting messages; the two alternate, twice each,
  and each one's best run is its figure.

The in-process figures are the best call over rounds that alternate the
kernel and its baseline, so a disturbance on a shared machine weighs on
both; the ratios are what to read.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from jitrelay import records
from jitrelay.core import protocol
from jitrelay.core.protocol import MARKET_DATA, SEQUENCE_FIELD
from jitrelay.tools.bench.clients import SENTINEL, client_run, first_is_probe, send_batches
from jitrelay.tools.bench.messages import BATCH_BYTES
from jitrelay.tools.bench.options import Options
from jitrelay.tools.bench.relays import STARTUP_SECONDS, BenchError, jitrelay_run

TRADE = records.layout("trade")
SIZE = records.message_size(TRADE)  # 74
BATCH_RECORDS = BATCH_BYTES // SIZE  # trades in one 1 MiB batch
SEED = 20240910
END_TO_END_ROUNDS = 2  # runs of each subscriber, alternating; the best of each is its figure
START_NS = 1_725_960_000_000_000_000  # 2024-09-10T09:20:00Z: when the trades of a batch begin

_HEAD = struct.Struct("<8xQQI4x")  # a header's sequence, timestamp and payload size
_RECORD_HEAD = struct.Struct("<BB")  # a standard record's type and length
_TRADE = struct.Struct("<QqqQHBBB3x")  # TradeTLV's fields, its padding skipped
_MESSAGE = struct.Struct("<IBBBBQQIIBB" + _TRADE.format[1:])  # one trade message, header to padding
_FIELDS = [name for name in TRADE.dtype.names or () if not name.startswith("_")]


def trades(count: int, seed: int = SEED) -> np.ndarray:
    """``count`` BTC trades on Kraken: a random-walk price about 57,000 with 8 decimals, sizes, sides, times."""
    rng = np.random.default_rng(seed)
    out = np.zeros(count, dtype=TRADE.dtype)
    steps = rng.normal(0.0, 2e-4, count)  # relative moves: about 2 basis points a trade
    price = 57_000.0 * np.exp(np.cumsum(steps))
    out["asset_id"] = records.symbol_asset_id("BTC")
    out["price"] = np.round(price * records.SCALE, -3).astype(np.int64)  # to 0.00001, as Kraken quotes
    out["volume"] = (rng.exponential(0.05, count) * records.SCALE).astype(np.int64) + 1
    gaps = rng.exponential(2e5, count).astype(np.uint64)  # about 5,000 trades a second
    out["execution_timestamp_ns"] = np.uint64(START_NS) + np.cumsum(gaps)
    out["venue_id"] = records.venue_id("Kraken")
    out["asset_type"] = records.asset_type_id("Coin")
    out["side"] = rng.integers(0, 2, count)
    return out


def trade_batch(count: int = BATCH_RECORDS, first_sequence: int = 0) -> np.ndarray:
    """``count`` trade messages back to back, each header stamped 50 us after its trade happened."""
    found = trades(count)
    stamps = found["execution_timestamp_ns"].astype(np.int64) + 50_000
    return records.encode(found, domain=MARKET_DATA, first_sequence=first_sequence, timestamp_ns=stamps)


def struct_decode(data: bytes) -> list[tuple]:
    """The decode baseline: every trade of ``data`` as a tuple (sequence, timestamp, then its fields), by ``struct``."""
    head, record_head, trade = _HEAD.unpack_from, _RECORD_HEAD.unpack_from, _TRADE.unpack_from
    tlv_type, length = TRADE.tlv_type, TRADE.size
    found: list[tuple] = []
    append = found.append
    offset, end = 0, len(data)
    while offset + protocol.HEADER_SIZE <= end:
        sequence, stamp, payload = head(data, offset)
        body = offset + protocol.HEADER_SIZE
        if record_head(data, body) == (tlv_type, length):
            append((sequence, stamp, *trade(data, body + 2)))
        offset = body + payload
    return found


def struct_encode(rows: list[tuple], out: bytearray, first_sequence: int, stamp: int) -> int:
    """The encode baseline: one ``pack_into`` of a whole trade message per row of ``rows``; the bytes written."""
    pack_into = _MESSAGE.pack_into
    payload = SIZE - protocol.HEADER_SIZE
    head = (protocol.MAGIC, MARKET_DATA, protocol.VERSION, 0, 0)
    record = (0, TRADE.tlv_type, TRADE.size)
    offset = 0
    for k, row in enumerate(rows, first_sequence):
        pack_into(out, offset, *head, k, stamp, payload, *record, *row)
        offset += SIZE
    return offset


def _best_of(calls: dict[str, Callable[[], object]], seconds: float, rounds: int = 3) -> dict[str, float]:
    """Seconds per call of each, the best over at least ``rounds`` rounds and ``seconds``, the calls alternating."""
    best = dict.fromkeys(calls, float("inf"))
    deadline = time.perf_counter() + seconds
    done = 0
    while done < rounds or time.perf_counter() < deadline:
        for name, call in calls.items():
            began = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - began)
        done += 1
    return best


def decode_figures(seconds: float) -> dict:
    """Records per second of each decode of one 1 MiB batch, the struct loop's among them, and the ratios.

    Raises ``BenchError`` when the kernel and the baseline do not find the same trades.
    """
    batch = trade_batch()
    data = batch.tobytes()
    view, copied, rows = records.decode(batch, TRADE), records.decode(batch, TRADE, copy=True), struct_decode(data)
    if view.records.strides != (SIZE,) or copied.records.strides != (TRADE.size,):
        raise BenchError("a uniform batch of trades did not decode as a strided view, or its copy was not contiguous")
    prices = [row[3] for row in rows]
    if len(rows) != BATCH_RECORDS or not prices == view.records["price"].tolist() == copied.records["price"].tolist():
        raise BenchError("records.decode and the struct loop found different trades")
    best = _best_of(
        {
            "view": lambda: records.decode(batch, TRADE),
            "copy": lambda: records.decode(batch, TRADE, copy=True),
            "struct": lambda: struct_decode(data),
        },
        seconds,
    )
    rates = {name: BATCH_RECORDS / s for name, s in best.items()}
    return {
        "decode_records_per_s": rates,
        "decode_us_per_batch": {name: s * 1e6 for name, s in best.items()},
        "decode_x_struct": {name: rates[name] / rates["struct"] for name in ("view", "copy")},
    }


def encode_figures(seconds: float) -> dict:
    """Records per second of ``records.encode`` of a batch's worth of trades and of the struct loop, and the ratio.

    Raises ``BenchError`` when the two do not write the same bytes.
    """
    found = trades(BATCH_RECORDS)
    rows = found[_FIELDS].tolist()  # the baseline's input, as a Python program would hold it
    out = np.empty(BATCH_RECORDS * SIZE, dtype=np.uint8)
    packed = bytearray(len(out))
    stamp = START_NS

    def encode() -> np.ndarray:
        return records.encode(found, domain=MARKET_DATA, first_sequence=7, timestamp_ns=stamp, out=out)

    if encode().tobytes() != bytes(packed[: struct_encode(rows, packed, 7, stamp)]):
        raise BenchError("records.encode and the struct loop wrote different bytes")
    best = _best_of({"kernel": encode, "struct": lambda: struct_encode(rows, packed, 7, stamp)}, seconds)
    rates = {name: BATCH_RECORDS / s for name, s in best.items()}
    return {"encode_records_per_s": rates, "encode_x_struct": rates["kernel"] / rates["struct"]}


# The end-to-end runs' processes: a publisher of trade batches, and the two subscribers set against each other.


def pub_trades(who: str, reports: Any, path: str, size: int, duration: float, start: Any) -> dict:
    """1 MiB batches of trades, renumbered before each send, as fast as the relay takes them; then the sentinel."""
    assert size == SIZE
    sentinel = protocol.build_message(MARKET_DATA, [(TRADE.tlv_type, trades(1).tobytes())], sequence=SENTINEL)
    return send_batches(who, reports, path, trade_batch(), SIZE, duration, start, sentinel)


def sub_records(who: str, reports: Any, path: str, size: int) -> dict:
    """``record_batches("trade")``, each batch's price column summed, until the sentinel; the rate after the first."""
    from jitrelay.client import Subscriber

    with Subscriber("market_data", path) as sub:
        reports.put(("connected", who, None))
        first_is_probe(sub.recv_batch(STARTUP_SECONDS), size)
        reports.put(("ready", who, None))
        received = timed = 0
        first = 0.0
        total = 0
        for found in sub.record_batches(TRADE):
            total += int(found.records["price"].sum())
            count = len(found)
            last = bool(found.sequence[-1] == SENTINEL)
            count -= int(last)
            if received:
                timed += count
            else:
                first = time.perf_counter()
            received += count
            if last:
                break
        return {"received": received, "timed": timed, "span_s": time.perf_counter() - first, "price_sum": total}


def sub_bytes(who: str, reports: Any, path: str, size: int) -> dict:
    """``batches()``, each batch's messages counted, until the sentinel; the rate after the first batch."""
    from jitrelay.client import Subscriber

    with Subscriber("market_data", path) as sub:
        reports.put(("connected", who, None))
        first_is_probe(sub.recv_batch(STARTUP_SECONDS), size)
        reports.put(("ready", who, None))
        received = timed = 0
        first = 0.0
        for batch in sub.batches():
            count = len(batch) // size
            last = SEQUENCE_FIELD.unpack_from(batch.data, len(batch) - size + protocol.OFF_SEQUENCE)[0] == SENTINEL
            count -= int(last)
            if received:
                timed += count
            else:
                first = time.perf_counter()
            received += count
            if last:
                break
        return {"received": received, "timed": timed, "span_s": time.perf_counter() - first}


def end_to_end(opts: Options, errors: dict[str, str]) -> dict:
    """The two subscribers' runs, alternating ``END_TO_END_ROUNDS`` times, each fed by ``pub_trades`` through its
    own relay; each one's best rate, and the ratio of the bests."""
    folder = tempfile.mkdtemp(prefix="jitrelay-bench-records-")
    path = os.path.join(folder, "relay.sock")
    relay = [*jitrelay_run(path), "--slow-policy", "block"]
    runs: dict[str, list[dict]] = {"bytes": [], "records": []}
    try:
        for _ in range(END_TO_END_ROUNDS):
            for key, subscriber in (("bytes", sub_bytes), ("records", sub_records)):
                try:
                    publisher = (pub_trades, path, SIZE, opts.duration)
                    runs[key].append(client_run(key, publisher, [(subscriber, path, SIZE)], relay, folder))
                except BenchError as exc:
                    errors[f"end to end {key}"] = str(exc)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    def rate(run: dict) -> float | None:
        sub = run["subscribers"][0]
        return sub["timed"] / sub["span_s"] if sub["timed"] and sub["span_s"] > 0 else None

    each = {key: [rate(run) for run in done] for key, done in runs.items()}
    rates = {key: max((r for r in found if r), default=None) for key, found in each.items()}
    lost = {
        key: sum(run["publisher"]["sent"] - run["subscribers"][0]["received"] for run in done)
        for key, done in runs.items()
    }
    bytes_rate, records_rate = rates["bytes"], rates["records"]
    return {
        "end_to_end_msg_per_s": rates,
        "end_to_end_runs_msg_per_s": each,
        "end_to_end_records_x_bytes": records_rate / bytes_rate if records_rate and bytes_rate else None,
        "lost": lost,
        "runs": runs,
    }


def records_workload(opts: Options) -> dict:
    """Every figure of the ``records`` workload: decode and encode in this process, then the two relay runs."""
    seconds = min(max(opts.duration / 2, 0.2), 2.0)  # per in-process comparison
    errors: dict[str, str] = {}
    figures: dict[str, Any] = {"message_size": SIZE, "batch_records": BATCH_RECORDS, "in_process_s": seconds}
    for name, measure in (("decode", decode_figures), ("encode", encode_figures)):
        try:
            figures.update(measure(seconds))
        except BenchError as exc:
            errors[name] = str(exc)
    figures.update(end_to_end(opts, errors))
    figures["errors"] = errors
    return figures
