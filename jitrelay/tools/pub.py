"""``jitrelay pub DOMAIN``: publish synthetic messages, paced or at full speed, and say how fast they went."""

from __future__ import annotations

import argparse
import sys
import time

from jitrelay import kernels
from jitrelay.client import Publisher
from jitrelay.core import protocol
from jitrelay.core.domains import LOGICS
from jitrelay.core.units import MiB
from jitrelay.tools.options import MESSAGE_SIZE, add_target, non_negative, non_negative_float, source_id
from jitrelay.tools.usage import UsageError

PUB_BATCH_BYTES = 1 * MiB  # what one unpaced ``jitrelay pub`` write holds at most, unless --batch says


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``jitrelay pub`` command line, which ``run`` reads; raises nothing."""
    add_target(parser)
    parser.add_argument("--count", type=non_negative, default=1000, help="messages to send; 0 sends until SIGINT")
    parser.add_argument("--rate", type=non_negative_float, default=0.0, help="messages per second; 0 for full speed")
    parser.add_argument(
        "--size", type=non_negative, default=MESSAGE_SIZE, help=f"bytes per message, header included ({MESSAGE_SIZE})"
    )
    parser.add_argument("--source", type=source_id, default=0, help="source id written in each header")
    parser.add_argument(
        "--batch",
        type=non_negative,
        default=0,
        help=f"messages per write (default: 1 when paced, else as many as fit in {PUB_BATCH_BYTES // MiB} MiB)",
    )
    parser.add_argument(
        "--reconnect",
        action="store_true",
        help="reconnect to a relay that goes away and go on, with the client's default backoff (without it, the "
        "end of the relay ends the command with an error)",
    )


def run(args: argparse.Namespace) -> int:
    """Publish ``--count`` messages (or until SIGINT), to load a relay or check it is there: 0.

    Raises ``UsageError`` for a size no message can have, and
    ``RelayConnectionError`` when the relay cannot be reached.
    """
    domain_id = LOGICS[args.domain].domain_id
    size = args.size
    try:
        record = protocol.synthetic_record(domain_id, size)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    batch_len = args.batch or (1 if args.rate else max(1, PUB_BATCH_BYTES // size))
    if args.count:
        batch_len = min(batch_len, args.count)
    batch = protocol.build_batch(domain_id, batch_len, [record], source=args.source)
    kernels.stamp_batch(batch[:size], size, 0, 0)  # compile (or load) the kernel before the clock starts
    sent = 0
    with Publisher(args.domain, args.socket, source=args.source, reconnect=args.reconnect) as publisher:
        started = time.monotonic()
        try:
            while not args.count or sent < args.count:
                n = batch_len if not args.count else min(batch_len, args.count - sent)
                if args.rate:
                    delay = started + sent / args.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                chunk = batch[: n * size]
                kernels.stamp_batch(chunk, size, sent, time.time_ns())
                publisher.publish_batch(chunk)
                sent += n
        except KeyboardInterrupt:
            pass
        elapsed = time.monotonic() - started
    rate = sent / elapsed if elapsed > 0 else 0.0
    print(
        f"jitrelay pub {args.domain}: {sent} messages of {size} bytes in {elapsed:.3f} s ({rate:,.0f} msg/s)",
        file=sys.stderr,
    )
    return 0
