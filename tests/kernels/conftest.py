"""Fixtures of the kernel tests that do I/O: the send loop's and the read loop's socket pairs."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """A list a test adds its socket pairs to; all are closed at teardown."""
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()
