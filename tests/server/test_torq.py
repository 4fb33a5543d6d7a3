"""Torq's services switched to jitrelay: messages built as Torq builds them, through real relay processes.

The messages come from ``support.torq``, written from Torq's own field layouts
and builder rules, never from jitrelay's encoder. Each publisher here behaves as
a Torq service does: it connects, writes, and never reads its socket.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import pytest
from support import torq
from support.peers import WAIT, Peer, marker
from support.relays import StartRelay

from jitrelay.core import protocol as p
from jitrelay.testing.relay import RelayProcess

DOMAINS = ("market_data", "signal", "execution", "system")


def fence(domain: str, sequence: int) -> bytes:
    """A marker the relay of ``domain`` forwards: checksummed, in that domain, so it passes every policy."""
    return marker(sequence, domain=p.DOMAIN_IDS[domain])


def start_counted(start_relay: StartRelay, tmp_path: Path, domain: str, *options: str) -> RelayProcess:
    """A relay that writes its final figures to ``tmp_path``, read back by ``final_verdicts``."""
    return start_relay(domain, *options, "--summary-file", str(tmp_path / "figures.json"))


def final_verdicts(relay: RelayProcess, tmp_path: Path) -> dict[str, int]:
    """Stop the relay and read how many messages got each verdict."""
    assert relay.stop() == 0
    return json.loads((tmp_path / "figures.json").read_text())["verdicts"]


def publish_as_torq(relay: RelayProcess, data: bytes) -> socket.socket:
    """A connection that writes ``data`` and never reads, as Torq's publishers do; the caller closes it."""
    sock = relay.connect(WAIT)
    sock.sendall(data)
    return sock


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_torq_built_message_goes_through_its_relay_byte_for_byte(start_relay: StartRelay, domain: str) -> None:
    """The fixture set, for each relay: Torq's direct path (checksum 0), its checksummed builder, extended
    records, vendor records, a header-only message and the identification header a Torq service writes on
    connect."""
    relay = start_relay(domain)
    sent = [raw for _, (where, raw) in torq.FIXTURES.items() if where == domain]
    assert sent
    subscriber = Peer(relay)
    end = fence(domain, 1)
    with publish_as_torq(relay, b"".join(sent) + end):
        assert subscriber.wait_for(end) == sent
    subscriber.close()


def test_the_whole_fixture_set_is_forwarded() -> None:
    """Every fixture names a relay the test above starts (so none is silently left out)."""
    assert {where for where, _ in torq.FIXTURES.values()} == set(DOMAINS)
    assert len(torq.FIXTURES) >= 9 + len(torq.SYSTEM_TLVS)


@pytest.mark.parametrize("domain", DOMAINS)
def test_torq_system_records_sent_by_a_subscriber_change_nothing_for_it(
    start_relay: StartRelay, tmp_path: Path, domain: str
) -> None:
    """Torq's system records 100..112 (heartbeat, snapshot, config update, service discovery, recovery ...) are
    data, never jitrelay's control records: a subscriber that sends them keeps receiving everything, from
    where it was, and the system relay forwards them to the others."""
    relay = start_counted(start_relay, tmp_path, domain)
    sender = Peer(relay)
    witness = Peer(relay)
    probe = fence(domain, 0)  # from a connection the relay accepts after both: each has it once both are in
    with publish_as_torq(relay, probe):
        sender.wait_for(probe)
        witness.wait_for(probe)
    system_messages = [torq.system_tlv(t) for t in torq.SYSTEM_TLVS]
    first = fence(domain, 1)
    sender.send(b"".join(system_messages) + first)
    forwarded = witness.wait_for(first)
    assert forwarded == (system_messages if domain == "system" else [])

    # The sender is still an ordinary subscriber of the whole domain: not publish-only, not resumed, not mapped.
    data = [raw for where, raw in torq.FIXTURES.values() if where == domain]
    second = fence(domain, 2)
    with publish_as_torq(relay, b"".join(data) + second):
        assert sender.wait_for(second) == data
        assert witness.wait_for(second) == data
    assert sender.messages == [] and witness.messages == []
    sender.close()
    witness.close()
    verdicts = final_verdicts(relay, tmp_path)
    assert verdicts["control"] == 0
    assert verdicts["wrong_domain"] == (0 if domain == "system" else len(system_messages))


def test_a_relay_takes_torq_libs_types_domain_numbering_when_told(start_relay: StartRelay) -> None:
    """Producers built on Torq's newer 0-based enum write market data as domain 0: ``--domain-id 0`` takes them."""
    _, zero_based = torq.OUT_OF_CONTRACT["trade_direct_libs_types_enums"]
    assert zero_based[4] == 0
    relay = start_relay("market_data", "--domain-id", "0")
    subscriber = Peer(relay)
    end = torq.build_direct(0, 1, 1, torq.trade_value(), sequence=7, timestamp_ns=torq.T0)
    with publish_as_torq(relay, zero_based + end):
        assert subscriber.wait_for(end) == [zero_based]
    subscriber.close()


@pytest.mark.parametrize(
    ("domain", "zero", "wrong"),
    [
        ("market_data", "forward", "forward"),
        ("signal", "forward", "bad_checksum"),
        ("execution", "bad_checksum", "bad_checksum"),
        ("system", "forward", "bad_checksum"),
    ],
)
def test_checksum_policies_on_a_live_relay(
    start_relay: StartRelay, tmp_path: Path, domain: str, zero: str, wrong: str
) -> None:
    """Zero means "not computed" where the policy allows it; a wrong checksum is rejected where it is verified."""
    relay = start_counted(start_relay, tmp_path, domain)
    subscriber = Peer(relay)
    tlv_type = p.DOMAIN_TLV_RANGES[p.DOMAIN_IDS[domain]][0][0]
    good = torq.build_checksummed(p.DOMAIN_IDS[domain], 1, [(tlv_type, b"torq")], sequence=5, timestamp_ns=torq.T0)
    right = struct.unpack_from("<I", good, 28)[0]
    with_zero = good[:28] + bytes(4) + good[32:]
    with_wrong = good[:28] + struct.pack("<I", right ^ 0x5A5A) + good[32:]
    end = fence(domain, 3)
    with publish_as_torq(relay, with_zero + with_wrong + good + end):
        received = subscriber.wait_for(end)
    expected = [m for m, verdict in ((with_zero, zero), (with_wrong, wrong)) if verdict == "forward"] + [good]
    assert received == expected
    subscriber.close()
    assert final_verdicts(relay, tmp_path)["bad_checksum"] == [zero, wrong].count("bad_checksum")


@pytest.mark.parametrize("versions", ["1", "2", "1,2"])
def test_accepted_versions_are_a_relay_setting(start_relay: StartRelay, tmp_path: Path, versions: str) -> None:
    relay = start_counted(start_relay, tmp_path, "market_data", "--versions", versions)
    subscriber = Peer(relay)
    by_version = {
        v: torq.build_direct(1, 1, 1, torq.trade_value(), sequence=v, timestamp_ns=torq.T0) for v in (1, 2, 3)
    }
    by_version = {v: raw[:5] + bytes((v,)) + raw[6:] for v, raw in by_version.items()}  # checksum 0: not verified
    accepted = [int(v) for v in versions.split(",")]
    end = by_version[accepted[0]][:8] + struct.pack("<Q", 99) + by_version[accepted[0]][16:]
    with publish_as_torq(relay, by_version[1] + by_version[2] + by_version[3] + end):
        assert subscriber.wait_for(end) == [by_version[v] for v in (1, 2) if v in accepted]
    subscriber.close()
    assert final_verdicts(relay, tmp_path)["bad_version"] == 3 - len(accepted)
