"""What a Python user would pick instead of a relay: a pyzmq XSUB/XPUB proxy.

Publishers connect PUB sockets to ``--xsub``, subscribers connect SUB sockets
to ``--xpub``; ``zmq.proxy`` moves every message (one frame each) from one
side to the other and subscriptions back, in libzmq's own threads.

``--hwm 0`` makes the proxy's send and receive high-water marks unlimited, so
it drops nothing (and its memory grows instead while a subscriber lags).
Without ``--hwm`` the sockets keep libzmq's defaults (1000 messages), and
PUB/XPUB sockets silently drop what does not fit: the figure to report is how
much that loses.

    python -m jitrelay.tools.bench.zmq_proxy --xsub ipc:///tmp/xsub --xpub ipc:///tmp/xpub --hwm 0
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys

import zmq


def main(argv: list[str] | None = None) -> int:
    """``python -m jitrelay.tools.bench.zmq_proxy --xsub E --xpub E``: proxy until SIGTERM; 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xsub", required=True, help="endpoint publishers connect to, e.g. ipc:///tmp/xsub")
    parser.add_argument("--xpub", required=True, help="endpoint subscribers connect to, e.g. ipc:///tmp/xpub")
    parser.add_argument("--hwm", type=int, help="send and receive high-water mark of both sockets; 0 is unlimited")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a clean exit: the bench stops it with SIGTERM
    ctx = zmq.Context()
    xsub = ctx.socket(zmq.XSUB)
    xpub = ctx.socket(zmq.XPUB)
    if args.hwm is not None:
        for sock in (xsub, xpub):
            sock.setsockopt(zmq.SNDHWM, args.hwm)
            sock.setsockopt(zmq.RCVHWM, args.hwm)
    xsub.bind(args.xsub)
    xpub.bind(args.xpub)
    hwm = "default" if args.hwm is None else args.hwm
    print(f"zmq proxy listening on {args.xsub} -> {args.xpub} (hwm {hwm})", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt, zmq.ContextTerminated):
        zmq.proxy(xsub, xpub)  # returns only when the context is terminated
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
