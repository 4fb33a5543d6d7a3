"""``jitrelay sub DOMAIN``: print the messages a relay forwards, as text or JSON, or count them.

One loop serves both ways of subscribing: batch by batch as they arrive, or,
with ``--positions`` or ``--from``, one message at a time, so that the
position printed on exit is exact and gaps are reported as they come.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from collections.abc import Iterator

import numpy as np

from jitrelay import kernels
from jitrelay.client import Subscriber
from jitrelay.core import protocol
from jitrelay.tools.options import add_target, byte_list, non_negative
from jitrelay.tools.output import stdout_may_close
from jitrelay.tools.tap import MessageFilter, format_message, message_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``jitrelay sub`` command line, which ``run`` reads; raises nothing."""
    add_target(parser)
    parser.add_argument(
        "--count", type=non_negative, default=0, help="stop after this many messages pass the filters (0: never)"
    )
    parser.add_argument("--count-only", action="store_true", help="print only the number of messages received")
    parser.add_argument("--json", action="store_true", help="one JSON object per message instead of a line of text")
    parser.add_argument(
        "--types",
        type=byte_list,
        metavar="T,T",
        help="subscribe to messages with a record of one of these TLV types (filtered by the relay)",
    )
    parser.add_argument(
        "--sources", type=byte_list, metavar="S,S", help="subscribe to messages from one of these sources"
    )
    parser.add_argument(
        "--from",
        dest="resume_from",
        type=position_arg,
        metavar="POSITION",
        help="start after this position (EPOCH:OFFSET:MESSAGE, as printed on exit); implies --positions",
    )
    parser.add_argument(
        "--positions",
        action="store_true",
        help="ask the relay for positions: report gaps as they come and the position reached on exit",
    )
    parser.add_argument(
        "--shm",
        action="store_true",
        help="read the relay's log from shared memory (a local subscriber: no send per message by the relay)",
    )
    parser.add_argument(
        "--reconnect",
        action="store_true",
        help="reconnect to a relay that goes away, with the client's default backoff (without it, the end of the "
        "relay ends the command); with --positions, resume where it stood",
    )


def position_arg(text: str) -> protocol.Position:
    """``EPOCH:OFFSET:MESSAGE``, as ``sub`` prints on exit; raises ``argparse.ArgumentTypeError`` for anything else."""
    try:
        return protocol.Position.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Print (or count) what the relay forwards until ``--count``, SIGINT or the relay's end: 0.

    Raises ``RelayConnectionError`` when the relay cannot be reached and
    ``protocol.ProtocolError`` for a stream that stops making sense; a reader
    that closes stdout early ends the command quietly.
    """
    positioned = args.resume_from is not None or args.positions
    keep = MessageFilter(args.types, args.sources)
    show = functools.partial(message_json if args.json else format_message, names=True)
    only_count = args.count_only and not keep.active  # counting alone needs no decoding
    received = 0
    subscriber: Subscriber | None = None
    gaps = 0
    try:
        with stdout_may_close():
            subscriber = Subscriber(
                args.domain,
                args.socket,
                tlv_types=args.types,
                sources=args.sources,
                positions=positioned,
                resume_from=args.resume_from,
                shared_memory=args.shm,
                reconnect=args.reconnect,
            )
            with subscriber:
                how = ", reading its log from shared memory" if args.shm else ""
                print(
                    f"jitrelay sub: connected to the {args.domain} relay at {subscriber.socket_path}{how}",
                    file=sys.stderr,
                )
                for batch in _one_at_a_time(subscriber) if positioned else subscriber.batches():
                    if positioned:
                        gaps = _report_gaps(subscriber, gaps)
                    left = args.count - received if args.count else None
                    if only_count:
                        messages = kernels.frame(batch)[0]
                        count = messages if left is None else min(messages, left)
                    else:
                        shown = list(itertools.islice(_kept(batch, keep), left))
                        count = len(shown)
                        if shown and not args.count_only:
                            sys.stdout.write("\n".join(show(m) for m in shown) + "\n")
                            sys.stdout.flush()
                    received += count
                    if args.count and received >= args.count:
                        break
    except KeyboardInterrupt:
        pass
    if positioned and subscriber is not None:
        _report_gaps(subscriber, gaps)
    if args.count_only:
        print(received)
    if positioned and subscriber is not None and subscriber.position is not None:
        print(
            f"jitrelay sub: position {subscriber.position} (resume with --from {subscriber.position})", file=sys.stderr
        )
    return 0


def _one_at_a_time(subscriber: Subscriber) -> Iterator[np.ndarray]:
    """Each message as a batch of its own, so that ``subscriber.position`` stands right after the last one shown."""
    for view in subscriber:
        yield np.frombuffer(view.raw, dtype=np.uint8)


def _kept(batch: np.ndarray, keep: MessageFilter) -> Iterator[protocol.Message]:
    """The batch's messages that ``keep`` lets through, decoded."""
    return (message for message in protocol.decode_messages(batch.data) if keep.keeps(message))


def _report_gaps(subscriber: Subscriber, reported: int) -> int:
    """Say on stderr what the gaps after the first ``reported`` mean; how many are reported now."""
    for gap in subscriber.gaps[reported:]:
        print(f"jitrelay sub: {_describe_gap(gap)}", file=sys.stderr)
    return len(subscriber.gaps)


def _describe_gap(gap: protocol.Gap) -> str:
    if gap.reason == protocol.GAP_UNKNOWN_EPOCH:
        return "the relay has restarted since that position; what was missed is not known"
    return f"gap: {gap.messages} messages ({gap.bytes} bytes) missed"
