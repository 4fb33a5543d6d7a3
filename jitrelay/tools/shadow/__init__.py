"""``jitrelay shadow DOMAIN --source PATH``: run jitrelay beside a Torq relay, and compare what each forwards.

The first phase of replacing a Torq site's relays: the shadow reads
everything the running (Torq) relay at ``--source`` sends, judges each whole
message with the local jitrelay relay's rules, republishes every one of them
unchanged into that relay, reads back what it forwards, and reports both
sides and whether the two streams are identical (see docs/operations.md,
"Shadow mode").

``report`` holds the figures and the comparison (pure), ``stream`` the
framing and judging of the source's bytes, ``run`` the sockets and the loop.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jitrelay.tools.options import add_byte_option, add_target, non_negative_float
from jitrelay.tools.shadow.report import ShadowReport, StreamComparison, Tally, format_report
from jitrelay.tools.shadow.run import run_shadow

__all__ = ["ShadowReport", "StreamComparison", "Tally", "add_arguments", "format_report", "run_shadow"]

REPORT_EVERY = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``jitrelay shadow`` command line, which ``run_shadow`` reads."""
    add_target(parser)  # --socket: the local jitrelay relay's
    parser.add_argument(
        "--source", type=Path, required=True, metavar="PATH", help="Unix socket of the running relay to shadow (Torq's)"
    )
    parser.add_argument(
        "--report-every",
        type=non_negative_float,
        default=REPORT_EVERY,
        metavar="SECONDS",
        help=f"print the figures so far to stderr this often; 0 never ({REPORT_EVERY:g})",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="at exit, write the final report here as JSON")
    parser.add_argument(
        "--duration", type=non_negative_float, default=0.0, metavar="S", help="stop after S seconds (0: at SIGINT)"
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="the local relay's TOML settings, so that it is judged by them"
    )
    add_byte_option(parser, "--max-payload", "the local relay's max payload, if not the domain's (or the file's)")
