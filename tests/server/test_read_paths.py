"""The relay's read paths forward the same bytes: its own epoll set, the event loop's reads, the Python steps.

Real relays on real sockets, one per path (``--read-path``: one compiled call
per wake-up that reads and forwards, one compiled call per read the event loop
makes, or the engine's Python steps around smaller calls), given the same
stream: stretches of valid messages and stretches of every kind of message, cut into reads at random
boundaries (messages split across reads), a control message in the middle of a
read, a ring that wraps more than once, a subscriber that stops reading in the
middle (it falls behind mid-batch, catches up from its cursor while the
other keeps up) and a fault at the end. A third subscriber filters by source,
so that each read is routed to its group too. Every subscriber of every relay
must receive exactly the messages PROTOCOL.md says are forwarded (of its
sources, for the filtered one), byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from support.clients import PROBE_MARK, Clients, mixed_messages, sync
from support.relays import StartRelay

from jitrelay.core import protocol
from jitrelay.core.units import MiB

DOMAIN_IDS = {"market_data": protocol.MARKET_DATA, "execution": protocol.EXECUTION}
SOURCES = frozenset({PROBE_MARK, *range(0, 201, 3)})  # the filtered subscriber's: a third of the stream, and the probes


def reads(rng: random.Random, stream: bytes, control_at: int) -> list[bytes]:
    """``stream`` in pieces of 1 byte to 64 KiB, with a control message at message boundary ``control_at``."""
    data = stream[:control_at] + protocol.publish_only_message() + stream[control_at:]
    pieces, at = [], 0
    while at < len(data):
        n = rng.choice((1, 7, 31, 32, 33, 500, 4096, 65536, rng.randint(1, 65536)))
        pieces.append(data[at : at + n])
        at += n
    return pieces


@pytest.mark.parametrize("domain", ["market_data", "execution"])
def test_every_read_path_forwards_exactly_what_the_protocol_says(
    start_relay: StartRelay, clients: Clients, short_dir: Path, domain: str
) -> None:
    rng = random.Random(11)
    mixed = []
    while sum(len(m) for m, _ in mixed) < 56 * MiB:  # the 16 MiB log wraps more than once
        some = mixed_messages(rng, domain, 2000)
        # Mostly stretches of valid messages (the reads the compiled path takes), some of every kind.
        mixed += some if rng.random() < 0.2 else [(m, ok) for m, ok in some if ok]
    stream = b"".join(m for m, _ in mixed)
    want = b"".join(m for m, forwarded in mixed if forwarded)
    want_filtered = b"".join(m for m, forwarded in mixed if forwarded and m[6] in SOURCES)
    control_at = sum(len(m) for m, _ in mixed[: len(mixed) // 2])
    pieces = reads(rng, stream, control_at)
    # One subscriber stops for about 16 MiB of what is forwarded: more than its socket's buffers hold (about
    # 8 MiB), less than the log and the pending limit (12 MiB) past that.
    stop = len(pieces) // 4
    go = stop + int(len(pieces) * 16 * MiB / len(want))
    for path in ("compiled", "uvloop", "python"):
        options = ["--read-path", path, "--log-size", str(16 * MiB), "--pending-limit", str(12 * MiB)]
        options += ["--summary-file", str(short_dir / f"{path}.json")]
        if domain == "execution":
            options += ["--journal-dir", str(short_dir / path / "audit")]
        relay = start_relay(domain, *options, socket_path=short_dir / f"{path}.sock")
        steady, stopping = clients.reader(relay), clients.reader(relay)
        filtering = clients.connect(relay)
        filtering.sendall(protocol.subscribe_message(sources=SOURCES))
        filtered = clients.reader(relay, filtering)
        publisher = clients.connect(relay)
        sync(publisher, [steady, stopping, filtered], DOMAIN_IDS[domain])
        publisher.settimeout(60)
        for k, piece in enumerate(pieces):
            if k == stop:
                stopping.pause()
            elif k == go:
                stopping.resume()
            publisher.sendall(piece)
        publisher.sendall(b"\x00" * 40)  # bad magic: the relay closes this publisher, and only it
        for reader in (steady, stopping):
            assert reader.wait_received(len(want), 60), f"{path}: {reader.received} of {len(want)} bytes"
            assert bytes(reader.data) == want, f"{path}: the stream differs from what the protocol forwards"
        assert filtered.wait_received(len(want_filtered), 60), f"{path}: {filtered.received} of {len(want_filtered)}"
        assert bytes(filtered.data) == want_filtered, f"{path}: the filtered stream differs"
        relay.wait_line("closing connection", "bad_magic")
        assert relay.find_line("disconnecting") is None, f"{path}: a subscriber was cut off"
        relay.stop()
        figures = json.loads((short_dir / f"{path}.json").read_text())
        assert figures["fell_behind"] >= 1, f"{path}: the stopped subscriber never fell behind"
        # The relay reads for itself on the compiled path only, the execution relay's journal taking each read first.
        polled = figures["reads_polled"]
        assert polled > 0 if path == "compiled" else polled == 0, f"{path}: {polled}"
