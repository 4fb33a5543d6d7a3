"""The capture format on disk: journal segments and their side files of receive times, written and read back."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from jitrelay.core import protocol
from jitrelay.server.journal import read_journal
from jitrelay.tools.capture import TIMES_DTYPE, CaptureWriter, read_capture, times_path

RECORDS = [protocol.synthetic_record(protocol.MARKET_DATA, 71)]


def batch(count: int, first: int = 0) -> np.ndarray:
    return protocol.build_batch(protocol.MARKET_DATA, count, RECORDS, first_sequence=first, checksums=False)


def write(file: Path, batches: list[np.ndarray], rotate_bytes: int = 1 << 20) -> CaptureWriter:
    writer = CaptureWriter(file, rotate_bytes=rotate_bytes)
    for i, b in enumerate(batches):
        writer.append(b, 1_000 + i, len(b) // 71)
    writer.close()
    return writer


def test_batches_come_back_with_their_times_across_rotation_and_the_journal_reader_reads_the_messages(
    tmp_path: Path,
) -> None:
    batches = [batch(10, 0), batch(3, 10), batch(20, 13), batch(1, 33)]
    writer = write(tmp_path / "md", batches, rotate_bytes=1000)  # 710 + 213 fit, 1420 goes alone, 71 after it
    assert (writer.segments, writer.batches, writer.messages) == (3, 4, 34)
    segments = list(read_capture(tmp_path / "md"))
    assert [s.path.name for s in segments] == ["md-000001.journal", "md-000002.journal", "md-000003.journal"]
    assert [s.ends.tolist() for s in segments] == [[710, 923], [1420], [71]]
    assert [s.times.tolist() for s in segments] == [[1000, 1001], [1002], [1003]]
    assert [s.messages for s in segments] == [13, 20, 1]
    assert all(s.timed for s in segments)
    assert b"".join(s.data.tobytes() for s in segments) == b"".join(b.tobytes() for b in batches)
    assert [m.header.sequence for m in read_journal(tmp_path / "md")] == list(range(34))
    assert sorted(p.name for p in tmp_path.iterdir())[:2] == ["md-000001.journal", "md-000001.journal.times"]


def test_a_torn_tail_is_left_out_with_a_warning_and_untimed_messages_take_the_time_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path / "md", [batch(2), batch(2, 2)])
    segment = tmp_path / "md-000001.journal"
    times = times_path(segment)
    with segment.open("ab") as f:
        f.write(batch(3, 4).tobytes())  # messages whose entry was never written
        f.write(batch(1, 7).tobytes()[:50])  # and a torn one
    with times.open("ab") as f:
        f.write(b"\x01\x02\x03")  # a torn entry
    with caplog.at_level(logging.WARNING, logger="jitrelay.capture"):
        (read,) = read_capture(tmp_path / "md")
    assert f"torn tail in {segment} at byte offset 497: ignoring 50 bytes" in caplog.text
    assert read.ends.tolist() == [142, 284, 497]
    assert read.times.tolist() == [1000, 1001, 1001]
    assert read.messages == 7


def test_entries_past_a_torn_tail_are_dropped(tmp_path: Path) -> None:
    write(tmp_path / "md", [batch(2), batch(2, 2)])
    segment = tmp_path / "md-000001.journal"
    with segment.open("r+b") as f:
        f.truncate(142 + 40)  # the second batch torn
    (read,) = read_capture(tmp_path / "md")
    assert (read.ends.tolist(), read.times.tolist(), len(read.data)) == ([142], [1000], 142)


def test_a_journal_without_side_files_reads_as_one_untimed_batch_per_segment(tmp_path: Path) -> None:
    (tmp_path / "j-000001.journal").write_bytes(batch(5).tobytes())
    (tmp_path / "j-000002.journal").write_bytes(b"")
    first, empty = read_capture(tmp_path / "j")
    assert (first.timed, first.ends.tolist(), first.messages) == (False, [355], 5)
    assert (empty.ends.tolist(), len(empty.data)) == ([], 0)


def test_bad_magic_and_disordered_entries_are_corruption(tmp_path: Path) -> None:
    write(tmp_path / "md", [batch(2), batch(2, 2)])
    segment = tmp_path / "md-000001.journal"
    times = times_path(segment)
    entries = np.frombuffer(times.read_bytes(), dtype=TIMES_DTYPE)
    times.write_bytes(entries[::-1].tobytes())
    with pytest.raises(protocol.ProtocolError, match="batch ends do not increase"):
        list(read_capture(tmp_path / "md"))
    data = bytearray(segment.read_bytes())
    data[142:146] = b"\0\0\0\0"
    segment.write_bytes(bytes(data))
    with pytest.raises(protocol.ProtocolError, match=f"{segment}: bad magic 00000000 at byte offset 142"):
        list(read_capture(tmp_path / "md"))
