"""Command-line pieces every command shares: argparse value types and the options relay commands take.

Each command declares its own options (``add_arguments`` beside the code
that reads them) and ``jitrelay.cli`` makes them subcommands; the commands
take these from here.
"""

from __future__ import annotations

import argparse
import datetime
import re
from pathlib import Path

from jitrelay.core.config import parse_byte_count
from jitrelay.core.domains import LOGICS, SOCKET_DIR_ENV

# Bytes per synthetic message, header included, of ``jitrelay pub`` and ``jitrelay bench``: W1's message.
MESSAGE_SIZE = 71


def byte_count(text: str) -> int:
    """``4194304``, ``4MiB``, ``64k``: a non-negative number of bytes."""
    try:
        return parse_byte_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a non-negative integer: {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"not a non-negative number: {text!r}")
    return value


def source_id(text: str) -> int:
    value = non_negative(text)
    if value > 255:
        raise argparse.ArgumentTypeError(f"source must fit in one byte (0..255), not {value}")
    return value


def byte_list(text: str) -> frozenset[int]:
    """``1,2,40``: a set of byte values, for the TLV type and source filters."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isascii() and part.isdigit() and int(part) <= 255 for part in parts):
        raise argparse.ArgumentTypeError(f"not a comma-separated list of bytes (0..255): {text!r}")
    return frozenset(int(part) for part in parts)


_ISO_TIME = re.compile(
    r"(\d{4}-\d{2}-\d{2})(?:[T ](\d{2}:\d{2}(?::\d{2})?)(?:[.,](\d{1,9}))?)?\s*(Z|[+-]\d{2}:?\d{2})?", re.IGNORECASE
)


def time_ns_arg(text: str) -> int:
    """Nanoseconds since the epoch, given as such or as ISO-8601 (``2026-11-24T21:00:00.5Z``; no zone means UTC)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    match = _ISO_TIME.fullmatch(text)
    if match:
        day, clock, fraction, zone = match.groups()
        zone = "+00:00" if zone is None or zone.upper() == "Z" else zone
        if len(zone) == 5:
            zone = zone[:3] + ":" + zone[3:]
        try:
            moment = datetime.datetime.fromisoformat(f"{day}T{clock or '00:00'}{zone}")
        except ValueError:
            moment = None
        if moment is not None:
            seconds = (moment - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)) // datetime.timedelta(
                seconds=1
            )
            return seconds * 1_000_000_000 + int((fraction or "").ljust(9, "0"))
    raise argparse.ArgumentTypeError(
        f"not a time: {text!r} (nanoseconds since the epoch, or ISO-8601 such as 2026-11-24T21:00:00Z)"
    )


def add_target(parser: argparse.ArgumentParser) -> None:
    """The DOMAIN argument and --socket option every relay command takes."""
    domains = list(LOGICS)
    parser.add_argument("domain", choices=domains, metavar="DOMAIN", help=f"one of: {', '.join(domains)}")
    parser.add_argument("--socket", type=Path, help=f"Unix socket path (default: ${SOCKET_DIR_ENV}/DOMAIN.sock)")


def add_byte_option(parser: argparse.ArgumentParser, flag: str, help: str, default: int | None = None) -> None:
    """An option taking a byte count, such as ``--max-payload 64KiB``."""
    parser.add_argument(flag, type=byte_count, default=default, metavar="BYTES", help=help)


def add_metrics_port(parser: argparse.ArgumentParser) -> None:
    """--metrics-port, of the relay and the bridge."""
    parser.add_argument(
        "--metrics-port", type=non_negative, metavar="PORT", help="serve Prometheus metrics on 127.0.0.1:PORT"
    )
