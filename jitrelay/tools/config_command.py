"""``jitrelay config DOMAIN``: print, as TOML, the settings ``jitrelay run`` would use with the same options."""

from __future__ import annotations

import argparse
import sys

from jitrelay.core.config import render_config
from jitrelay.tools.options import add_target
from jitrelay.tools.relay_command import add_relay_options, relay_logic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``jitrelay config`` command line: ``run``'s, without the log options; raises nothing."""
    add_target(parser)
    add_relay_options(parser)


def run(args: argparse.Namespace) -> int:
    """Print the settings, so an operator can check or keep them as a file: 0.

    Raises ``UsageError`` for a file or a value the domain cannot take.
    """
    sys.stdout.write(render_config(relay_logic(args)))
    return 0
