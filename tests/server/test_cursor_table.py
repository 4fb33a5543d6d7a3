"""The cursor table alone: its counts and queries agree with its arrays, whatever the order of changes.

The relay answers "is anyone behind?" from the table's counts, without a look
at the arrays; a count that drifted would hold publishers or skip a cursor.
The relay's behaviour with the table is covered by the relay tests on real
sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitrelay.server.cursors import CATCHING_UP, CursorFlag, CursorMode, CursorTable, CursorTableFull


@dataclass(eq=False)
class Peer:
    """What the table reads of a connection."""

    peer: str
    fd: int = -1
    cursor_slot: int = -1


def table_with(capacity: int, n: int) -> tuple[CursorTable[Peer], list[Peer]]:
    table: CursorTable[Peer] = CursorTable(capacity)
    peers = [Peer(f"conn={i}", fd=100 + i) for i in range(n)]
    for peer in peers:
        table.add(peer)
    return table, peers


def assert_counts_match(table: CursorTable[Peer]) -> None:
    """Every count and query equals a recount from the ``mode`` and ``flags`` arrays."""
    for mode in CursorMode:
        slots = np.flatnonzero(table.mode == mode)
        assert table.count(mode) == len(slots) == table.mode_counts[mode], mode
        if mode != CursorMode.FREE:
            assert table.members(mode) == [table.connections[s] for s in slots], mode
    for flag in CursorFlag:
        slots = np.flatnonzero(table.flags & flag)
        assert table.count_flagged(flag) == len(slots), flag
        assert table.flagged(flag) == [table.connections[s] for s in slots], flag
    behind = np.flatnonzero((table.mode == CursorMode.BEHIND) | (table.mode == CursorMode.REPLAYING))
    assert table.count(*CATCHING_UP) == len(behind)
    assert table.members(*CATCHING_UP) == [table.connections[s] for s in behind]
    for slot, conn in enumerate(table.connections):
        free = conn is None
        assert (table.mode[slot] == CursorMode.FREE) == free
        assert conn is None or conn.cursor_slot == slot
        assert not free or (table.flags[slot] == 0 and table.fd[slot] == -1)
    assert table.full == (table.count(CursorMode.FREE) == 0)


def test_a_new_cursor_keeps_up_with_no_flags_and_its_descriptor() -> None:
    table, (a, b) = table_with(4, 2)
    assert (a.cursor_slot, b.cursor_slot) == (0, 1)
    assert table.mode[0] == CursorMode.KEEPING_UP and table.flags[0] == 0 and table.fd[1] == 101
    assert table.count(CursorMode.KEEPING_UP) == 2 and table.count(CursorMode.FREE) == 2
    assert_counts_match(table)


def test_a_freed_slot_is_taken_again_and_starts_clean() -> None:
    table, (a, b, c) = table_with(3, 3)
    table.set_mode(b, CursorMode.BEHIND)
    table.set_flag(b, CursorFlag.HELD)
    table.set_position(b, 1234)
    table.remove(b)
    assert b.cursor_slot == -1 and table.count(CursorMode.BEHIND) == 0 and table.count_flagged(CursorFlag.HELD) == 0
    d = Peer("conn=d", fd=7)
    assert table.add(d) == 1
    assert table.mode[1] == CursorMode.KEEPING_UP and table.flags[1] == 0 and table.position[1] == 0
    assert table.fd[1] == 7 and table.connections[1] is d
    assert_counts_match(table)


def test_adding_beyond_capacity_says_so() -> None:
    table, _ = table_with(2, 2)
    assert table.full
    with pytest.raises(CursorTableFull, match="all 2 are taken"):
        table.add(Peer("conn=late"))


def test_a_connection_without_a_slot_is_refused_by_name() -> None:
    table, (a,) = table_with(2, 1)
    table.remove(a)
    with pytest.raises(LookupError, match="conn=0 has no cursor slot"):
        table.set_mode(a, CursorMode.BEHIND)
    with pytest.raises(ValueError, match="already has cursor slot"):
        table.add(table_with(2, 1)[1][0])


def test_a_resting_cursor_follows_its_flags_and_a_catching_up_one_settles_into_them() -> None:
    table, (a,) = table_with(1, 1)
    table.set_flag(a, CursorFlag.PUBLISH_ONLY)
    assert table.mode[0] == CursorMode.PUBLISH_ONLY
    table.set_flag(a, CursorFlag.NEVER_READS)
    assert table.mode[0] == CursorMode.NOT_READING
    table.clear_flag(a, CursorFlag.NEVER_READS)
    table.clear_flag(a, CursorFlag.PUBLISH_ONLY)
    table.set_mode(a, CursorMode.BEHIND)
    table.set_flag(a, CursorFlag.GRANTED)  # granted while it catches up: still behind until it settles
    assert table.mode[0] == CursorMode.BEHIND
    table.settle(a)
    assert table.mode[0] == CursorMode.MAPPED
    table.set_mode(a, CursorMode.CLOSED)
    table.clear_flag(a, CursorFlag.GRANTED)  # a closed cursor keeps its mode
    assert table.mode[0] == CursorMode.CLOSED
    with pytest.raises(ValueError):
        table.set_mode(a, CursorMode.FREE)
    assert_counts_match(table)


OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["add", "remove", "set_mode", "settle", "set_flag", "clear_flag", "position"]),
        st.integers(0, 9),
        st.sampled_from([m for m in CursorMode if m != CursorMode.FREE]),
        st.sampled_from(list(CursorFlag)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(OPERATIONS)
def test_counts_and_queries_always_equal_a_recount(operations: list[tuple[str, int, CursorMode, CursorFlag]]) -> None:
    table: CursorTable[Peer] = CursorTable(6)
    peers = [Peer(f"conn={i}", fd=i) for i in range(10)]
    for name, i, mode, flag in operations:
        peer = peers[i]
        has_slot = peer.cursor_slot >= 0
        if name == "add":
            if has_slot:
                continue
            if table.full:
                with pytest.raises(CursorTableFull):
                    table.add(peer)
                continue
            table.add(peer)
        elif not has_slot:
            with pytest.raises(LookupError):
                table.settle(peer)
        elif name == "remove":
            table.remove(peer)
        elif name == "set_mode":
            table.set_mode(peer, mode)
        elif name == "settle":
            table.settle(peer)
        elif name == "set_flag":
            table.set_flag(peer, flag)
        elif name == "clear_flag":
            table.clear_flag(peer, flag)
        else:
            table.set_position(peer, i * 1000)
            assert table.position[peer.cursor_slot] == i * 1000
        assert_counts_match(table)
    assert sum(table.count(mode) for mode in CursorMode) == table.capacity
