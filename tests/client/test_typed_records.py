"""Typed records through real relays: what a publisher writes from columns arrives as the same columns.

Expected bytes come from ``support.record_reference`` (built with ``struct`` from PROTOCOL.md),
never from the client's encoder.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import uvloop
from support import record_reference as ref
from support import torq
from support.commands import no_more, receive, running_relay
from support.relays import RelayProcess

from jitrelay import records
from jitrelay.client import AsyncPublisher, AsyncSubscriber, Publisher, Subscriber

DOMAIN_OF = {1: "market_data", 32: "signal", 106: "system", 107: "system", 108: "system", 110: "system"}
DOMAIN_IDS = {"market_data": 1, "signal": 2, "system": 4}


def domain_of(tlv_type: int) -> str:
    return DOMAIN_OF.get(tlv_type, "market_data" if tlv_type < 20 or tlv_type >= 200 else "signal")


@pytest.fixture(scope="module")
def relays() -> Iterator[dict[str, RelayProcess]]:
    with (
        running_relay("market_data") as market,
        running_relay("signal") as signal,
        running_relay("system") as system,
    ):
        yield {"market_data": market, "signal": signal, "system": system}


def random_records(kind: records.RecordLayout, n: int, seed: int) -> np.ndarray:
    """``n`` records of arbitrary bytes (padding too): the relay and the codecs must carry every byte."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, n * kind.size, dtype=np.uint8).view(kind.dtype)


def take_records(sub: Subscriber, record: str | int, n: int) -> list[records.RecordBatch]:
    found: list[records.RecordBatch] = []
    got = 0
    for batch in sub.record_batches(record):
        found.append(batch)
        got += len(batch)
        if got >= n:
            break
    return found


@pytest.mark.parametrize("tlv_type", sorted(records.LAYOUTS))
def test_every_typed_record_round_trips_through_a_relay(relays: dict[str, RelayProcess], tlv_type: int) -> None:
    kind = records.layout(tlv_type)
    domain = domain_of(tlv_type)
    path = relays[domain].socket_path
    sent = random_records(kind, 5, tlv_type)
    with Subscriber(domain, path) as sub, Publisher(domain, path, source=9, checksum=True) as pub:
        first = pub.publish_records(sent, kind, timestamp_ns=1_000 + np.arange(5, dtype=np.uint64))
        raw = receive(sub, 5 * records.message_size(kind))
        no_more(sub)
    assert first == 0
    assert raw == ref.encode(
        [r.tobytes() for r in sent],
        tlv_type,
        domain=DOMAIN_IDS[domain],
        source=9,
        version=2,
        first_sequence=0,
        timestamps=[1_000 + i for i in range(5)],
        checksums=True,
    )
    got = records.decode(np.frombuffer(raw, dtype=np.uint8), kind)
    assert got.records.tobytes() == sent.tobytes()
    assert got.sequence.tolist() == [0, 1, 2, 3, 4]
    assert got.source.tolist() == [9] * 5


def test_a_million_trades_arrive_as_the_same_array(relays: dict[str, RelayProcess]) -> None:
    n = 1_000_000
    trades = np.zeros(n, dtype=records.layout("trade").dtype)
    trades["asset_id"] = records.symbol_asset_id("BTCUSD")
    trades["price"] = 4_500_000_000_000 + np.arange(n) * 7
    trades["volume"] = np.arange(n) % 1000 + 1
    trades["execution_timestamp_ns"] = torq.T0 + np.arange(n)
    trades["venue_id"] = 101
    trades["side"] = np.arange(n) % 2
    path = relays["market_data"].socket_path
    received: list[records.RecordBatch] = []
    step = 100_000  # a slice at a time, read back before the next: one thread, never a subscriber left behind
    with Subscriber("market_data", path) as sub, Publisher("market_data", path) as pub:
        for start in range(0, n, step):
            part = trades[start : start + step]
            pub.publish_records(part, timestamp_ns=part["execution_timestamp_ns"])
            received += take_records(sub, "trade", len(part))
        no_more(sub)
    got = np.concatenate([batch.records for batch in received])
    np.testing.assert_array_equal(got, trades)
    assert np.concatenate([b.sequence for b in received]).tolist() == list(range(n))
    np.testing.assert_array_equal(np.concatenate([b.timestamp_ns for b in received]), trades["execution_timestamp_ns"])


def test_one_record_from_values_is_a_torq_trade(relays: dict[str, RelayProcess]) -> None:
    path = relays["market_data"].socket_path
    with Subscriber("market_data", path) as sub, Publisher("market_data", path, version=1, source=2) as pub:
        pub.publish_record(
            "Trade",
            asset_id="BTC",
            price="57342.1",
            volume=2_500_000,
            execution_timestamp_ns=torq.T0 - 350_000,
            venue_id="Kraken",
            asset_type="Coin",
            side="sell",
        )
        pub.publish([(7, b"not a trade")])
        pub.publish_record("trade", np.frombuffer(torq.trade_value(), dtype=records.layout(1).dtype)[0])
        trades = [trade for _, trade in zip(range(2), sub.records(1), strict=False)]
        no_more(sub)
    assert [t.tobytes() for t in trades] == [torq.trade_value(), torq.trade_value()]
    assert records.to_decimal(trades[0]["price"]) == records.to_decimal(5_734_210_000_000)


def test_records_of_another_length_are_left_out_and_counted(
    relays: dict[str, RelayProcess], caplog: pytest.LogCaptureFixture
) -> None:
    path = relays["market_data"].socket_path
    with Subscriber("market_data", path) as sub, Publisher("market_data", path) as pub:
        pub.publish([(1, bytes(39)), (1, torq.trade_value())])
        (batch,) = take_records(sub, "trade", 1)
    assert batch.wrong_size == 1 and batch.records.tobytes() == torq.trade_value()
    assert "1 trade record(s) with a length other than 40 bytes left out" in caplog.text


def test_a_batch_as_a_dataframe(relays: dict[str, RelayProcess]) -> None:
    path = relays["market_data"].socket_path
    quotes = random_records(records.layout("quote"), 3, 1)
    with Subscriber("market_data", path) as sub, Publisher("market_data", path, source=4) as pub:
        pub.publish_records(quotes, timestamp_ns=77)
        (batch,) = take_records(sub, "quote", 3)
    frame = batch.to_pandas()
    assert list(frame.columns) == [
        "sequence", "timestamp_ns", "source", "asset_id", "bid_price", "bid_size", "ask_price", "ask_size",
        "quote_timestamp_ns", "venue_id", "asset_type",
    ]  # fmt: skip
    assert frame["bid_price"].tolist() == quotes["bid_price"].tolist()
    assert frame["timestamp_ns"].tolist() == [77, 77, 77] and frame["source"].tolist() == [4, 4, 4]


def test_the_asyncio_clients_publish_and_read_records(relays: dict[str, RelayProcess]) -> None:
    path = relays["signal"].socket_path
    signals = random_records(records.layout("arbitrage_signal"), 70_000, 2)  # more than one encode chunk

    async def run() -> list[bytes]:
        async with AsyncSubscriber("signal", path) as sub, AsyncPublisher("signal", path) as pub:
            publishing = asyncio.create_task(pub.publish_records(signals))
            got: list[bytes] = []
            async for batch in sub.record_batches("ArbitrageSignalTLV"):
                got += [r.tobytes() for r in batch.records]
                if len(got) >= len(signals):
                    break
            await publishing
            await pub.publish_record(32, np.frombuffer(torq.arbitrage_signal_value(), signals.dtype)[0])
            async for one in sub.records(32):
                got.append(one.tobytes())
                break
            return got

    async def bounded() -> list[bytes]:
        return await asyncio.wait_for(run(), 60)

    got = uvloop.run(bounded())
    assert got[:-1] == [r.tobytes() for r in signals] and got[-1] == torq.arbitrage_signal_value()
