"""``jitrelay audit PATH``: print the messages an execution journal holds, as ``sub`` prints a live stream."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from jitrelay.core import protocol
from jitrelay.tools.options import time_ns_arg
from jitrelay.tools.output import stdout_may_close
from jitrelay.tools.tap import format_message, message_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``jitrelay audit`` command line, which ``run`` reads; raises nothing."""
    parser.add_argument("path", type=Path, metavar="PATH", help="a journal segment, a journal folder, or a name prefix")
    parser.add_argument("--json", action="store_true", help="one JSON object per message instead of a line of text")
    parser.add_argument(
        "--since", type=time_ns_arg, metavar="T", help="messages stamped at or after T (ns or ISO-8601)"
    )
    parser.add_argument("--until", type=time_ns_arg, metavar="T", help="messages stamped before T")
    parser.add_argument(
        "--follow",
        action="store_true",
        help="keep printing the messages appended to a journal being written, until SIGINT or SIGTERM",
    )


def run(args: argparse.Namespace) -> int:
    """Print the journal's messages, to see what the execution relay forwarded: 0, or 1 on one it cannot read.

    A corrupt or unreadable journal is reported on stderr, not raised; a
    reader that closes stdout early ends the command quietly.
    """
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="jitrelay audit: %(message)s")
    try:
        messages = _messages(args)
    except ValueError as exc:
        print(f"jitrelay audit: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        print(f"jitrelay audit: {reason}", file=sys.stderr)
        return 1
    show = message_json if args.json else format_message
    try:
        with stdout_may_close():
            for message in messages:
                sys.stdout.write(show(message) + "\n")
            sys.stdout.flush()
    except protocol.ProtocolError as exc:
        sys.stdout.flush()
        print(f"jitrelay audit: corrupt journal: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"jitrelay audit: cannot read {args.path}: {exc}", file=sys.stderr)
        return 1
    return 0


def _messages(args: argparse.Namespace) -> Iterator[protocol.Message]:
    """The journal's messages; with ``--follow``, then those appended later, until SIGINT or SIGTERM."""
    from jitrelay.server.journal import read_journal  # the journal reader loads only for this command

    if not args.follow:
        return read_journal(args.path, since_ns=args.since, until_ns=args.until)
    from jitrelay.server.journal_follow import follow_journal

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return follow_journal(args.path, stop.is_set, args.since, args.until, idle=sys.stdout.flush)
