"""The ``jitrelay`` command: its table of subcommands, and the exit code of the one on the command line.

Each subcommand is a module of ``jitrelay.tools`` that declares its options
(``add_arguments``) beside the code that reads them (``run``); this module
holds only the table that names them, the parser built from it, and what a
failure means as an exit code. A subcommand's module is imported, for its
options as for its run, only when that subcommand is on the command line.

``main`` returns the exit code instead of exiting, so tests and other tools can
call it: 0 for success, 1 when the relay cannot be reached or started, 2 for a
bad command line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from jitrelay import __version__
from jitrelay.client import RelayConnectionError
from jitrelay.core import protocol
from jitrelay.core.folders import UntrustedFolder
from jitrelay.tools.usage import UsageError


class Command(NamedTuple):
    """One subcommand: its name, its line in the command list, and the module of ``jitrelay.tools`` behind it.

    ``module`` declares the options (``add_arguments``) and runs the command
    (``run``), unless ``runs`` names another function as ``module:function``.
    """

    name: str
    help: str
    module: str
    runs: str | None = None


COMMANDS = (
    Command("run", "run the relay of one domain until SIGINT or SIGTERM", "jitrelay.tools.relay_command"),
    Command(
        "config",
        "print, as TOML, the configuration `jitrelay run` would use with the same options",
        "jitrelay.tools.config_command",
    ),
    Command("pub", "publish synthetic messages", "jitrelay.tools.pub"),
    Command("sub", "print the messages a relay forwards", "jitrelay.tools.sub"),
    Command(
        "stats",
        "print a running relay's or bridge's counters as a table",
        "jitrelay.tools.stats",
        runs="jitrelay.tools.stats:run_stats",
    ),
    Command(
        "bridge",
        "join this host's relay of one domain to the other hosts' through a NATS cluster",
        "jitrelay.tools.bridge_command",
    ),
    Command(
        "bench",
        "measure the relay against the raw-bytes forwarder and pyzmq on the workloads of docs/benchmarks.md",
        "jitrelay.tools.bench",
    ),
    Command(
        "kernels",
        "build the compiled kernels if needed, and say which build runs (exit 1 on a fallback)",
        "jitrelay.tools.kernels_command",
    ),
    Command("audit", "print the messages an execution journal (or a capture) holds", "jitrelay.tools.audit"),
    Command(
        "record",
        "capture a relay's stream to disk, each batch with its receive time, across relay restarts",
        "jitrelay.tools.record",
    ),
    Command(
        "replay",
        "publish a capture into a relay, paced by its receive times or as fast as possible",
        "jitrelay.tools.replay",
    ),
    Command(
        "soak",
        "run a relay under load, churn, stalls and SIGKILLs, and verify every message delivered",
        "jitrelay.tools.soak",
    ),
    Command(
        "shadow",
        "run beside a running (Torq) relay: republish its stream into this relay and compare the two",
        "jitrelay.tools.shadow",
        runs="jitrelay.tools.shadow:run_shadow",
    ),
)


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser whose options ``declare`` adds the first time it is used (parsing, help or usage)."""

    def __init__(self, *args: Any, declare: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._declare = declare

    def _declared(self) -> None:
        declare, self._declare = self._declare, None
        if declare is not None:
            declare(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        """argparse's, with the options declared first; raises ``SystemExit`` as argparse does."""
        self._declared()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        """argparse's, with the options declared first; raises nothing."""
        self._declared()
        return super().format_usage()

    def format_help(self) -> str:
        """argparse's, with the options declared first; raises nothing."""
        self._declared()
        return super().format_help()


def tool_arguments(module: str) -> Callable[[argparse.ArgumentParser], None]:
    """Declare a subcommand's options with ``add_arguments`` of the tool ``module``, imported only then.

    Importing only on use keeps ``jitrelay --help`` and every other command
    from loading what one command needs (nats-py, the benchmark's baselines).
    Raises ``ImportError`` when the declaring parser is used and the module is missing.
    """

    def declare(parser: argparse.ArgumentParser) -> None:
        importlib.import_module(module).add_arguments(parser)

    return declare


def handler(command: Command) -> Callable[[argparse.Namespace], int]:
    """What runs ``command``: ``run`` of its module, or the function ``runs`` names; imported only when called.

    Raises ``ImportError`` (when called) for a module that is not there.
    """
    module, _, function = (command.runs or f"{command.module}:run").partition(":")

    def run(args: argparse.Namespace) -> int:
        result: int = getattr(importlib.import_module(module), function)(args)
        return result

    return run


def build_parser() -> argparse.ArgumentParser:
    """The ``jitrelay`` parser: ``--version`` and one subcommand per row of ``COMMANDS``. Raises nothing."""
    parser = argparse.ArgumentParser(prog="jitrelay", description="A Protocol V2 message relay for trading systems.")
    parser.add_argument("--version", action="version", version=f"jitrelay {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for command in COMMANDS:
        subparser = commands.add_parser(command.name, help=command.help, declare=tool_arguments(command.module))
        subparser.set_defaults(handler=handler(command))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (the process's arguments by default) and return its exit code.

    0 for success, 1 when the relay cannot be reached or started or the
    stream makes no sense, 2 for a bad command line or a folder that cannot
    be trusted; anything a command returns besides. Raises only what a
    command raises beyond those (``KeyboardInterrupt`` where it does not end quietly).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args)
    except UsageError as exc:
        print(f"jitrelay {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (RelayConnectionError, protocol.ProtocolError) as exc:
        print(f"jitrelay: {exc}", file=sys.stderr)
        return 1
    except UntrustedFolder as exc:  # as tmux and ssh-agent do: refuse a folder someone else can write to
        print(f"jitrelay {args.command}: refusing to start: {exc}", file=sys.stderr)
        return 2
