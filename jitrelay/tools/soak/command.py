"""``jitrelay soak``: its command line, and running it to a printed report and an exit code."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from jitrelay.tools.soak.controller import Soak
from jitrelay.tools.soak.options import add_arguments, options
from jitrelay.tools.soak.relay import SoakError
from jitrelay.tools.soak.report import format_report

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    """The ``jitrelay soak`` command: 0 when every message checked out and the relay survived, else 1.

    Raises ``UsageError`` when the command line asks for something impossible.
    """
    opts = options(args)
    soak = Soak(opts)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = soak.run()
    except SoakError as exc:
        print(f"jitrelay soak: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_report(report))
    if opts.json_path is not None:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        opts.json_path.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends a soak as Ctrl-C does: stop, clean up, report."""
    raise KeyboardInterrupt
