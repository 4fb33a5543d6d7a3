"""Subscribers of the relay's log mapped from shared memory, as the end-to-end tests drive them.

``MappedReaderProcess`` is a shared-memory subscriber in a process of its
own, for what a test must do to a whole process (SIGSTOP, SIGKILL): it
writes every message it is handed to a file, and when its stream ends (the
relay cut it off or went away, or it saw the last sequence number it was
told to wait for) a JSON summary of how it ended, its gaps and its position.
``drain`` and ``receive`` read an in-test ``Subscriber``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from jitrelay import Subscriber
from jitrelay.core import protocol
from support.processes import _starts

# argv: socket, data file, summary file, JSON options. The ready file says the relay has granted the log.
_MAPPED_READER = """
import json, os, sys, time
from jitrelay import Subscriber
socket_path, data_path, summary_path, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
last = options.pop("last", None)
pace = options.pop("pace", 0)  # a pause of 1 ms after every this many messages: a reader slower than the stream
domain = options.pop("domain")
out = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
ended = "last"
sub = Subscriber(domain, socket_path, shared_memory=True, **options)
with open(summary_path + ".ready", "w"):
    pass
try:
    for count, message in enumerate(sub, 1):
        os.write(out, message.raw)
        if pace and count % pace == 0:
            time.sleep(0.001)
        if last is not None and message.sequence == last and message.source != 0xEE:
            break
    else:
        ended = "eof"
except Exception as exc:
    ended = f"{type(exc).__name__}: {exc}"
summary = {"ended": ended, "gaps": [list(g) for g in sub.gaps], "position": str(sub.position)}
with open(summary_path + ".tmp", "w") as f:
    json.dump(summary, f)
os.replace(summary_path + ".tmp", summary_path)
"""


class MappedReaderProcess:
    """A shared-memory subscriber process: ``Subscriber`` options as keywords, ``last`` a sequence to stop after.

    ``pace=n`` makes it pause a millisecond after every ``n`` messages, so that a publisher at full speed laps it
    again and again, often while it copies.
    """

    def __init__(self, domain: str, socket_path: Path, folder: Path, name: str = "mapped", **options: object) -> None:
        self.out = folder / f"{name}.bin"
        self.summary_path = folder / f"{name}.json"
        self.out.write_bytes(b"")
        args = json.dumps({"domain": domain, **options})
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _MAPPED_READER, str(socket_path), str(self.out), str(self.summary_path), args]
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_granted(self, timeout: float = 30.0) -> None:
        """Until its ``Subscriber`` is built: the relay has handed it the log."""
        deadline = time.monotonic() + timeout
        ready = Path(str(self.summary_path) + ".ready")
        while not ready.exists():
            assert self.proc.poll() is None, f"the mapped reader exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "the relay did not grant the mapped reader its log"
            time.sleep(0.02)

    def received(self) -> bytes:
        return self.out.read_bytes()

    def messages(self) -> list[bytes]:
        """Every whole message it wrote, sync probes (source and flags 0xEE) left out."""
        data = self.received()
        return [
            data[at : at + protocol.HEADER_SIZE + int.from_bytes(data[at + 24 : at + 28], "little")]
            for at, _ in _starts(data)
            if not (data[at + protocol.OFF_SOURCE] == 0xEE and data[at + 7] == 0xEE)
        ]

    def wait_exit(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def summary(self) -> dict:
        return json.loads(self.summary_path.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def drain(sub: Subscriber) -> bytes:
    """What a mapped subscriber can read now, without waiting: the log up to its head when called."""
    got = bytearray()
    while (batch := sub.recv_batch(timeout=0)) is not None:
        got += batch.tobytes()
    return bytes(got)


def receive(sub: Subscriber, nbytes: int, timeout: float = 30.0) -> bytes:
    """At least ``nbytes`` from ``sub`` (whole batches, from its socket or its mapping), within ``timeout`` seconds."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    while len(got) < nbytes:
        assert time.monotonic() < deadline, f"received {len(got)} of {nbytes} bytes"
        batch = sub.recv_batch(timeout=1.0)
        if batch is not None:
            got += batch.tobytes()
    return bytes(got)


def shm_entries() -> set[str]:
    """What ``/dev/shm`` holds of the relay's (other programs on the machine come and go there too)."""
    return {name for name in os.listdir("/dev/shm") if "jitrelay" in name or name.startswith("jr-")}


def memfd_mappings(pid: int | str = "self") -> list[str]:
    """The lines of ``/proc/<pid>/maps`` that map one of a relay's memory files."""
    with open(f"/proc/{pid}/maps") as maps:
        return [line.rstrip("\n") for line in maps if "memfd:jitrelay" in line]


def memfd_descriptors(pid: int | str = "self") -> list[str]:
    """The descriptors of ``pid`` open on one of a relay's memory files, as ``fd -> target``."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if "memfd:jitrelay" in target:
            found.append(f"{fd} -> {target}")
    return found
