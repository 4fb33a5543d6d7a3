"""Readiness and health of a real relay process: sd_notify on a real notify socket, /readyz and /healthz over HTTP.

How each state is reached, honestly:

- *Not ready*: the relay's stderr is a pipe the test has filled before the
  start, so the relay blocks on its first log line, which comes right after
  its HTTP endpoint starts and before it loads its kernels or listens.
- *The loop stops turning*: the test stops reading the relay's stderr and
  asks it (SIGUSR1) to log its figures until a write blocks the event loop,
  a real way a relay hangs (a stuck log reader); the HTTP thread still answers.
- *The journal cannot write*: the relay's file-size limit is lowered under
  its journal (EFBIG), as in the failing-journal test.
"""

from __future__ import annotations

import fcntl
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.clients import Clients, sync
from support.relays import StartRelay, relay_environ

from jitrelay.core.protocol import build_message

TIMEOUT = 20.0
F_SETPIPE_SZ = 1031


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    """Status and body of GET http://127.0.0.1:PORT/PATH."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_status(port: int, path: str, status: int) -> str:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            got, body = get(port, path)
        except OSError:  # not serving yet
            got, body = 0, ""
        if got == status:
            return body
        assert time.monotonic() < deadline, f"{path} never answered {status} (last {got}: {body!r})"
        time.sleep(0.05)


def accepts(socket_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(socket_path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
    return True


class NotifySocket:
    """A real AF_UNIX datagram socket, as systemd's NOTIFY_SOCKET, and every datagram it gets."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)

    def take(self, timeout: float) -> list[bytes]:
        """The datagrams that arrive within ``timeout`` seconds."""
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got.append(self.sock.recv(4096))
            except TimeoutError:
                continue
        return got

    def wait_for(self, wanted: bytes) -> list[bytes]:
        """Every datagram up to and including the first that is ``wanted``."""
        got = []
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                got.append(self.sock.recv(4096))
            except TimeoutError:
                continue
            if got[-1] == wanted or got[-1].startswith(wanted + b"\n"):
                return got
        raise AssertionError(f"no {wanted!r} within {TIMEOUT} s; got {got!r}")


@pytest.fixture
def notify(short_dir: Path) -> Iterator[NotifySocket]:
    made = NotifySocket(short_dir / "notify")
    yield made
    made.sock.close()


def test_sd_notify_ready_after_listening_watchdog_and_stopping(
    start_relay: StartRelay, notify: NotifySocket, short_dir: Path
) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "500000"}
    relay = start_relay("market_data", env=env, ready=False)
    before = notify.wait_for(b"READY=1")
    assert accepts(relay.socket_path), "READY=1 came before the relay accepted connections"
    assert before[-1] == f"READY=1\nSTATUS=listening on {relay.socket_path}\nMAINPID={relay.pid}".encode()
    assert set(before[:-1]) <= {b"WATCHDOG=1"}
    pings = notify.take(1.5)
    assert pings.count(b"WATCHDOG=1") >= 3, pings  # every quarter of a second at most, half the 0.5 s asked for
    relay.send_signal(signal.SIGTERM)
    after = notify.wait_for(b"STOPPING=1")
    assert after[-1] == b"STOPPING=1\nSTATUS=stopping"
    assert relay.wait_exit(10) == 0


def test_no_watchdog_pings_unless_asked_and_none_meant_for_another_pid(
    start_relay: StartRelay, notify: NotifySocket
) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}
    relay = start_relay("market_data", env=env, ready=False)
    assert notify.wait_for(b"READY=1")[0].startswith(b"READY=1\n")  # nothing before it
    assert notify.take(1.0) == []
    relay.send_signal(signal.SIGTERM)
    assert notify.wait_for(b"STOPPING=1") == [b"STOPPING=1\nSTATUS=stopping"]
    assert relay.wait_exit(10) == 0


class PipedRelay:
    """A relay whose stderr goes to a one-page pipe the test reads only when it wants to."""

    def __init__(self, socket_path: Path, options: list[str], fill: bool, notify: Path | None = None) -> None:
        read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)
        if fill:  # the relay's first log line will block
            os.write(write_end, b"#" * 4096)
        args = [sys.executable, "-m", "jitrelay", "run", "market_data", "--socket", str(socket_path)]
        env = relay_environ({"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "1000000"} if notify else None)
        # Not measured by coverage: a relay held by a full stderr pipe is the point here, and coverage's tracer
        # in the relay can stall the HTTP thread's first request behind the held main thread (seen under the
        # suite's --cov, never without it), which no relay in service runs with.
        env = {k: v for k, v in env.items() if not k.startswith(("COV_CORE_", "COVERAGE_PROCESS"))}
        self.proc = subprocess.Popen(
            [*args, "--log-level", "INFO", *options], stderr=write_end, stdout=subprocess.DEVNULL, env=env
        )
        os.close(write_end)
        self.read_end = read_end
        self.text = bytearray()
        self.flowing = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            self.flowing.wait()
            data = os.read(self.read_end, 65536)
            if not data:
                return
            self.text += data

    def wait_text(self, needle: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while needle.encode() not in self.text:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.text.decode(errors="replace")
            time.sleep(0.02)

    def stop(self) -> int:
        self.flowing.set()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        finally:
            self.proc.kill()
            self.reader.join(5)
            os.close(self.read_end)


def test_readyz_is_503_until_every_listener_accepts_then_200(short_dir: Path) -> None:
    port = free_port()
    socket_path = short_dir / "market_data.sock"
    relay = PipedRelay(socket_path, ["--metrics-port", str(port)], fill=True)
    try:
        body = wait_status(port, "/readyz", 503)  # serving, and stuck on its first log line
        assert body == "not ready: the relay is starting or stopping\n"
        time.sleep(0.5)
        assert get(port, "/readyz")[0] == 503
        assert not accepts(socket_path)
        assert relay.proc.poll() is None
        relay.flowing.set()  # the log drains: the relay loads its kernels and listens
        assert wait_status(port, "/readyz", 200) == "ready\n"
        assert accepts(socket_path)
        relay.wait_text(f"relay listening on {socket_path}")
        assert get(port, "/healthz") == (200, "ok\n")
    finally:
        assert relay.stop() == 0


def test_healthz_goes_unhealthy_while_the_event_loop_is_stuck_and_recovers(
    short_dir: Path, notify: NotifySocket
) -> None:
    port = free_port()
    socket_path = short_dir / "market_data.sock"
    relay = PipedRelay(socket_path, ["--metrics-port", str(port)], fill=False, notify=notify.path)
    try:
        relay.flowing.set()
        relay.wait_text(f"relay listening on {socket_path}")
        assert get(port, "/healthz") == (200, "ok\n")
        relay.flowing.clear()
        relay.proc.send_signal(signal.SIGUSR1)  # a line the reader takes before it stops; later ones fill the pipe
        deadline = time.monotonic() + TIMEOUT
        while True:
            relay.proc.send_signal(signal.SIGUSR1)
            status, body = get(port, "/healthz")
            if status == 503:
                break
            assert time.monotonic() < deadline, "the loop never stalled"
            time.sleep(0.1)
        assert re.fullmatch(r"unhealthy: the event loop last turned \d+\.\d s ago \(limit 2 s\)\n", body), body
        assert get(port, "/readyz") == (200, "ready\n")  # still listening: ready, not healthy
        notify.take(0.6)  # pings sent before the loop stuck
        assert b"WATCHDOG=1" not in notify.take(1.0), "watchdog pings while the loop is stuck"
        relay.flowing.set()
        assert wait_status(port, "/healthz", 200) == "ok\n"
        assert b"WATCHDOG=1" in notify.take(1.0)
    finally:
        assert relay.stop() == 0


def test_healthz_goes_unhealthy_while_the_journal_cannot_write(
    start_relay: StartRelay, clients: Clients, short_dir: Path
) -> None:
    relay = start_relay("execution", "--journal-dir", str(short_dir / "audit"), "--metrics-port", "0")
    port = int(re.search(r":(\d+)/metrics", relay.wait_line("metrics on http://")).group(1))  # type: ignore[union-attr]
    assert get(port, "/healthz") == (200, "ok\n")
    limit = 64 * 1024
    resource.prlimit(relay.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    subscriber = clients.reader(relay)
    publisher = clients.connect(relay)
    sync(publisher, [subscriber], 3)
    batch = b"".join(build_message(3, [(40, bytes([i % 256]) * 200)], sequence=i) for i in range(600))
    threading.Thread(target=publisher.sendall, args=(batch,), daemon=True).start()  # over the limit: held
    body = wait_status(port, "/healthz", 503)
    assert re.fullmatch(
        r"unhealthy: the journal cannot write: append to \S+/audit/execution-000001\.journal failed: "
        r"\[Errno 27\] File too large\n",
        body,
    ), body
    resource.prlimit(relay.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert wait_status(port, "/healthz", 200) == "ok\n"
    assert subscriber.wait_received(len(batch), TIMEOUT)
