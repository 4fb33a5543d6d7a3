"""How much of what the relay wrote to a Unix socket its peer has not read yet, from the kernel.

The relay must tell a publisher that never reads its socket (all of Torq's
services) from a subscriber that reads, slowly, without any help from the
client. The peer's receive queue says it: if the bytes waiting there are all
the bytes the relay ever wrote to that connection, the peer has read none.

``SIOCOUTQ`` on the relay's end cannot say it for Unix sockets: Linux answers
with the send buffer's memory accounting (each skb's truesize, overhead
included), which a partial read does not change. The socket diagnostics
interface (``NETLINK_SOCK_DIAG``, ``unix_diag``) can: asked for our socket it
names the peer's inode, and asked for the peer it gives ``udiag_rqueue``, the
exact bytes still unread in its receive queue. Two netlink round trips, made
only when the slow policy is about to act on a connection that has published.

A kernel without ``unix_diag`` answers with an error: the caller then cannot
judge and keeps the slow policy as it is. TCP is not judged at all: its
``SIOCOUTQ`` counts unacknowledged bytes, which says nothing about what the
application on the other side read.
"""

from __future__ import annotations

import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
UDIAG_SHOW_PEER = 0x04
UDIAG_SHOW_RQLEN = 0x10
UNIX_DIAG_PEER = 2
UNIX_DIAG_RQLEN = 4
NO_COOKIE = 0xFFFFFFFF
_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_REQUEST = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, inode, show, cookie[2]
_MESSAGE_SIZE = 16  # struct unix_diag_msg: family, type, state, pad, inode, cookie[2]
_ATTRIBUTE = struct.Struct("=HH")
TIMEOUT = 1.0


class Unjudgeable(OSError):
    """The kernel cannot say what the peer read (no ``unix_diag``, or the peer is gone)."""


def _ask(nl: socket.socket, inode: int, show: int) -> dict[int, bytes]:
    """The attributes the kernel gives for the Unix socket ``inode``."""
    request = _REQUEST.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode, show, NO_COOKIE, NO_COOKIE)
    nl.send(_NLMSG.pack(_NLMSG.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + request)
    reply = nl.recv(1 << 16)
    length, kind = _NLMSG.unpack_from(reply)[:2]
    if kind == NLMSG_ERROR:
        errno = -struct.unpack_from("=i", reply, _NLMSG.size)[0]
        raise Unjudgeable(errno, f"sock_diag on inode {inode}: {os.strerror(errno)}")
    attributes, at = {}, _NLMSG.size + _MESSAGE_SIZE
    while at + _ATTRIBUTE.size <= min(length, len(reply)):
        size, kind = _ATTRIBUTE.unpack_from(reply, at)
        if size < _ATTRIBUTE.size:
            break
        attributes[kind] = reply[at + _ATTRIBUTE.size : at + size]
        at += (size + 3) & ~3
    return attributes


def peer_unread_bytes(fd: int) -> int:
    """Bytes the peer of the connected Unix stream socket ``fd`` has not read yet; ``Unjudgeable`` if unknown."""
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    except OSError as exc:
        raise Unjudgeable(exc.errno, f"no socket diagnostics: {exc}") from exc
    with nl:
        nl.settimeout(TIMEOUT)
        mine = _ask(nl, os.fstat(fd).st_ino, UDIAG_SHOW_PEER)
        if UNIX_DIAG_PEER not in mine:
            raise Unjudgeable(0, "the socket has no peer")
        (peer,) = struct.unpack("=I", mine[UNIX_DIAG_PEER][:4])
        theirs = _ask(nl, peer, UDIAG_SHOW_RQLEN)
        if UNIX_DIAG_RQLEN not in theirs:
            raise Unjudgeable(0, "no receive queue length for the peer")
        return struct.unpack("=II", theirs[UNIX_DIAG_RQLEN][:8])[0]
