"""Fixtures every layer's tests share: relays as real processes on real sockets, raw clients, a short folder.

Helpers live in ``support/``; this file only makes fixtures of them. Every
relay a test starts is killed when the test ends, whatever happened.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.clients import Clients
from support.commands import running_relay
from support.relays import RelayProcess, StartRelay

_MADE_CACHE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Keep the session's ahead-of-time kernel builds in a folder of its own, not in the user's cache.

    Relays started by the tests inherit it, so the module is built once per
    session (by whichever process needs it first) and loaded by the rest.
    """
    if "JITRELAY_CACHE_DIR" not in os.environ:
        os.environ["JITRELAY_CACHE_DIR"] = config.stash[_MADE_CACHE] = tempfile.mkdtemp(prefix="jitrelay-test-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    made = config.stash.get(_MADE_CACHE, None)
    if made:
        shutil.rmtree(made, ignore_errors=True)
        del os.environ["JITRELAY_CACHE_DIR"]


@pytest.fixture
def clients() -> Iterator[Clients]:
    """The raw sockets and readers of one end-to-end test (``support.clients.Clients``), closed at teardown."""
    made = Clients()
    yield made
    made.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A fresh folder under /tmp: pytest's tmp_path can exceed the 107-byte limit of a socket path."""
    path = Path(tempfile.mkdtemp(prefix="jr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_relay(short_dir: Path) -> Iterator[StartRelay]:
    """Start relays with ``start_relay(domain, *options, socket_path=..., ready=True)``; all are killed at teardown.

    The socket defaults to ``<short_dir>/<domain>.sock``. With ``pass_socket=False``
    the command line has no ``--socket`` (the relay then picks its path from
    ``JITRELAY_SOCKET_DIR``) and ``socket_path`` is where the test expects it.
    """
    relays: list[RelayProcess] = []

    def start(
        domain: str = "market_data",
        *options: str,
        socket_path: Path | None = None,
        pass_socket: bool = True,
        env: dict[str, str] | None = None,
        ready: bool = True,
        umask: int = -1,
    ) -> RelayProcess:
        path = socket_path or short_dir / f"{domain}.sock"
        relay = RelayProcess(domain, path, options, env=env, umask=umask, pass_socket=pass_socket)
        relays.append(relay)
        if ready:
            relay.wait_ready()
        return relay

    yield start
    for relay in relays:
        relay.kill()


@pytest.fixture(scope="module")
def market_relay() -> Iterator[RelayProcess]:
    """A market-data relay a whole module shares (``support.commands.running_relay``)."""
    with running_relay("market_data") as relay:
        yield relay


@pytest.fixture(scope="module")
def signal_relay() -> Iterator[RelayProcess]:
    """A signal relay a whole module shares."""
    with running_relay("signal") as relay:
        yield relay
