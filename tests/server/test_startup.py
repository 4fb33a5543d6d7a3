"""End-to-end: a starting relay accepts no connection it cannot serve, and starts only in folders it can trust.

The relay claims its socket path first (a second relay is refused at once),
then loads its kernels, opens its journal and binds its TCP listeners, and
only then listens on all of them. A client that connects meanwhile is refused
and retries; once one connection is accepted, it is served, and every TCP
listener accepts too.

The trust tests use a real other user (nobody, 65534) as owner of the folder,
as the access tests do: the suite runs as root.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.relays import StartRelay, relay_environ

from jitrelay.core.protocol import build_message
from jitrelay.kernels import build

NOBODY = 65534
MESSAGE = build_message(1, [(1, b"served")], sequence=1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _try_unix(path: Path) -> socket.socket | None:
    """A connected socket, or None when the relay refuses (or has not bound yet): it must answer at once."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return None
        raise
    return sock


def _served(subscriber: socket.socket, path: Path, within: float) -> bool:
    """True when a message published on a second connection reaches ``subscriber`` within ``within`` seconds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as publisher:
        publisher.settimeout(within)
        publisher.connect(str(path))
        subscriber.settimeout(0.05)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            publisher.sendall(MESSAGE)
            try:
                return subscriber.recv(len(MESSAGE), socket.MSG_WAITALL) == MESSAGE
            except TimeoutError:
                continue
    return False


def test_a_client_connecting_during_a_slow_start_is_refused_until_it_is_served(
    start_relay: StartRelay, short_dir: Path, tmp_path: Path
) -> None:
    # A forced slow start: a kernel build at run time (empty cache folder), or numba's JIT
    # compiling from nothing when the package brought its own module.
    slow = {"JITRELAY_CACHE_DIR": str(tmp_path / "cache")}
    if build.packaged_path().exists():
        slow = {"JITRELAY_KERNELS": "jit", "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    relay = start_relay("market_data", env=slow, ready=False)
    assert relay.socket_path is not None
    refused = 0
    announced_while_refused = False
    deadline = time.monotonic() + 120
    while (sock := _try_unix(relay.socket_path)) is None:
        refused += 1
        announced_while_refused |= relay.find_line("building the kernels now") is not None
        assert relay.alive() and time.monotonic() < deadline, relay.stderr
        time.sleep(0.01)
    with sock:
        assert _served(sock, relay.socket_path, within=2.0), f"accepted but not served; log:\n{relay.stderr}"
    assert refused > 10, "the start was not slow enough to test anything"
    if "JITRELAY_CACHE_DIR" in slow:
        assert announced_while_refused, f"the build was announced only after it ended; log:\n{relay.stderr}"
    relay.wait_ready(10)


def test_the_tcp_listener_accepts_as_soon_as_the_unix_socket_does(start_relay: StartRelay, short_dir: Path) -> None:
    for attempt in range(12):
        port = _free_port()
        path = short_dir / f"race{attempt}.sock"
        relay = start_relay("market_data", "--listen", f"tcp://127.0.0.1:{port}", socket_path=path, ready=False)
        deadline = time.monotonic() + 60
        while (sock := _try_unix(path)) is None:
            assert relay.alive() and time.monotonic() < deadline, relay.stderr
            time.sleep(0.002)
        with sock, socket.create_connection(("127.0.0.1", port), timeout=1.0):
            pass  # refused would raise: the TCP listener must be up by now
        assert relay.stop() == 0


def test_a_second_relay_is_refused_at_once_while_the_first_is_still_starting(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    first = start_relay("market_data", env={"JITRELAY_KERNELS": "jit", "NUMBA_CACHE_DIR": str(tmp_path)}, ready=False)
    assert first.socket_path is not None
    deadline = time.monotonic() + 30
    while not first.socket_path.exists():
        assert first.alive() and time.monotonic() < deadline, first.stderr
        time.sleep(0.005)
    second = start_relay("market_data", socket_path=first.socket_path, ready=False)
    assert second.wait_exit(30) == 1
    assert f"another relay is already running on {first.socket_path}" in second.stderr
    assert first.find_line("relay listening on") is None, "the first relay was no longer starting"
    first.wait_ready(60)


# -- folders it can trust -----------------------------------------------------------------


def _run(socket_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jitrelay", "run", "market_data", "--socket", str(socket_path)],
        capture_output=True,
        text=True,
        env=relay_environ(env),
        timeout=120,
    )


def test_a_socket_folder_of_another_user_is_refused(short_dir: Path) -> None:
    folder = short_dir / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, NOBODY, NOBODY)
    done = _run(folder / "market_data.sock")

    assert done.returncode == 2, done.stderr
    assert f"the socket folder {folder} belongs to another user" in done.stderr
    assert f"(uid {NOBODY})" in done.stderr and "mode 0700" in done.stderr and "choose a folder" in done.stderr
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o757], ids=["0777", "sticky 1777", "0757"])
def test_a_socket_folder_others_can_write_is_refused(short_dir: Path, mode: int) -> None:
    folder = short_dir / "open"
    folder.mkdir()
    os.chmod(folder, mode)
    done = _run(folder / "market_data.sock")

    assert done.returncode == 2, done.stderr
    assert f"the socket folder {folder} is writable by others" in done.stderr
    assert f"mode {mode:04o}" in done.stderr and f"chmod 770 {folder}" in done.stderr


def test_a_socket_folder_group_writable_by_a_foreign_group_is_refused(short_dir: Path) -> None:
    folder = short_dir / "group"
    folder.mkdir()
    os.chown(folder, -1, NOBODY)
    os.chmod(folder, 0o770)
    done = _run(folder / "market_data.sock")

    assert done.returncode == 2, done.stderr
    assert f"the socket folder {folder} is writable by its group" in done.stderr


def test_a_socket_folder_that_is_a_symbolic_link_is_refused(short_dir: Path) -> None:
    (short_dir / "real").mkdir()
    (short_dir / "link").symlink_to(short_dir / "real")
    done = _run(short_dir / "link" / "market_data.sock")

    assert done.returncode == 2, done.stderr
    assert f"the socket folder {short_dir / 'link'} is a symbolic link" in done.stderr


def test_the_relay_starts_in_the_0770_folder_it_made_and_in_a_root_owned_0755_one(
    start_relay: StartRelay, short_dir: Path
) -> None:
    made = start_relay("market_data", socket_path=short_dir / "made" / "market_data.sock")
    assert oct((short_dir / "made").stat().st_mode & 0o7777) == "0o770"
    made.stop()
    os.chmod(short_dir, 0o755)
    start_relay("signal", socket_path=short_dir / "signal.sock")


needs_cache = pytest.mark.skipif(
    build.packaged_path().exists(), reason="the package brought its module: the cache folder is not used"
)


@needs_cache
@pytest.mark.parametrize("how", ["owned by nobody", "writable by others"])
def test_a_kernel_cache_folder_someone_else_can_write_is_refused(short_dir: Path, tmp_path: Path, how: str) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    if how == "owned by nobody":
        os.chown(cache, NOBODY, NOBODY)
    else:
        os.chmod(cache, 0o777)
    done = _run(short_dir / "market_data.sock", JITRELAY_CACHE_DIR=str(cache))

    assert done.returncode == 2, done.stderr
    assert f"the kernel cache folder {cache}" in done.stderr and "refusing to start" in done.stderr
    assert ("belongs to another user" if how == "owned by nobody" else "writable by others") in done.stderr
    assert not (short_dir / "market_data.sock").exists()
    assert [path.name for path in cache.iterdir()] == []  # nothing built, nothing loaded


@needs_cache
def test_the_kernels_command_refuses_an_untrusted_cache_folder_with_exit_2(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, NOBODY, NOBODY)
    done = subprocess.run(
        [sys.executable, "-m", "jitrelay", "kernels"],
        capture_output=True,
        text=True,
        env=relay_environ({"JITRELAY_CACHE_DIR": str(cache)}),
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert f"the kernel cache folder {cache} belongs to another user" in done.stderr
