"""The execution audit journal: exact bytes back, torn tails, rotation, fsync policies, ``jitrelay audit``, kill -9.

Messages are built with ``reference`` (from PROTOCOL.md alone), never with the
project's encoder, so a journal that altered bytes could not agree with them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from support.reference import extended_record, message, standard_record

from jitrelay.cli import main
from jitrelay.core.protocol import ProtocolError
from jitrelay.server import journal
from jitrelay.server.journal import Journal, read_journal, segment_paths

MARKET_DATA, EXECUTION = 1, 3
BASE_NS = 1_795_554_000_000_000_000  # 2026-11-24T21:00:00Z
BASE_TEXT = "2026-11-24T21:00:00"


def execution_messages(n: int, first: int = 0, step_ns: int = 1) -> list[bytes]:
    """``n`` execution messages of varied sizes (0 to 39-byte values, an extended record in every fifth)."""
    out = []
    for i in range(first, first + n):
        payload = standard_record(40 + i % 40, bytes((i * 7 + k) % 256 for k in range(i % 40)))
        if i % 5 == 4:
            payload += extended_record(79, bytes((i + k) % 256 for k in range(300 + i % 7)))
        out.append(message(EXECUTION, payload, source=7, flags=i % 3, sequence=i, timestamp_ns=BASE_NS + i * step_ns))
    return out


def raws(path: Path, **window: int) -> list[bytes]:
    return [m.raw for m in read_journal(path, **window)]


def write_journal(directory: Path, messages: list[bytes], **options: object) -> Path:
    with Journal(directory, "execution", **options) as j:
        for m in messages:
            j.append([m], count=1)
        return j.path


def as_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy()


@pytest.fixture
def chunked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Read segments in tiny chunks too, so messages cross every read boundary."""
    monkeypatch.setattr(journal, "_READ_CHUNK", request.param)
    return request.param


READ_CHUNKS = [journal._READ_CHUNK, 7, 100]


# -- writing and reading back ------------------------------------------------------------------------------------------


def test_round_trip_is_byte_identical(tmp_path: Path) -> None:
    msgs = execution_messages(40)
    with Journal(tmp_path / "j", "execution") as j:
        j.append([msgs[0]], count=1)  # bytes
        j.append([memoryview(as_array(msgs[1] + msgs[2]))], count=2)  # a memoryview of a numpy array
        j.append([as_array(msgs[3]), b"", msgs[4], memoryview(msgs[5])], count=3)  # mixed pieces, one empty
        j.append([b"".join(msgs[6:20])], count=14)  # many messages in one piece
        j.append([as_array(m) for m in msgs[20:]], count=20)
        path = j.path
        assert j.bytes_written == sum(map(len, msgs))
        assert j.messages == 40
    assert path.read_bytes() == b"".join(msgs)
    back = list(read_journal(tmp_path / "j"))
    assert b"".join(m.raw for m in back) == b"".join(msgs)
    assert [m.raw for m in back] == msgs
    assert [m.header.sequence for m in back] == list(range(40))
    assert all(m.checksum_ok for m in back)


def test_partial_writes_are_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_writev = os.writev
    calls = []

    def dribble(fd: int, buffers: list) -> int:
        calls.append(len(buffers))
        return real_writev(fd, [memoryview(buffers[0])[:5]])

    monkeypatch.setattr(os, "writev", dribble)
    msgs = execution_messages(6)
    path = write_journal(tmp_path, msgs)
    assert path.read_bytes() == b"".join(msgs)
    assert len(calls) == sum((len(m) + 4) // 5 for m in msgs)


def test_more_pieces_than_one_writev_takes(tmp_path: Path) -> None:
    msgs = execution_messages(3000)
    with Journal(tmp_path, "execution") as j:
        j.append(msgs, count=len(msgs))
        path = j.path
    assert path.read_bytes() == b"".join(msgs)


@pytest.mark.parametrize("chunked", READ_CHUNKS, indirect=True)
def test_torn_tail_at_every_offset_of_the_last_message(
    tmp_path: Path, chunked: int, caplog: pytest.LogCaptureFixture
) -> None:
    msgs = execution_messages(5)  # the last one carries an extended record: 377 bytes
    *earlier, last = msgs
    prefix = b"".join(earlier)
    path = tmp_path / "execution-000001.journal"
    assert len(last) > 300
    for cut in range(len(last)):
        path.write_bytes(prefix + last[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="jitrelay.journal"):
            assert raws(path) == earlier, cut
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        if cut == 0:
            assert warnings == []
        else:
            assert warnings == [
                f"torn tail in {path} at byte offset {len(prefix)}: ignoring {cut} bytes of an incomplete message"
            ]
    path.write_bytes(prefix + last)
    assert raws(path) == msgs


def test_a_torn_tail_before_a_restart_loses_only_that_message(tmp_path: Path) -> None:
    first, second = execution_messages(4), execution_messages(3, first=4)
    torn = write_journal(tmp_path, first)
    with open(torn, "ab") as f:
        f.write(second[0][:40])  # a crash in the middle of a message, then a restart
    write_journal(tmp_path, second[1:])
    assert raws(tmp_path) == first + second[1:]


def test_an_empty_journal_reads_back_nothing(tmp_path: Path) -> None:
    path = write_journal(tmp_path, [])
    assert path.stat().st_size == 0
    assert raws(tmp_path) == []


# -- segments ----------------------------------------------------------------------------------------------------------


def test_rotation_keeps_every_message_and_never_splits_one(tmp_path: Path) -> None:
    msgs = execution_messages(60)
    appends = [[m] for m in msgs[:30]] + [msgs[30:33], msgs[33:34], msgs[34:50], msgs[50:]]
    rotate = 600
    with Journal(tmp_path, "execution", rotate_bytes=rotate) as j:
        for pieces in appends:
            j.append(pieces)
    # Expected: a new segment before any append that would take a non-empty one past 600 bytes.
    expected: list[bytes] = [b""]
    for pieces in appends:
        data = b"".join(pieces)
        if expected[-1] and len(expected[-1]) + len(data) > rotate:
            expected.append(b"")
        expected[-1] += data
    segments = segment_paths(tmp_path)
    assert [p.name for p in segments] == [f"execution-{i:06d}.journal" for i in range(1, len(expected) + 1)]
    assert [p.read_bytes() for p in segments] == expected
    assert len(expected) > 5
    assert max(len(s) for s in expected) > rotate  # msgs[34:50] is one append larger than a segment: kept whole
    assert raws(tmp_path) == msgs
    assert raws(tmp_path / "execution") == msgs  # the name prefix reads the same segments
    assert [m for p in segments for m in raws(p)] == msgs


def test_a_restart_starts_a_new_segment_and_never_touches_old_ones(tmp_path: Path) -> None:
    old = execution_messages(3)
    (tmp_path / "execution-000041.journal").write_bytes(b"".join(old))
    (tmp_path / "execution-000007.journal").write_bytes(b"")
    (tmp_path / "signal-000099.journal").write_bytes(b"")
    (tmp_path / "execution-x.journal").write_bytes(b"not a segment")
    new = execution_messages(2, first=3)
    with Journal(tmp_path, "execution") as j:
        assert j.path == tmp_path / "execution-000042.journal"
        j.append(new)
    with Journal(tmp_path, "execution") as j:
        assert j.path == tmp_path / "execution-000043.journal"  # even though 000042 is short
    assert (tmp_path / "execution-000041.journal").read_bytes() == b"".join(old)
    assert (tmp_path / "execution-000042.journal").read_bytes() == b"".join(new)
    assert raws(tmp_path / "execution") == old + new


def test_a_segment_number_taken_meanwhile_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    taken = tmp_path / "execution-000001.journal"
    taken.write_bytes(b"someone else's")
    monkeypatch.setattr(journal, "_segments_named", lambda directory, name: [])  # as if created after the scan
    with Journal(tmp_path, "execution") as j:
        assert j.path == tmp_path / "execution-000002.journal"
    assert taken.read_bytes() == b"someone else's"


def test_folder_and_file_modes(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "journal"
    path = write_journal(directory, execution_messages(1))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o770
    assert stat.S_IMODE(path.stat().st_mode) & 0o027 == 0  # no group write, nothing for others


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fsync"):
        Journal(tmp_path, "execution", fsync="sometimes")
    with pytest.raises(ValueError, match="rotate_bytes"):
        Journal(tmp_path, "execution", rotate_bytes=0)
    with pytest.raises(ValueError, match="name"):
        Journal(tmp_path, "a/b")
    j = Journal(tmp_path, "execution")
    assert not j.closed
    j.close()
    j.close()
    assert j.closed
    with pytest.raises(ValueError, match="closed"):
        j.append([execution_messages(1)[0]])
    with pytest.raises(FileNotFoundError):
        read_journal(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        read_journal(tmp_path / "empty")


# -- fsync policies ----------------------------------------------------------------------------------------------------


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every file or folder fsynced, in order."""
    real_fsync = os.fsync
    seen: list[str] = []

    def counting(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return seen


def test_policies_agree_segment_by_segment(tmp_path: Path) -> None:
    msgs = execution_messages(30)
    contents = {}
    for policy in journal.FSYNC_POLICIES:
        write_journal(tmp_path / policy, msgs, fsync=policy, rotate_bytes=1000)
        contents[policy] = [p.read_bytes() for p in segment_paths(tmp_path / policy)]
    assert contents["every"] == contents["batch"] == contents["none"]
    assert b"".join(contents["every"]) == b"".join(msgs)


def test_fsync_every_syncs_each_append(tmp_path: Path, fsyncs: list[str]) -> None:
    msgs = execution_messages(8)
    with Journal(tmp_path, "execution", fsync="every") as j:
        segment = str(j.path)
        assert fsyncs == [str(tmp_path)]  # the new segment's name
        for n, m in enumerate(msgs, 1):
            j.append([m])
            assert fsyncs.count(segment) == n
        j.append([])  # nothing written, nothing to sync
        assert fsyncs.count(segment) == len(msgs)
    assert fsyncs.count(segment) == len(msgs)  # close has nothing left to sync


def test_fsync_batch_syncs_on_maybe_sync_rotation_and_close(tmp_path: Path, fsyncs: list[str]) -> None:
    msgs = execution_messages(6)
    with Journal(tmp_path, "execution", fsync="batch", sync_interval=0) as j:
        first = str(j.path)
        j.append([msgs[0]])
        j.append([msgs[1]])
        assert fsyncs.count(first) == 0
        j.maybe_sync()
        assert fsyncs.count(first) == 1
        j.maybe_sync()  # nothing new
        assert fsyncs.count(first) == 1
        j.append([msgs[2]])
        j.maybe_sync()
        assert fsyncs.count(first) == 2
        j.append([msgs[3]])
        j.sync()  # on demand, whatever the interval
        j.sync()
        assert fsyncs.count(first) == 3
    with Journal(tmp_path, "execution", fsync="batch", sync_interval=3600, rotate_bytes=400) as j:
        second = str(j.path)
        j.append([msgs[4]])  # 347 bytes
        j.maybe_sync()  # too soon
        j.append([msgs[3]])  # 37 more: 384
        assert fsyncs.count(second) == 0
        j.append([msgs[0]])  # 34 more would pass 400: the segment is synced and a new one started
        assert fsyncs.count(second) == 1
        third = str(j.path)
        assert third != second
        assert fsyncs.count(third) == 0
    assert fsyncs.count(third) == 1  # on close
    assert fsyncs.count(str(tmp_path)) == 3  # one per new segment name


def test_fsync_none_never_syncs(tmp_path: Path, fsyncs: list[str]) -> None:
    msgs = execution_messages(30)
    with Journal(tmp_path, "execution", fsync="none", rotate_bytes=500) as j:
        for m in msgs:
            j.append([m])
            j.maybe_sync()
    assert len(segment_paths(tmp_path)) > 3
    assert fsyncs == []
    assert raws(tmp_path) == msgs


# -- write failures ----------------------------------------------------------------------------------------------------


def failing_writev(monkeypatch: pytest.MonkeyPatch, fail_on: int) -> None:
    """The ``fail_on``-th writev writes 10 bytes, the next one fails as a full disk would; later ones work."""
    real_writev = os.writev
    calls = [0]

    def writev(fd: int, buffers: list) -> int:
        calls[0] += 1
        if calls[0] == fail_on:
            return real_writev(fd, [memoryview(buffers[0])[:10]])
        if calls[0] == fail_on + 1:
            raise OSError(28, "No space left on device")
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)


def test_a_failed_append_leaves_no_torn_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    msgs = execution_messages(5)
    failing_writev(monkeypatch, fail_on=3)
    with Journal(tmp_path, "execution") as j:
        j.append([msgs[0]])
        j.append([msgs[1]])
        with pytest.raises(OSError, match="No space"):
            j.append([msgs[2]])
        j.append([msgs[3]])
        j.append([msgs[4]])
        path = j.path
    assert path.read_bytes() == b"".join(msgs[:2] + msgs[3:])


def test_a_write_that_makes_no_progress_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    msgs = execution_messages(2)
    with Journal(tmp_path, "execution") as j:
        j.append([msgs[0]])
        with monkeypatch.context() as patch:
            patch.setattr(os, "writev", lambda fd, buffers: 0)
            with pytest.raises(OSError, match="no progress"):
                j.append([msgs[1]])
        j.append([msgs[1]])
        path = j.path
    assert path.read_bytes() == b"".join(msgs)


def test_a_failed_append_that_cannot_be_undone_moves_to_a_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    msgs = execution_messages(4)
    failing_writev(monkeypatch, fail_on=2)

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "ftruncate", no_truncate)
    with Journal(tmp_path, "execution") as j:
        j.append([msgs[0]])
        torn = j.path
        with pytest.raises(OSError):
            j.append([msgs[1]])
        j.append([msgs[2]])
        j.append([msgs[3]])
        assert j.path != torn
    assert torn.read_bytes() == msgs[0] + msgs[1][:10]
    with caplog.at_level(logging.WARNING, logger="jitrelay.journal"):
        assert raws(tmp_path) == [msgs[0], msgs[2], msgs[3]]
    assert f"torn tail in {torn} at byte offset {len(msgs[0])}" in caplog.text


# -- reading: windows and corruption -----------------------------------------------------------------------------------


def test_since_and_until_keep_a_half_open_window(tmp_path: Path) -> None:
    msgs = execution_messages(10, step_ns=1000)
    write_journal(tmp_path, msgs, rotate_bytes=700)
    assert raws(tmp_path, since_ns=BASE_NS + 3000, until_ns=BASE_NS + 7000) == msgs[3:7]
    assert raws(tmp_path, since_ns=BASE_NS + 2999) == msgs[3:]
    assert raws(tmp_path, until_ns=BASE_NS + 1) == msgs[:1]
    assert raws(tmp_path, since_ns=BASE_NS + 10_000) == []


def damaged(msgs: list[bytes], index: int, at: int) -> tuple[bytes, int]:
    """The journal bytes with one byte of message ``index`` flipped, and that message's offset."""
    data = bytearray(b"".join(msgs))
    offset = sum(map(len, msgs[:index]))
    data[offset + at] ^= 0x40
    return bytes(data), offset


@pytest.mark.parametrize("chunked", READ_CHUNKS, indirect=True)
@pytest.mark.parametrize(
    ("index", "at", "reason"),
    [
        (2, 0, "bad magic"),  # mid-segment
        (2, 34, "checksum mismatch"),  # a value byte
        (2, 8, "checksum mismatch"),  # the sequence number
        (4, 200, "checksum mismatch"),  # the last message: damage, not a torn tail
    ],
)
def test_corruption_raises_after_the_messages_before_it(
    tmp_path: Path, chunked: int, index: int, at: int, reason: str
) -> None:
    msgs = execution_messages(5)
    data, offset = damaged(msgs, index, at)
    path = tmp_path / "execution-000001.journal"
    path.write_bytes(data)
    seen = []
    with pytest.raises(ProtocolError) as caught:
        for m in read_journal(path):
            seen.append(m.raw)
    assert seen == msgs[:index]
    assert str(caught.value).startswith(f"{path}: {reason}")
    assert f"at byte offset {offset}" in str(caught.value)


def test_malformed_records_are_corruption(tmp_path: Path) -> None:
    bad = message(EXECUTION, standard_record(40, b"ab") + b"\x00\x01z", sequence=1)  # a type-0 record, CRC correct
    path = tmp_path / "x.journal"
    path.write_bytes(execution_messages(1)[0] + bad)
    with pytest.raises(ProtocolError, match=f"corrupt message at byte offset {len(execution_messages(1)[0])}"):
        list(read_journal(path))


def test_domains_without_checksums_read_back_a_wrong_one(tmp_path: Path) -> None:
    msgs = [message(MARKET_DATA, standard_record(1, b"quote"), sequence=i, checksum=i) for i in range(3)]
    write_journal(tmp_path, msgs)
    back = list(read_journal(tmp_path))
    assert [m.raw for m in back] == msgs
    assert [m.checksum_ok for m in back] == [False, False, False]


# -- jitrelay audit ----------------------------------------------------------------------------------------------------


def audit_messages() -> list[bytes]:
    return [
        message(EXECUTION, standard_record(40 + i, bytes((i, 0xAB))), source=7, sequence=i, timestamp_ns=BASE_NS + i)
        for i in range(6)
    ]


def test_audit_prints_one_line_per_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_journal(tmp_path, audit_messages(), rotate_bytes=100)
    assert main(["audit", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"{BASE_TEXT}.{i:09d}Z execution source=7 seq={i} size=36 {40 + i}:{i:02x}ab" for i in range(6)
    ]


def test_audit_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    msgs = audit_messages()
    write_journal(tmp_path, msgs)
    assert main(["audit", str(tmp_path), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 6
    for i, (line, raw) in enumerate(zip(lines, msgs, strict=True)):
        assert line == {
            "magic": 0xDEADBEEF,
            "relay_domain": EXECUTION,
            "domain": "execution",
            "version": 2,
            "source": 7,
            "flags": 0,
            "sequence": i,
            "timestamp_ns": BASE_NS + i,
            "time": f"{BASE_TEXT}.{i:09d}Z",
            "payload_size": 4,
            "checksum": zlib.crc32(raw[:28] + raw[32:]),
            "records": [{"type": 40 + i, "value_hex": f"{i:02x}ab"}],
            "checksum_ok": True,
        }


@pytest.mark.parametrize(
    ("since", "until", "sequences"),
    [
        (f"{BASE_TEXT}.000000002Z", str(BASE_NS + 4), [2, 3]),
        (str(BASE_NS + 4), None, [4, 5]),
        (None, f"{BASE_TEXT}.000000001Z", [0]),
        ("2026-11-24T22:00:00.000000003+01:00", "2026-11-24 21:00:00.000000005", [3, 4]),  # a zone; no zone is UTC
        ("2026-11-25", None, []),
        ("2026-11-24T19:30:00.000000005-0130", None, [5]),
    ],
)
def test_audit_since_until(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], since: str | None, until: str | None, sequences: list[int]
) -> None:
    write_journal(tmp_path, audit_messages())
    args = ["audit", str(tmp_path), "--json"]
    args += ["--since", since] if since else []
    args += ["--until", until] if until else []
    assert main(args) == 0
    assert [json.loads(line)["sequence"] for line in capsys.readouterr().out.splitlines()] == sequences


def test_audit_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert main(["audit", str(missing)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert str(missing) in err and "no journal" in err

    for bad in ("yesterday", "2026-13-45T00:00:00Z", "-5"):
        assert main(["audit", str(tmp_path), "--since", bad]) == 2
        assert "not a time" in capsys.readouterr().err

    msgs = audit_messages()
    data, offset = damaged(msgs, 3, 30)
    path = tmp_path / "execution-000001.journal"
    path.write_bytes(data)
    assert main(["audit", str(path)]) == 1
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3
    assert f"jitrelay audit: corrupt journal: {path}: checksum mismatch at byte offset {offset}" in err


def test_audit_reports_a_read_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_journal(tmp_path, audit_messages())

    def failing_open(*args: object, **kwargs: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(journal, "open", failing_open, raising=False)
    assert main(["audit", str(tmp_path)]) == 1
    assert f"jitrelay audit: cannot read {tmp_path}: [Errno 5] Input/output error" in capsys.readouterr().err


def test_audit_stops_quietly_when_its_reader_does(tmp_path: Path) -> None:
    write_journal(tmp_path, execution_messages(3000))
    audit = subprocess.Popen(
        [sys.executable, "-m", "jitrelay", "audit", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert audit.stdout is not None and audit.stderr is not None
    assert audit.stdout.readline().startswith(f"{BASE_TEXT}.000000000Z execution source=7 seq=0 ")
    audit.stdout.close()  # as `| head -1` does
    assert audit.wait(timeout=60) == 0
    assert audit.stderr.read() == ""


def test_audit_command_warns_of_a_torn_tail(tmp_path: Path) -> None:
    msgs = audit_messages()
    path = tmp_path / "execution-000001.journal"
    path.write_bytes(b"".join(msgs)[:-5])
    done = subprocess.run(
        [sys.executable, "-m", "jitrelay", "audit", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 5
    warning = f"jitrelay audit: torn tail in {path} at byte offset {36 * 5}: ignoring 31 bytes of an incomplete message"
    assert warning in done.stderr.splitlines()


# -- a real crash ------------------------------------------------------------------------------------------------------

KILL_BATCH = 256
KILL_VALUE = bytes(range(256)) * 4  # 1024 bytes: an extended record, 1061-byte messages
WRITER = f"""
import sys, time
from pathlib import Path
from jitrelay.core import protocol
from jitrelay.server.journal import Journal

journal = Journal(Path(sys.argv[1]), "execution", fsync="none", rotate_bytes=1 << 20)
value = bytes(range(256)) * 4
sequence = 0
while sequence < 128 * {KILL_BATCH}:
    batch = protocol.build_batch(3, {KILL_BATCH}, [(40, value)], source=9, first_sequence=sequence,
                                 timestamp_ns={BASE_NS} + sequence)
    half = len(batch) // 2
    journal.append([batch[:half], batch[half:]], count={KILL_BATCH})
    sequence += {KILL_BATCH}
    if sequence == 4 * {KILL_BATCH}:
        print("writing", flush=True)
print("done", flush=True)
time.sleep(60)
"""


def killed_writer_message(sequence: int) -> bytes:
    stamp = BASE_NS + sequence - sequence % KILL_BATCH
    return message(EXECUTION, extended_record(40, KILL_VALUE), source=9, sequence=sequence, timestamp_ns=stamp)


def test_kill_9_leaves_a_readable_prefix(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_JIT"}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "writing\n"
        time.sleep(random.uniform(0, 0.01))  # anywhere in the stream of appends, perhaps in the middle of one
        os.kill(writer.pid, signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    on_disk = sum(p.stat().st_size for p in segment_paths(directory))
    back = list(read_journal(directory))
    assert len(back) >= 4 * KILL_BATCH
    assert [m.header.sequence for m in back] == list(range(len(back)))
    assert all(m.checksum_ok for m in back)
    assert [m.raw for m in back] == [killed_writer_message(i) for i in range(len(back))]
    assert on_disk - len(back) * 1061 < 1061  # at most a torn part of one message is left out

    # A restart after the crash starts a new segment; everything before it still reads back.
    more = execution_messages(3, first=len(back))
    path = write_journal(directory, more)
    assert path == segment_paths(directory)[-1]
    assert raws(directory) == [m.raw for m in back] + more
    shutil.rmtree(directory)
