"""The ``jitrelay`` command: run a relay, publish synthetic load, watch a domain, shadow a Torq relay.

``main`` returns the exit code instead of exiting, so tests and other tools can
call it: 0 for success, 1 when the relay cannot be reached or started, 2 for a
bad command line.

Each subcommand's options are declared beside the code that reads them: the
relay's, ``pub``'s, ``sub``'s, ``bridge``'s and ``audit``'s here, each tool's
in its module (``add_arguments``). A tool's module is imported, for its
options as for its run, only when its subcommand is on the command line.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jitrelay import __version__, kernels
from jitrelay.client import Publisher, RelayConnectionError, Subscriber
from jitrelay.core import protocol
from jitrelay.core.config import ConfigError, build_logic, format_byte_count, read_config, render_config
from jitrelay.core.domains import (
    CHECKSUM_POLICIES,
    JOURNAL_FSYNC,
    JOURNAL_ON_ERROR,
    LOGICS,
    SLOW_POLICIES,
    RelayLogic,
)
from jitrelay.core.folders import UntrustedFolder
from jitrelay.core.units import MiB
from jitrelay.tools.options import (
    MESSAGE_SIZE,
    add_byte_option,
    add_metrics_port,
    add_target,
    byte_list,
    non_negative,
    non_negative_float,
    source_id,
    time_ns_arg,
)
from jitrelay.tools.tap import MessageFilter, format_message, message_json
from jitrelay.tools.usage import UsageError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
LOG_LEVEL = "INFO"  # the default of --log-level
LOG_FORMAT = LOG_FORMATS[0]  # and of --log-format
PUB_BATCH_BYTES = 1 * MiB  # what one unpaced ``jitrelay pub`` write holds at most, unless --batch says


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """The --log-level and --log-format options of the long-running commands; ``configure_logging`` reads them."""
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=LOG_LEVEL)
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=LOG_FORMAT,
        help=f"text lines, or one JSON object per line ({LOG_FORMAT})",
    )


def add_relay_options(parser: argparse.ArgumentParser) -> None:
    """The relay's knobs on the command line, shared by ``run`` and ``config``; ``relay_overrides`` reads them."""
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML file of relay settings; options given here override it"
    )
    parser.add_argument("--slow-policy", choices=SLOW_POLICIES, help="what to do with a subscriber that falls behind")
    add_byte_option(
        parser, "--log-size", "the relay's log: every forwarded byte, which subscribers are sent from (64MiB)"
    )
    add_byte_option(parser, "--pending-limit", "how far a subscriber may fall behind the head before the policy acts")
    parser.add_argument(
        "--slow-timeout",
        type=non_negative_float,
        metavar="SECONDS",
        help="under disconnect, how long a subscriber may stay over its limit before it is dropped",
    )
    add_byte_option(parser, "--max-payload", "largest payload a message may carry")
    parser.add_argument(
        "--allow-uid",
        type=non_negative,
        action="append",
        metavar="UID",
        help="admit peers with this uid (repeatable; with --allow-gid replaces the domain's default list)",
    )
    parser.add_argument(
        "--allow-gid", type=non_negative, action="append", metavar="GID", help="admit peers in this gid"
    )
    parser.add_argument("--max-connections", type=non_negative, metavar="N", help="refuse connections beyond N")
    parser.add_argument("--journal-dir", type=Path, metavar="DIR", help="where the journal segments go (enables it)")
    parser.add_argument(
        "--journal-fsync",
        choices=JOURNAL_FSYNC,
        help=f"when the journal is flushed to disk ({RelayLogic.journal_fsync})",
    )
    add_byte_option(
        parser, "--journal-rotate", f"journal segment size ({format_byte_count(RelayLogic.journal_rotate_bytes)})"
    )
    parser.add_argument(
        "--journal-on-error",
        choices=JOURNAL_ON_ERROR,
        help="when an append fails: hold publishers and retry, forwarding nothing unjournaled (pause; the "
        "execution relay's default), or forward anyway and count it (forward)",
    )
    parser.add_argument("--no-journal", action="store_true", help="do not journal forwarded messages")
    add_metrics_port(parser)
    parser.add_argument(
        "--listen",
        action="append",
        metavar="tcp://HOST:PORT",
        help="also accept TCP clients here (repeatable; port 0 picks a free port)",
    )
    parser.add_argument(
        "--summary-file",
        type=Path,
        metavar="PATH",
        help="on stopping, write the relay's final figures here as one JSON object (replaced atomically)",
    )
    parser.add_argument(
        "--allow-network",
        action="append",
        metavar="CIDR",
        help="admit TCP clients from this network (repeatable; replaces the default 127.0.0.0/8 and ::1/128)",
    )
    parser.add_argument(
        "--versions",
        type=lambda text: tuple(sorted(byte_list(text))),
        metavar="V,V",
        help="header versions accepted; any other is bad_version (1,2: Torq writes 1)",
    )
    parser.add_argument(
        "--checksum",
        choices=CHECKSUM_POLICIES,
        help="checksum policy: off, if_set (0 means not computed) or required (the domain's default)",
    )
    parser.add_argument(
        "--domain-id",
        type=source_id,
        metavar="N",
        help="the header domain byte this relay takes (for producers of Torq's 0-based numbering)",
    )
    parser.add_argument(
        "--no-vendor-types", action="store_true", help="reject vendor TLV types 200..254, accepted by default"
    )


# The relay options that set one ``RelayLogic`` field to their value as given: option's dest -> field.
_FIELD_OPTIONS = {
    "slow_policy": "slow_policy",
    "slow_timeout": "slow_timeout",
    "max_payload": "max_payload",
    "max_connections": "max_connections",
    "journal_fsync": "journal_fsync",
    "journal_rotate": "journal_rotate_bytes",
    "journal_on_error": "journal_on_error",
    "metrics_port": "metrics_port",
    "summary_file": "summary_file",
    "log_size": "log_size",
    "versions": "versions",
    "checksum": "checksum",
    "domain_id": "domain_id",
}


def relay_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The ``RelayLogic`` fields the command line sets; they win over the config file."""
    overrides: dict[str, object] = {
        field: getattr(args, dest) for dest, field in _FIELD_OPTIONS.items() if getattr(args, dest) is not None
    }
    if args.socket is not None:
        overrides["socket_path"] = Path(args.socket)
    if args.pending_limit is not None:
        overrides["pending_high"] = args.pending_limit
        overrides["pending_low"] = max(1, args.pending_limit // 4)
    if args.allow_uid is not None or args.allow_gid is not None:
        overrides["allowed_uids"] = tuple(args.allow_uid or ())
        overrides["allowed_gids"] = tuple(args.allow_gid or ())
    if args.journal_dir is not None:
        overrides["journal"] = True
        overrides["journal_dir"] = args.journal_dir
    if args.no_journal:
        overrides["journal"] = False
    if args.listen is not None:
        overrides["listen"] = tuple(args.listen)
    if args.allow_network is not None:
        overrides["allowed_networks"] = tuple(args.allow_network)
    if args.no_vendor_types:
        overrides["vendor_types"] = False
    return overrides


def relay_logic(args: argparse.Namespace) -> RelayLogic:
    """The domain's logic: its defaults, overridden by ``--config FILE``, overridden by the other options."""
    try:
        if args.config is None:
            return build_logic(args.domain, {}, relay_overrides(args))
        from_file = read_config(args.config, args.domain)
        return build_logic(args.domain, from_file, relay_overrides(args), source=str(args.config))
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc


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
        self._declared()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._declared()
        return super().format_usage()

    def format_help(self) -> str:
        self._declared()
        return super().format_help()


def tool_arguments(module: str) -> Callable[[argparse.ArgumentParser], None]:
    """Declare a subcommand's options with ``add_arguments`` of the tool ``module``, imported only then."""

    def declare(parser: argparse.ArgumentParser) -> None:
        importlib.import_module(module).add_arguments(parser)

    return declare


def run_arguments(parser: argparse.ArgumentParser) -> None:
    add_target(parser)
    add_log_options(parser)
    add_relay_options(parser)


def config_arguments(parser: argparse.ArgumentParser) -> None:
    add_target(parser)
    add_relay_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jitrelay", description="A Protocol V2 message relay for trading systems.")
    parser.add_argument("--version", action="version", version=f"jitrelay {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    # name, help in the command list, what declares its options, what runs it
    table: list[tuple[str, str, Callable[[argparse.ArgumentParser], None] | None, Callable[..., int]]] = [
        ("run", "run the relay of one domain until SIGINT or SIGTERM", run_arguments, cmd_run),
        (
            "config",
            "print, as TOML, the configuration `jitrelay run` would use with the same options",
            config_arguments,
            cmd_config,
        ),
        ("pub", "publish synthetic messages", pub_arguments, cmd_pub),
        ("sub", "print the messages a relay forwards", sub_arguments, cmd_sub),
        (
            "stats",
            "print a running relay's or bridge's counters as a table",
            tool_arguments("jitrelay.tools.stats"),
            cmd_stats,
        ),
        (
            "bridge",
            "join this host's relay of one domain to the other hosts' through a NATS cluster",
            bridge_arguments,
            cmd_bridge,
        ),
        (
            "bench",
            "measure the relay against the raw-bytes forwarder and pyzmq on workloads W1 and W2",
            tool_arguments("jitrelay.tools.bench"),
            cmd_bench,
        ),
        (
            "kernels",
            "build the compiled kernels if needed, and say which build runs (exit 1 on a fallback)",
            None,
            cmd_kernels,
        ),
        ("audit", "print the messages an execution journal holds", audit_arguments, cmd_audit),
        (
            "soak",
            "run a relay under load, churn, stalls and SIGKILLs, and verify every message delivered",
            tool_arguments("jitrelay.tools.soak"),
            cmd_soak,
        ),
        (
            "shadow",
            "run beside a running (Torq) relay: republish its stream into this relay and compare the two",
            tool_arguments("jitrelay.tools.shadow"),
            cmd_shadow,
        ),
    ]
    for name, help, declare, handler in table:
        commands.add_parser(name, help=help, declare=declare).set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
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


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line, for log shippers that should not parse text."""

    def __init__(self, domain: str) -> None:
        super().__init__()
        self.domain = domain

    def format(self, record: logging.LogRecord) -> str:
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
    """Log to stderr at ``--log-level`` in ``--log-format``; numba's own chatter only from WARNING up."""
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JsonLogFormatter(args.domain))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level, handlers=[handler])
    logging.getLogger("numba").setLevel(max(logging.WARNING, logging.getLogger().level))


def cmd_kernels(args: argparse.Namespace) -> int:
    """Build ahead of time what the next ``jitrelay run`` would, so a deployment pays it once and sees failures."""
    logging.basicConfig(level=logging.WARNING, format="jitrelay kernels: %(message)s")
    loaded = kernels.backend()
    print(f"{loaded['name']} {loaded['path']} (ready in {loaded['seconds']:.3f} s)")
    return 0 if loaded["name"] == kernels.requested_backend() else 1


def cmd_config(args: argparse.Namespace) -> int:
    sys.stdout.write(render_config(relay_logic(args)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    logic = relay_logic(args)
    configure_logging(args)
    from jitrelay.server.serve import run_relay  # the relay's I/O loads only for this command
    from jitrelay.server.sockets import RelayAlreadyRunning

    try:
        return run_relay(logic)
    except RelayAlreadyRunning as exc:
        print(f"jitrelay: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"jitrelay: cannot run the {args.domain} relay on {logic.socket_path}: {exc}", file=sys.stderr)
        return 1


def pub_arguments(parser: argparse.ArgumentParser) -> None:
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


def cmd_pub(args: argparse.Namespace) -> int:
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
    with Publisher(args.domain, args.socket, source=args.source) as publisher:
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


def sub_arguments(parser: argparse.ArgumentParser) -> None:
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


def position_arg(text: str) -> protocol.Position:
    try:
        return protocol.Position.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_sub(args: argparse.Namespace) -> int:
    if args.resume_from is not None or args.positions:
        return _sub_positioned(args)
    received = 0
    limit = args.count
    keep = MessageFilter(args.types, args.sources)
    show = functools.partial(message_json if args.json else format_message, names=True)
    try:
        with Subscriber(
            args.domain, args.socket, tlv_types=args.types, sources=args.sources, shared_memory=args.shm
        ) as subscriber:
            print(
                f"jitrelay sub: connected to the {args.domain} relay at {subscriber.socket_path}{_how(args)}",
                file=sys.stderr,
            )
            for batch in subscriber.batches():
                left = limit - received if limit else None
                if args.count_only and not keep.active:  # counting alone needs no decoding
                    messages = kernels.frame(batch)[0]
                    count = messages if left is None else min(messages, left)
                else:
                    selected = filter(keep.keeps, protocol.decode_messages(batch))
                    shown = list(itertools.islice(selected, left))
                    count = len(shown)
                    if shown and not args.count_only:
                        sys.stdout.write("\n".join(show(m) for m in shown) + "\n")
                        sys.stdout.flush()
                received += count
                if limit and received >= limit:
                    break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # stdout closed early, as by `| head`: stop quietly, and let exit flush nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.count_only:
        print(received)
    return 0


def _how(args: argparse.Namespace) -> str:
    return ", reading its log from shared memory" if args.shm else ""


def _sub_positioned(args: argparse.Namespace) -> int:
    """``jitrelay sub`` with positions: one message at a time, so that the position printed on exit is exact."""
    received = 0
    keep = MessageFilter(args.types, args.sources)
    show = functools.partial(message_json if args.json else format_message, names=True)
    subscriber = Subscriber(
        args.domain,
        args.socket,
        tlv_types=args.types,
        sources=args.sources,
        positions=True,
        resume_from=args.resume_from,
        shared_memory=args.shm,
    )
    gaps = 0
    try:
        with subscriber:
            print(
                f"jitrelay sub: connected to the {args.domain} relay at {subscriber.socket_path}{_how(args)}",
                file=sys.stderr,
            )
            for view in subscriber:
                for gap in subscriber.gaps[gaps:]:
                    print(f"jitrelay sub: {_describe_gap(gap)}", file=sys.stderr)
                gaps = len(subscriber.gaps)
                message = view.decode()
                if not keep.keeps(message):
                    continue
                if not args.count_only:
                    sys.stdout.write(show(message) + "\n")
                    sys.stdout.flush()
                received += 1
                if args.count and received >= args.count:
                    break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    for gap in subscriber.gaps[gaps:]:
        print(f"jitrelay sub: {_describe_gap(gap)}", file=sys.stderr)
    if args.count_only:
        print(received)
    if subscriber.position is not None:
        print(
            f"jitrelay sub: position {subscriber.position} (resume with --from {subscriber.position})", file=sys.stderr
        )
    return 0


def _describe_gap(gap: protocol.Gap) -> str:
    if gap.reason == protocol.GAP_UNKNOWN_EPOCH:
        return "the relay has restarted since that position; what was missed is not known"
    return f"gap: {gap.messages} messages ({gap.bytes} bytes) missed"


def cmd_stats(args: argparse.Namespace) -> int:
    from jitrelay.tools.stats import run_stats  # the Prometheus text parser loads only for this command

    return run_stats(args)


def bridge_arguments(parser: argparse.ArgumentParser) -> None:
    from jitrelay.bridge.bridge import RECONNECT_BUFFER, SUBSCRIPTION_PENDING_BYTES  # imported only for this command

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
        f"({format_byte_count(RECONNECT_BUFFER)})",
        default=RECONNECT_BUFFER,
    )
    add_byte_option(parser, "--max-payload", "largest payload taken from NATS (the domain's)")
    add_byte_option(
        parser,
        "--nats-pending-limit",
        "what the NATS client may hold while the relay is behind; more is dropped and counted as a gap "
        f"({format_byte_count(SUBSCRIPTION_PENDING_BYTES)})",
        default=SUBSCRIPTION_PENDING_BYTES,
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
    parser.add_argument("--replicas", type=int, default=3, help="JetStream: the stream's replicas (3)")
    parser.add_argument("--max-age", type=float, default=86400.0, help="JetStream: seconds the stream keeps a message")
    add_byte_option(parser, "--max-bytes", "JetStream: what the stream holds at most (1GiB)", default=1024**3)
    parser.add_argument(
        "--duplicate-window", type=float, default=120.0, help="JetStream: seconds the stream drops a republish (120)"
    )
    parser.add_argument(
        "--max-in-flight", type=int, default=64, help="JetStream: publishes awaiting acknowledgement at most (64)"
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
    add_metrics_port(parser)
    add_log_options(parser)


def cmd_bridge(args: argparse.Namespace) -> int:
    from jitrelay.bridge.bridge import BridgeOptions, run_bridge  # nats-py loads only for this command
    from jitrelay.bridge.jetstream import StreamSettings

    servers = tuple(url.strip() for urls in args.nats for url in urls.split(",") if url.strip())
    try:
        options = BridgeOptions(
            args.domain,
            servers,
            socket_path=args.socket,
            subject=args.subject,
            metrics_port=args.metrics_port,
            reconnect_buffer=args.reconnect_buffer,
            max_payload=args.max_payload,
            nats_pending_limit=args.nats_pending_limit,
            jetstream=args.jetstream,
            host=args.host,
            stream=StreamSettings(
                replicas=args.replicas,
                max_age=args.max_age,
                max_bytes=args.max_bytes,
                duplicate_window=args.duplicate_window,
                max_in_flight=args.max_in_flight,
            ),
            journal_dir=args.journal,
            use_journal=False if args.no_journal else None,
            state_dir=args.state_dir,
            hold_when_full=None if args.when_full is None else args.when_full == "hold",
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    configure_logging(args)
    return run_bridge(options)


def cmd_bench(args: argparse.Namespace) -> int:
    import jitrelay.tools.bench  # the benchmark's processes and baselines load only for this command

    return jitrelay.tools.bench.run(args)


def audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, metavar="PATH", help="a journal segment, a journal folder, or a name prefix")
    parser.add_argument("--json", action="store_true", help="one JSON object per message instead of a line of text")
    parser.add_argument(
        "--since", type=time_ns_arg, metavar="T", help="messages stamped at or after T (ns or ISO-8601)"
    )
    parser.add_argument("--until", type=time_ns_arg, metavar="T", help="messages stamped before T")


def cmd_audit(args: argparse.Namespace) -> int:
    from jitrelay.server.journal import read_journal  # the journal reader loads only for this command

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="jitrelay audit: %(message)s")
    try:
        messages = read_journal(args.path, since_ns=args.since, until_ns=args.until)
    except OSError as exc:
        reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        print(f"jitrelay audit: {reason}", file=sys.stderr)
        return 1
    show = message_json if args.json else format_message
    try:
        for message in messages:
            sys.stdout.write(show(message) + "\n")
        sys.stdout.flush()
    except protocol.ProtocolError as exc:
        sys.stdout.flush()
        print(f"jitrelay audit: corrupt journal: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):  # stdout closed early, as by `| head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"jitrelay audit: cannot read {args.path}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_shadow(args: argparse.Namespace) -> int:
    from jitrelay.tools.shadow import run_shadow  # the comparison loads only for this command

    return run_shadow(args)


def cmd_soak(args: argparse.Namespace) -> int:
    from jitrelay.tools.soak import run_soak  # the soak's processes load only for this command

    return run_soak(args)
