"""How the commands write: log lines on stderr, and a stdout that may be closed early.

``add_log_options`` and ``configure_logging`` are the --log-level and
--log-format of the long-running commands (``run``, ``bridge``);
``stdout_may_close`` is what every command that prints messages does when its
reader goes away, as ``| head`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import sys
from collections.abc import Iterator

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
LOG_LEVEL = "INFO"  # the default of --log-level
LOG_FORMAT = LOG_FORMATS[0]  # and of --log-format


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """The --log-level and --log-format of the long-running commands, read by ``configure_logging``; raises nothing."""
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=LOG_LEVEL)
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=LOG_FORMAT,
        help=f"text lines, or one JSON object per line ({LOG_FORMAT})",
    )


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line, for log shippers that should not parse text."""

    def __init__(self, domain: str) -> None:
        super().__init__()
        self.domain = domain

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON object, its exception (if any) as text; raises nothing."""
        moment = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        entry = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "domain": self.domain,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(args: argparse.Namespace) -> None:
    """Log to stderr at ``--log-level`` in ``--log-format``; numba's own chatter only from WARNING up.

    Reads ``args.domain`` for the JSON lines; raises nothing.
    """
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JsonLogFormatter(args.domain))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level, handlers=[handler])
    logging.getLogger("numba").setLevel(max(logging.WARNING, logging.getLogger().level))


@contextlib.contextmanager
def stdout_may_close() -> Iterator[None]:
    """End the block quietly when stdout is closed under it, as by ``| head``: a reader that has enough is no error.

    Stdout is then pointed at /dev/null, so that what is still printed, and
    the flush at exit, go nowhere instead of failing again. Catches only
    ``BrokenPipeError``; anything else raised in the block passes through.
    """
    try:
        yield
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
