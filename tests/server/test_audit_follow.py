"""``jitrelay audit --follow`` on the journal of a live relay: what was there, then each message appended later,
across rotations, until SIGINT or SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.clients import Clients
from support.relays import StartRelay, relay_environ

from jitrelay.core import protocol
from jitrelay.tools.tap import format_message

TIMEOUT = 20.0


class Audit:
    """``jitrelay audit PATH --follow`` as a process, its stdout lines collected as they come."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jitrelay", "audit", str(path), "--follow"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=relay_environ(),
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode().rstrip("\n"))

    def wait_lines(self, n: int) -> list[str]:
        deadline = time.monotonic() + TIMEOUT
        while len(self.lines) < n:
            assert time.monotonic() < deadline and self.proc.poll() is None, f"{len(self.lines)} of {n} lines"
            time.sleep(0.02)
        return list(self.lines)

    def stop(self, signum: int) -> tuple[int, str]:
        self.proc.send_signal(signum)
        code = self.proc.wait(TIMEOUT)
        self.reader.join(5)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read().decode()


def messages(first: int, count: int) -> list[bytes]:
    return [
        protocol.build_message(3, [(40 + i % 20, bytes([i % 256]) * (50 + i % 300))], source=9, sequence=i)
        for i in range(first, first + count)
    ]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_audit_follow_prints_what_a_live_relay_appends_after_it_started(
    start_relay: StartRelay, clients: Clients, short_dir: Path, signum: int
) -> None:
    audit_dir = short_dir / "audit"
    relay = start_relay("execution", "--journal-dir", str(audit_dir), "--journal-rotate", "4KiB")
    reader = clients.reader(relay)
    publisher = clients.connect(relay)
    before, after = messages(0, 40), messages(40, 120)
    publisher.sendall(b"".join(before))
    assert reader.wait_received(sum(map(len, before)), TIMEOUT)
    follow = Audit(audit_dir / "execution")
    try:
        expected = [format_message(protocol.decode_message(raw, 0)[0]) for raw in before + after]
        assert follow.wait_lines(len(before)) == expected[: len(before)]
        sent = sum(map(len, before))
        for i in range(0, len(after), 8):  # several appends, several rotations, while it follows
            batch = b"".join(after[i : i + 8])
            publisher.sendall(batch)
            sent += len(batch)
            assert reader.wait_received(sent, TIMEOUT)
            time.sleep(0.02)
        assert len(list(audit_dir.glob("execution-*.journal"))) > 4
        assert follow.wait_lines(len(expected)) == expected
        time.sleep(0.3)
        assert follow.lines == expected, "printed more than the relay appended"
    finally:
        code, stderr = follow.stop(signum)
    assert (code, stderr) == (0, "")


def test_audit_follow_refuses_a_folder_of_several_journals(short_dir: Path) -> None:
    for name in ("execution", "other"):
        (short_dir / f"{name}-000001.journal").write_bytes(b"")
    done = subprocess.run(
        [sys.executable, "-m", "jitrelay", "audit", str(short_dir), "--follow"],
        capture_output=True,
        env=relay_environ(),
        timeout=TIMEOUT,
    )
    assert done.returncode == 1
    assert done.stderr.decode() == (
        f"jitrelay audit: {short_dir} holds several journals (execution, other): "
        f"follow one, such as {short_dir / 'execution'}\n"
    )
