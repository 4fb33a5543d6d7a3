"""The pure decisions behind retention, health and sd_notify, checked without a relay."""

from __future__ import annotations

from pathlib import Path

import pytest

from jitrelay.server.health import verdict
from jitrelay.server.notify import notify_address, watchdog_seconds
from jitrelay.server.retention import SegmentFile, expired


def segments(*specs: tuple[int, float]) -> list[SegmentFile]:
    return [
        SegmentFile(Path(f"/j/execution-{i + 1:06d}.journal"), size, mtime) for i, (size, mtime) in enumerate(specs)
    ]


def test_size_deletes_the_oldest_until_the_closed_segments_fit_and_never_the_current() -> None:
    found = segments((100, 0), (100, 0), (100, 0), (500, 0))
    chosen = expired(found, found[-1].path, keep_bytes=150, keep_seconds=None, now=10)
    assert [s.path.name for s, _ in chosen] == ["execution-000001.journal", "execution-000002.journal"]
    assert chosen[0][1] == "the closed segments hold 300 bytes, more than the 150 it keeps"
    assert expired(found[-1:], found[-1].path, keep_bytes=1, keep_seconds=None, now=10) == []


def test_age_deletes_a_prefix_only_and_never_the_current() -> None:
    found = segments((10, 0), (10, 95), (10, 0), (10, 0))  # the third is old but follows a young one: kept
    chosen = expired(found, found[-1].path, keep_bytes=None, keep_seconds=10, now=100)
    assert [(s.path.name, why) for s, why in chosen] == [
        ("execution-000001.journal", "last written 100 s ago, longer than the 10 s it keeps")
    ]
    assert expired(found, found[0].path, keep_bytes=None, keep_seconds=10, now=100) == []


@pytest.mark.parametrize(
    ("now", "failure", "expected"),
    [
        (101.0, None, (True, "ok")),
        (103.5, None, (False, "unhealthy: the event loop last turned 3.5 s ago (limit 2 s)")),
        (101.0, "disk full", (False, "unhealthy: the journal cannot write: disk full")),
    ],
)
def test_verdict(now: float, failure: str | None, expected: tuple[bool, str]) -> None:
    assert verdict(now, 100.0, 2.0, failure) == expected


def test_notify_addresses_and_watchdog() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@sd-notify") == b"\0sd-notify"
    assert notify_address("vsock:2:1234") is None and notify_address("") is None
    assert watchdog_seconds({"WATCHDOG_USEC": "10000000"}, 7) == 10.0
    assert watchdog_seconds({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "7"}, 7) == 10.0
    assert watchdog_seconds({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_seconds({"WATCHDOG_USEC": "0"}, 7) is None and watchdog_seconds({}, 7) is None


def test_a_replay_skips_a_segment_deleted_under_it_and_names_the_exact_gap(tmp_path: Path) -> None:
    from jitrelay.core import protocol
    from jitrelay.server.journal import Journal, find_replay

    epoch = 0xABC
    batches = [protocol.build_message(3, [(40, bytes([i]) * 60)], sequence=i) for i in range(4)]
    size = len(batches[0])
    with Journal(tmp_path, "execution", rotate_bytes=size) as journal:  # one message a segment
        for i, message in enumerate(batches):
            journal.append([message], at=(epoch, 1000 + i * size, 50 + i))
    replay = find_replay(tmp_path, "execution", epoch, 1000, 50)
    assert replay is not None and replay.take_gap() is None
    first = replay.next_chunk(epoch + 1, 0)
    assert first == batches[0]
    replay.advance(first)
    (tmp_path / "execution-000002.journal").unlink()
    (tmp_path / "execution-000003.journal").unlink()
    assert replay.next_chunk(epoch + 1, 0) == batches[3]
    assert replay.take_gap() == protocol.Gap(protocol.GAP_LEFT_LOG, 2, 2 * size)
    assert (replay.offset, replay.message) == (1000 + 3 * size, 53)
    replay.close()
    resumed = find_replay(tmp_path, "execution", epoch, 1000 + size, 51)  # the end of a kept segment
    assert resumed is not None and resumed.next_chunk(epoch + 1, 0) == batches[3]
    assert resumed.take_gap() == protocol.Gap(protocol.GAP_LEFT_LOG, 2, 2 * size)
    resumed.close()
    (tmp_path / "execution-000001.journal").unlink()
    inside = find_replay(tmp_path, "execution", epoch, 1000, 50)  # in a deleted segment: from the oldest kept
    assert inside is not None and inside.take_gap() == protocol.Gap(protocol.GAP_LEFT_LOG, 3, 3 * size)
    assert inside.next_chunk(epoch + 1, 0) == batches[3]
    inside.close()
    assert find_replay(tmp_path, "execution", epoch + 1, 0, 0) is None  # another epoch: nothing to say here
