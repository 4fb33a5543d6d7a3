"""``jitrelay bridge DOMAIN --nats URL``: join this host's relay of one domain to the other hosts' through NATS.

The bridge itself is ``jitrelay.bridge``; this is its command line. nats-py
loads only when the command runs, so the package works without it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jitrelay.core.config import format_byte_count
from jitrelay.tools.options import add_byte_option, add_metrics_port, add_target
from jitrelay.tools.output import add_log_options, configure_logging
from jitrelay.tools.usage import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``jitrelay bridge`` command line, which ``run`` reads; raises nothing."""
    from jitrelay.bridge.options import BridgeOptions  # the bridge's defaults live there only

    reconnect_buffer = BridgeOptions.default("reconnect_buffer")
    pending_limit = BridgeOptions.default("nats_pending_limit")
    add_target(parser)
    parser.add_argument(
        "--nats",
        action="append",
        required=True,
        metavar="URL[,URL...]",
        help="NATS servers of the cluster, e.g. nats://10.0.0.1:4222,nats://10.0.0.2:4222 (repeatable)",
    )
    parser.add_argument("--subject", help="NATS subject the domain's relays share (jitrelay.DOMAIN)")
    add_byte_option(
        parser,
        "--reconnect-buffer",
        "what to hold for NATS while reconnecting; more is dropped and counted as a gap "
        f"({format_byte_count(reconnect_buffer)})",
        default=reconnect_buffer,
    )
    add_byte_option(parser, "--max-payload", "largest payload taken from NATS (the domain's)")
    add_byte_option(
        parser,
        "--nats-pending-limit",
        "what the NATS client may hold while the relay is behind; more is dropped and counted as a gap "
        f"({format_byte_count(pending_limit)})",
        default=pending_limit,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--jetstream",
        dest="jetstream",
        action="store_const",
        const=True,
        help="carry the domain through a JetStream stream, without loss (the default for execution)",
    )
    mode.add_argument(
        "--core", dest="jetstream", action="store_const", const=False, help="core NATS, at most once (the default else)"
    )
    parser.add_argument("--host", help="this host's name in the stream and its durable consumer's (the host name)")
    parser.add_argument(
        "--nats-creds", type=Path, metavar="FILE", help="NATS credentials file (user JWT and NKey seed, as nsc writes)"
    )
    parser.add_argument("--tls-ca", type=Path, metavar="PEM", help="use TLS to NATS; the servers' CA")
    parser.add_argument("--tls-cert", type=Path, metavar="PEM", help="TLS client certificate for servers that verify")
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="the TLS client certificate's key")
    _jetstream_arguments(parser)
    add_metrics_port(parser)
    add_log_options(parser)


def _jetstream_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that apply on JetStream only, their defaults from ``StreamSettings``."""
    from jitrelay.bridge.options import StreamSettings

    stream = StreamSettings()
    parser.add_argument(
        "--replicas", type=int, default=stream.replicas, help=f"JetStream: the stream's replicas ({stream.replicas})"
    )
    parser.add_argument(
        "--max-age", type=float, default=stream.max_age, help="JetStream: seconds the stream keeps a message"
    )
    add_byte_option(
        parser,
        "--max-bytes",
        f"JetStream: what the stream holds at most ({format_byte_count(stream.max_bytes)})",
        default=stream.max_bytes,
    )
    parser.add_argument(
        "--duplicate-window",
        type=float,
        default=stream.duplicate_window,
        help=f"JetStream: seconds the stream drops a republish ({stream.duplicate_window:g})",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=stream.max_in_flight,
        help=f"JetStream: publishes awaiting acknowledgement at most ({stream.max_in_flight})",
    )
    parser.add_argument(
        "--when-full",
        choices=("hold", "drop"),
        help="JetStream: a full stream holds the relay back, or its refusals are counted gaps "
        "(hold for execution, else drop)",
    )
    parser.add_argument("--journal", type=Path, help="JetStream: the relay's journal folder (<socket folder>/journal)")
    parser.add_argument(
        "--no-journal",
        action="store_true",
        help="JetStream: send what the relay forwards to the bridge, not what it journals",
    )
    parser.add_argument("--state-dir", type=Path, help="JetStream: where the bridge keeps its state (socket folder)")


# The options that go to ``BridgeOptions`` and to its ``StreamSettings`` as given, each by its own name.
_BRIDGE_OPTIONS = (
    "subject",
    "host",
    "jetstream",
    "metrics_port",
    "reconnect_buffer",
    "nats_pending_limit",
    "max_payload",
    "nats_creds",
    "tls_ca",
    "tls_cert",
    "tls_key",
)
_STREAM_OPTIONS = ("replicas", "max_age", "max_bytes", "duplicate_window", "max_in_flight")


def _as_given(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The command line's value of each of ``names``, by name."""
    return {name: getattr(args, name) for name in names}


def run(args: argparse.Namespace) -> int:
    """Run the bridge until SIGINT or SIGTERM: its exit code (``run_bridge``'s).

    Raises ``UsageError`` for options the bridge cannot take together.
    """
    from jitrelay.bridge.bridge import run_bridge  # nats-py loads only for this command
    from jitrelay.bridge.options import BridgeOptions, StreamSettings

    servers = tuple(url.strip() for urls in args.nats for url in urls.split(",") if url.strip())
    try:
        options = BridgeOptions(
            args.domain,
            servers,
            socket_path=args.socket,
            stream=StreamSettings(**_as_given(args, _STREAM_OPTIONS)),
            journal_dir=args.journal,
            use_journal=False if args.no_journal else None,
            state_dir=args.state_dir,
            hold_when_full=None if args.when_full is None else args.when_full == "hold",
            **_as_given(args, _BRIDGE_OPTIONS),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    configure_logging(args)
    return run_bridge(options)
