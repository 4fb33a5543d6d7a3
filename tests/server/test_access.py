"""End-to-end: who may connect to a relay, and how many at once.

Clients of other users are real: the tests run as root and fork children
that drop to another uid and gid (nobody/nogroup, 65534, or an unnamed id)
before they connect, so the relay sees their credentials through the
socket. For them to reach it, the socket lives in a folder made 0o711
(others may pass through it but not write to it: the relay refuses a socket
folder others can write) and is made 0o666 once the relay listens.

A refused peer must read EOF straight away, before it is forwarded
anything, and the relay logs one WARNING line naming it (``refusing``,
``uid=``, ``pid=``, and why); the connections already admitted go on as
before. Admitted peers of any user publish and subscribe like the relay's
own user.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.processes import killed_at_teardown
from support.reference import DOMAINS, HEADER, message, standard_record
from support.relays import RelayProcess, StartRelay

NOBODY = 65534  # nobody / nogroup
STRANGER = 54321  # a uid and gid no one has: only listed ids should count
ROOT = 0
TIMEOUT = 10.0
PROBE_MARK = 0xEE  # source and flags of attach probes; no other test message uses them


# -- messages ---------------------------------------------------------------------


def note(domain: str, text: bytes, sequence: int = 0) -> bytes:
    """A valid message of ``domain`` (checksum included) whose record carries ``text``."""
    d = DOMAINS[domain]
    return message(d.ident, standard_record(d.ranges[0][0], text), source=7, sequence=sequence, timestamp_ns=1)


def probe(domain: str, n: int) -> bytes:
    d = DOMAINS[domain]
    record = standard_record(d.ranges[0][0], b"probe" + struct.pack("<Q", n))
    return message(d.ident, record, source=PROBE_MARK, flags=PROBE_MARK, sequence=n)


# -- clients of the relay's own user ------------------------------------------------


def connect(relay: RelayProcess) -> socket.socket:
    """A connected socket; waits while the listen backlog is full (EAGAIN), as when hundreds connect at once."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return relay.connect(TIMEOUT)
        except BlockingIOError:
            assert time.monotonic() < deadline, f"the relay accepted no connection for {TIMEOUT} s"
            time.sleep(0.005)


class Peer:
    """A root client socket that reads whole messages, keeping any partial one for the next read."""

    def __init__(self, relay: RelayProcess) -> None:
        self.sock = connect(relay)
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_message(self, timeout: float) -> bytes | None:
        """The next whole message, or None if none completes within ``timeout``; fails on EOF."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= HEADER:
                size = HEADER + struct.unpack_from("<I", self.buf, 24)[0]
                if len(self.buf) >= size:
                    whole = bytes(self.buf[:size])
                    del self.buf[:size]
                    return whole
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                return None
            assert chunk, "the relay closed this connection"
            self.buf += chunk

    def messages_until(self, wanted: bytes, timeout: float = TIMEOUT) -> list[bytes]:
        """The messages that arrive before ``wanted``, which is consumed too."""
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while (m := self.next_message(deadline - time.monotonic())) != wanted:
            assert m is not None, f"expected message not received within {timeout} s; got {len(got)} others"
            got.append(m)
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def peers() -> Iterator[Callable[[RelayProcess], Peer]]:
    opened: list[Peer] = []

    def open_peer(relay: RelayProcess) -> Peer:
        peer = Peer(relay)
        opened.append(peer)
        return peer

    yield open_peer
    for peer in opened:
        peer.close()


def attach(domain: str, publisher: Peer, subscribers: list[Peer]) -> None:
    """Probe until every subscriber is admitted, then drain the probes so each stream starts clean.

    The relay forwards only to connections it has accepted; a subscriber
    that got any probe has been, so a last probe reaches all of them.
    """
    waiting = list(subscribers)
    deadline = time.monotonic() + TIMEOUT
    n = 0
    while waiting:
        publisher.send(probe(domain, n))
        n += 1
        time.sleep(0.01)
        waiting = [s for s in waiting if s.next_message(0.001 if len(waiting) > 10 else 0.05) is None]
        assert time.monotonic() < deadline, f"{len(waiting)} subscribers were never admitted"
    last = probe(domain, n)
    publisher.send(last)
    for sub in subscribers:
        before = sub.messages_until(last)
        assert all(m[6] == PROBE_MARK for m in before), "a subscriber got something other than probes"


def assert_round_trip(domain: str, peers: list[Peer], tag: bytes) -> None:
    """Each peer publishes one message; every other peer receives exactly it, and the sender nothing."""
    for i, sender in enumerate(peers):
        sent = note(domain, tag + b" from peer %d" % i, sequence=i)
        sender.send(sent)
        for j, other in enumerate(peers):
            if j != i:
                assert other.next_message(TIMEOUT) == sent, f"peer {j} did not receive peer {i}'s message"
    for j, peer in enumerate(peers):
        assert peer.next_message(0.1) is None, f"peer {j} received a message no one sent it"


def reads_eof(sock: socket.socket, timeout: float = TIMEOUT) -> str:
    """``eof`` when the relay closed the connection; otherwise what happened instead."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(1 << 16)
    except TimeoutError:
        return f"still open after {timeout} s"
    except OSError as exc:
        return repr(exc)
    return "eof" if data == b"" else f"data {data[:40].hex()}"


# -- clients of another user -----------------------------------------------------------


class Child:
    """A forked process that runs ``work`` as ``uid``:``gid`` (no supplementary groups) and reports a dict."""

    def __init__(self, uid: int, gid: int, work: Callable[[], dict[str, object]]) -> None:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                result = work()
            except BaseException as exc:
                result = {"error": repr(exc)}
            try:
                os.write(write_end, json.dumps(result).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        self.pid = pid
        self._pipe = read_end
        self._result: dict[str, object] | None = None
        self._reaped = False

    def result(self, timeout: float = 2 * TIMEOUT) -> dict[str, object]:
        if self._result is None:
            data = b""
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._pipe], [], [], left)[0]:
                    self.kill()
                    raise AssertionError(f"the child {self.pid} reported nothing within {timeout} s")
                chunk = os.read(self._pipe, 1 << 16)
                if not chunk:
                    break
                data += chunk
            os.close(self._pipe)
            self._reap()
            self._result = json.loads(data)
        return self._result

    def kill(self) -> None:
        """Stop the child if it is still ours (once reaped, its pid may belong to another process)."""
        if not self._reaped:
            with contextlib.suppress(OSError):
                os.kill(self.pid, 9)
            self._reap()

    def _reap(self) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self._reaped = True


@contextlib.contextmanager
def connected(path: Path) -> Iterator[socket.socket]:
    """A Unix socket connected to ``path``, with the tests' timeout; closed on leaving."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        yield sock


def refused_work(path: Path) -> Callable[[], dict[str, object]]:
    """Connect and read: a refused peer sees EOF before it sends anything."""

    def work() -> dict[str, object]:
        with connected(path) as sock:
            return {"outcome": reads_eof(sock), "uid": os.getuid(), "gid": os.getgid()}

    return work


def round_trip_work(path: Path, publish: bytes, expect: bytes) -> Callable[[], dict[str, object]]:
    """Connect, publish ``publish``, then read ``len(expect)`` bytes (which the test sends once ``publish`` arrives)."""

    def work() -> dict[str, object]:
        with connected(path) as sock:
            sock.sendall(publish)
            got = b""
            try:
                while len(got) < len(expect):
                    chunk = sock.recv(len(expect) - len(got))
                    if not chunk:
                        break
                    got += chunk
            except OSError as exc:
                return {"received": got.hex(), "error": repr(exc)}
            return {"received": got.hex(), "uid": os.getuid(), "gid": os.getgid()}

    return work


@pytest.fixture
def children() -> Iterator[list[Child]]:
    yield from killed_at_teardown()


@pytest.fixture
def open_dir(short_dir: Path) -> Path:
    """The socket folder, every user may pass through it (the relay keeps the mode of a folder it did not create)."""
    os.chmod(short_dir, 0o711)
    return short_dir


def start_open(start_relay: StartRelay, open_dir: Path, domain: str, *options: str) -> RelayProcess:
    relay = start_relay(domain, *options, socket_path=open_dir / f"{domain}.sock")
    assert relay.socket_path is not None
    os.chmod(relay.socket_path, 0o666)
    return relay


# -- checks ----------------------------------------------------------------------------


def wait_refusing(relay: RelayProcess, pid: int, timeout: float = 5.0) -> str:
    """The relay's ``refusing`` line for the peer process ``pid``."""
    pattern = re.compile(rf"refusing.*\bpid={pid}\b")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in relay.lines:
            if pattern.search(line):
                return line
        time.sleep(0.01)
    raise AssertionError(f"no refusing line for pid {pid}; relay log:\n{relay.stderr}")


def assert_refused(relay: RelayProcess, child: Child, uid: int, reason: str) -> None:
    result = child.result()
    assert result.get("outcome") == "eof", f"refused peer: {result}; relay log:\n{relay.stderr}"
    line = wait_refusing(relay, child.pid)
    assert "WARNING" in line and re.search(rf"\buid={uid}\b", line) and reason in line, line


def assert_admitted(relay: RelayProcess, domain: str, root: tuple[Peer, Peer], child_of: Callable) -> None:
    """A child of another user publishes to a root subscriber and receives from a root publisher, byte for byte."""
    publisher, subscriber = root
    from_child = note(domain, b"from another user")
    to_child = note(domain, b"to another user", sequence=1)
    child = child_of(round_trip_work(relay.socket_path, from_child, to_child))
    try:
        before = subscriber.messages_until(from_child)
    except AssertionError:
        report = child.result()
        raise AssertionError(f"nothing from the child; it reports {report}; relay log:\n{relay.stderr}") from None
    assert before == [], "the subscriber got messages no one sent"
    assert publisher.next_message(TIMEOUT) == from_child
    publisher.send(to_child)
    result = child.result()
    assert result.get("received") == to_child.hex() and "error" not in result, result
    assert not [line for line in relay.lines if "refusing" in line and f"pid={child.pid} " in line], relay.stderr
    assert subscriber.next_message(TIMEOUT) == to_child  # the root subscriber gets it too
    assert subscriber.next_message(0.1) is None and publisher.next_message(0.1) is None


@pytest.fixture
def as_user(children: list[Child]) -> Callable[[int, int], Callable]:
    """``as_user(uid, gid)(work)`` forks a child that runs ``work`` with those ids."""

    def runner(uid: int, gid: int) -> Callable:
        def start(work: Callable[[], dict[str, object]]) -> Child:
            child = Child(uid, gid, work)
            children.append(child)
            return child

        return start

    return runner


def root_pair(relay: RelayProcess, domain: str, peers: Callable[[RelayProcess], Peer]) -> tuple[Peer, Peer]:
    publisher, subscriber = peers(relay), peers(relay)
    attach(domain, publisher, [subscriber])
    return publisher, subscriber


# -- access control ----------------------------------------------------------------------


def test_execution_refuses_other_users_by_default(
    start_relay: StartRelay, open_dir: Path, peers: Callable, as_user: Callable
) -> None:
    relay = start_open(start_relay, open_dir, "execution")
    publisher, subscriber = root_pair(relay, "execution", peers)

    child = as_user(NOBODY, NOBODY)(refused_work(relay.socket_path))
    assert_refused(relay, child, NOBODY, "not allowed")
    assert child.result()["uid"] == NOBODY

    # The relay's own user still publishes and subscribes, and nothing of the refused peer came through.
    sent = note("execution", b"order")
    publisher.send(sent)
    assert subscriber.messages_until(sent) == []
    assert_round_trip("execution", [publisher, subscriber], b"after the refusal")
    assert relay.proc.poll() is None


@pytest.mark.parametrize(
    ("option", "admitted", "refused"),
    [
        # Only the uid is listed: nobody gets in whatever its group; a stranger in nogroup does not.
        ("--allow-uid", (NOBODY, NOBODY), (STRANGER, NOBODY)),
        ("--allow-uid", (NOBODY, STRANGER), (STRANGER, STRANGER)),
        # Only the gid is listed: anyone in nogroup gets in; nobody in another group does not.
        ("--allow-gid", (NOBODY, NOBODY), (NOBODY, STRANGER)),
        ("--allow-gid", (STRANGER, NOBODY), (STRANGER, STRANGER)),
    ],
    ids=["uid-nobody", "uid-other-group", "gid-nobody", "gid-other-user"],
)
def test_allow_lists_admit_listed_uids_or_gids_on_execution(
    start_relay: StartRelay,
    open_dir: Path,
    peers: Callable,
    as_user: Callable,
    option: str,
    admitted: tuple[int, int],
    refused: tuple[int, int],
) -> None:
    # Root stays listed by uid so the test can talk to the relay; the lists replace the default.
    relay = start_open(start_relay, open_dir, "execution", option, str(NOBODY), "--allow-uid", str(ROOT))
    root = root_pair(relay, "execution", peers)

    assert_admitted(relay, "execution", root, as_user(*admitted))
    child = as_user(*refused)(refused_work(relay.socket_path))
    assert_refused(relay, child, refused[0], "not allowed")
    assert_round_trip("execution", list(root), b"after")


def test_allow_list_without_own_uid_refuses_the_relay_user(
    start_relay: StartRelay, open_dir: Path, as_user: Callable
) -> None:
    """A list replaces the default entirely, even the relay's own user: here only nogroup may connect."""
    relay = start_open(start_relay, open_dir, "execution", "--allow-gid", str(NOBODY))
    with connect(relay) as sock:
        assert reads_eof(sock) == "eof"
    line = wait_refusing(relay, os.getpid())
    assert f"uid={ROOT}" in line and "not allowed" in line, line

    # Two users of nogroup talk through it.
    ping, pong = note("execution", b"ping"), note("execution", b"pong", sequence=1)
    pinger = as_user(STRANGER, NOBODY)(ping_work(relay.socket_path, ping, pong))
    ponger = as_user(NOBODY, NOBODY)(pong_work(relay.socket_path, ping, pong))
    assert ponger.result() == {"got_ping": True}, (ponger.result(), relay.stderr)
    assert pinger.result() == {"got_pong": True}, (pinger.result(), relay.stderr)


def ping_work(path: Path, ping: bytes, pong: bytes) -> Callable[[], dict[str, object]]:
    """Publish ``ping`` every 50 ms (the other peer may not be admitted yet) until ``pong`` arrives."""

    def work() -> dict[str, object]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.settimeout(0.05)
            got = b""
            deadline = time.monotonic() + TIMEOUT
            while pong not in got and time.monotonic() < deadline:
                sock.sendall(ping)
                with contextlib.suppress(TimeoutError):
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        break
                    got += chunk
            return {"got_pong": pong in got}

    return work


def pong_work(path: Path, ping: bytes, pong: bytes) -> Callable[[], dict[str, object]]:
    """Answer the first ``ping`` with one ``pong``, then stay until the relay has surely read it."""

    def work() -> dict[str, object]:
        with connected(path) as sock:
            got = b""
            while ping not in got:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    return {"got_ping": False}
                got += chunk
            sock.sendall(pong)
            time.sleep(0.5)
            return {"got_ping": True}

    return work


@pytest.mark.parametrize("domain", ["market_data", "signal"])
def test_other_domains_admit_everyone_by_default(
    start_relay: StartRelay, open_dir: Path, peers: Callable, as_user: Callable, domain: str
) -> None:
    relay = start_open(start_relay, open_dir, domain)
    root = root_pair(relay, domain, peers)
    assert_admitted(relay, domain, root, as_user(NOBODY, NOBODY))
    assert_admitted(relay, domain, root, as_user(STRANGER, STRANGER))
    assert relay.find_line("refusing") is None, relay.stderr


def test_allow_list_restricts_market_data_too(
    start_relay: StartRelay, open_dir: Path, peers: Callable, as_user: Callable
) -> None:
    relay = start_open(start_relay, open_dir, "market_data", "--allow-uid", str(ROOT))
    root = root_pair(relay, "market_data", peers)
    child = as_user(NOBODY, NOBODY)(refused_work(relay.socket_path))
    assert_refused(relay, child, NOBODY, "not allowed")
    assert_round_trip("market_data", list(root), b"still")


# -- connection limit ----------------------------------------------------------------------


def test_connection_beyond_the_limit_is_refused_until_one_leaves(
    start_relay: StartRelay, peers: Callable[[RelayProcess], Peer]
) -> None:
    relay = start_relay("market_data", "--max-connections", "3")
    a, b, c = peers(relay), peers(relay), peers(relay)
    attach("market_data", a, [b, c])

    fourth = connect(relay)
    with fourth:
        assert reads_eof(fourth) == "eof"
    line = wait_refusing(relay, os.getpid())
    assert "WARNING" in line and "connection limit" in line, line
    assert_round_trip("market_data", [a, b, c], b"under the limit")

    # One leaves (the relay closes its side once it has seen the hang-up); a newcomer is admitted.
    mark = len(relay.lines)
    c.sock.shutdown(socket.SHUT_WR)
    assert reads_eof(c.sock) == "eof"
    relay.wait_line("disconnected", start=mark)
    newcomer = peers(relay)
    attach("market_data", a, [b, newcomer])
    assert_round_trip("market_data", [a, b, newcomer], b"after one left")
    refusals = [line for line in relay.lines if "refusing" in line]
    assert len(refusals) == 1, refusals


@pytest.mark.parametrize(("domain", "limit"), [("execution", 100), ("signal", 1000), ("market_data", 5000)])
def test_default_connection_limits(
    start_relay: StartRelay, peers: Callable[[RelayProcess], Peer], domain: str, limit: int
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < limit + 100:  # a descriptor per connection, and the test's own
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    relay = start_relay(domain)
    first, *others = [peers(relay) for _ in range(limit)]
    attach(domain, first, others)

    extra = connect(relay)
    with extra:
        assert reads_eof(extra) == "eof"
    line = wait_refusing(relay, os.getpid())
    assert "connection limit" in line and str(limit) in line, line
    # Every admitted connection still works.
    sent = note(domain, b"to all")
    first.send(sent)
    for i, peer in enumerate(others):
        assert peer.next_message(TIMEOUT) == sent, f"connection {i + 1} lost its stream"
    assert_round_trip(domain, [others[-1], first], b"last and first")
