"""Journal retention on a real execution relay: whole old segments deleted while it runs, each logged, and a
subscriber resuming from a deleted segment told exactly what it missed, then given exactly the rest."""

from __future__ import annotations

import re
import time
from pathlib import Path

from support.clients import Clients, NumberedStream
from support.mapped import receive
from support.relays import RelayProcess, StartRelay

from jitrelay import Subscriber
from jitrelay.core import protocol
from jitrelay.core.units import MiB
from jitrelay.server.journal import segment_positions

DELETED = re.compile(r"journal retention: deleted (\S+) \((\d+) bytes\): (.+)$")


def publish(relay: RelayProcess, clients: Clients, stream: NumberedStream) -> None:
    publisher = clients.connect(relay)
    publisher.settimeout(60)
    for i in range(stream.chunks):
        publisher.sendall(stream.chunk(i))
    publisher.close()


def deletions(relay: RelayProcess) -> list[tuple[str, int, str]]:
    found = [DELETED.search(line) for line in relay.lines]
    return [(m.group(1), int(m.group(2)), m.group(3)) for m in found if m]


def segment_numbers(directory: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1].split(".")[0]) for p in directory.glob("execution-*.journal"))


def test_size_retention_deletes_old_segments_and_a_resume_from_one_gets_the_exact_gap(
    start_relay: StartRelay, clients: Clients, short_dir: Path
) -> None:
    audit = short_dir / "audit"
    keep = 2 * MiB
    options = ["--journal-dir", str(audit), "--journal-rotate", "256KiB", "--journal-keep", "2MiB"]
    relay = start_relay("execution", *options, "--log-size", str(8 * MiB))
    with Subscriber("execution", relay.socket_path, positions=True) as first:
        first.recv_batch(timeout=0.5)
        start = first.position
    assert start is not None
    stream = NumberedStream(3, [(40, b"r" * 400)], chunk_messages=1024, chunks=40)  # ~17 MiB: past the 8 MiB log
    reader = clients.reader(relay)
    publish(relay, clients, stream)
    assert reader.wait_received(stream.total, 60), "not everything was forwarded (and so journaled)"
    relay.wait_line("journal retention: deleted", str(audit / "execution-000001.journal"), timeout=10)
    numbers = segment_numbers(audit)
    deleted = deletions(relay)
    # Whole segments, oldest first, each logged once: exactly those missing below the oldest kept one.
    assert [Path(path).name for path, _, _ in deleted] == [f"execution-{n:06d}.journal" for n in range(1, numbers[0])]
    assert numbers == list(range(numbers[0], numbers[-1] + 1))
    assert all(
        re.fullmatch(r"the closed segments hold \d+ bytes, more than the 2097152 it keeps", why) for *_, why in deleted
    )
    closed = [audit / f"execution-{n:06d}.journal" for n in numbers[:-1]]
    assert sum(p.stat().st_size for p in closed) <= keep  # and the segment being written besides
    assert not list(audit.glob(f"execution-{numbers[0] - 1:06d}.journal*")), "a position file left behind"
    # The segment being written is never deleted: it is the newest, and it holds the stream's last bytes.
    newest = audit / f"execution-{numbers[-1]:06d}.journal"
    assert newest.read_bytes() == stream.prefix(stream.total)[-newest.stat().st_size :]

    (kept, epoch, kept_offset, kept_message) = segment_positions(audit, "execution")[0]
    assert kept.name == f"execution-{numbers[0]:06d}.journal" and epoch == start.epoch
    with Subscriber("execution", relay.socket_path, resume_from=start) as sub:
        missed = kept_offset - start.offset
        rest = receive(sub, stream.total - missed)
        assert sub.gaps == [protocol.Gap(protocol.GAP_LEFT_LOG, kept_message - start.message, missed)]
        assert missed == (kept_message - start.message) * stream.message_size > 0
        assert sub.position == protocol.Position(
            start.epoch, start.offset + stream.total, start.message + stream.chunks * stream.chunk_messages
        )
    assert rest == stream.prefix(stream.total)[missed:], "the rest after the gap is not exactly the stream's"
    assert relay.find_line("the journal no longer holds what it resumes from")


def test_age_retention_deletes_segments_of_an_idle_relay_but_not_the_one_being_written(
    start_relay: StartRelay, clients: Clients, short_dir: Path
) -> None:
    audit = short_dir / "audit"
    options = ["--journal-dir", str(audit), "--journal-rotate", "64KiB", "--journal-keep", "2s"]
    relay = start_relay("execution", *options)
    stream = NumberedStream(3, [(40, b"a" * 400)], chunk_messages=64, chunks=10)  # ~270 KiB: five segments
    reader = clients.reader(relay)
    publisher = clients.connect(relay)
    for i in range(stream.chunks):  # one read each, so one append each
        publisher.sendall(stream.chunk(i))
        assert reader.wait_received((i + 1) * stream.chunk_size, 10)
    numbers = segment_numbers(audit)
    assert len(numbers) >= 4
    newest = numbers[-1]
    relay.wait_line("journal retention: deleted", f"execution-{newest - 1:06d}.journal", timeout=15)
    assert segment_numbers(audit) == [newest], "the segment being written was deleted, or an old one kept"
    deleted = deletions(relay)
    assert [Path(path).name for path, _, _ in deleted] == [f"execution-{n:06d}.journal" for n in numbers[:-1]]
    assert all(re.fullmatch(r"last written \d+ s ago, longer than the 2 s it keeps", why) for *_, why in deleted)
    time.sleep(3)  # idle and older than the limit, the segment being written stays
    assert segment_numbers(audit) == [newest]
