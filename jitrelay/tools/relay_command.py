"""``jitrelay run DOMAIN``: the relay of one domain, until SIGINT or SIGTERM; and the relay's options.

The relay's settings come from the domain's defaults, a ``--config`` file and
the options given, each over the one before (``relay_logic``); ``jitrelay
config`` (``tools.config_command``) takes the same options and prints the
result instead of running it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from jitrelay.core.config import ConfigError, build_logic, format_byte_count, parse_keep, read_config
from jitrelay.core.domains import (
    CHECKSUM_POLICIES,
    JOURNAL_FSYNC,
    JOURNAL_ON_ERROR,
    READ_PATHS,
    SLOW_POLICIES,
    RelayLogic,
)
from jitrelay.tools.options import (
    add_metrics_port,
    add_target,
    byte_count,
    byte_list,
    non_negative,
    non_negative_float,
    source_id,
)
from jitrelay.tools.output import add_log_options, configure_logging
from jitrelay.tools.usage import UsageError


def journal_keep(text: str) -> tuple[int | None, float | None]:
    """``--journal-keep``'s value: (bytes, seconds) to keep, either None."""
    try:
        return parse_keep(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_BYTES: dict[str, Any] = {"type": byte_count, "metavar": "BYTES"}  # an option taking a byte count, such as 64KiB

# The relay's knobs, each group as flag -> ``add_argument``'s keywords, in the order ``--help`` lists them.
_LIMIT_OPTIONS: dict[str, dict[str, Any]] = {
    "--config": dict(type=Path, metavar="FILE", help="TOML file of relay settings; options given here override it"),
    "--slow-policy": dict(choices=SLOW_POLICIES, help="what to do with a subscriber that falls behind"),
    "--read-path": dict(
        choices=READ_PATHS,
        help="read and forward in one compiled call per wake-up (compiled), one per read of the event loop "
        "(uvloop), or step by step (python)",
    ),
    "--log-size": dict(_BYTES, help="the relay's log: every forwarded byte, which subscribers are sent from (64MiB)"),
    "--pending-limit": dict(_BYTES, help="how far a subscriber may fall behind the head before the policy acts"),
    "--slow-timeout": dict(
        type=non_negative_float,
        metavar="SECONDS",
        help="under disconnect, how long a subscriber may stay over its limit before it is dropped",
    ),
    "--max-payload": dict(_BYTES, help="largest payload a message may carry"),
    "--allow-uid": dict(
        type=non_negative,
        action="append",
        metavar="UID",
        help="admit peers with this uid (repeatable; with --allow-gid replaces the domain's default list)",
    ),
    "--allow-gid": dict(type=non_negative, action="append", metavar="GID", help="admit peers in this gid"),
    "--max-connections": dict(type=non_negative, metavar="N", help="refuse connections beyond N"),
}
# Whether and how the relay journals what it forwards (the execution domain's, by default).
_JOURNAL_OPTIONS: dict[str, dict[str, Any]] = {
    "--journal-dir": dict(type=Path, metavar="DIR", help="where the journal segments go (enables it)"),
    "--journal-fsync": dict(
        choices=JOURNAL_FSYNC, help=f"when the journal is flushed to disk ({RelayLogic.journal_fsync})"
    ),
    "--journal-rotate": dict(
        _BYTES, help=f"journal segment size ({format_byte_count(RelayLogic.journal_rotate_bytes)})"
    ),
    "--journal-on-error": dict(
        choices=JOURNAL_ON_ERROR,
        help="when an append fails: hold publishers and retry, forwarding nothing unjournaled (pause; the "
        "execution relay's default), or forward anyway and count it (forward)",
    ),
    "--journal-keep": dict(
        type=journal_keep,
        metavar="LIMIT",
        help="delete the oldest whole segments beyond an age (7d, 12h), a size (20GiB) or both (7d,20GiB)",
    ),
    "--no-journal": dict(action="store_true", help="do not journal forwarded messages"),
}
# After ``--metrics-port``: TCP clients, and the figures written on stopping.
_OUTWARD_OPTIONS: dict[str, dict[str, Any]] = {
    "--listen": dict(
        action="append",
        metavar="tcp://HOST:PORT",
        help="also accept TCP clients here, or TLS clients with tls://HOST:PORT (repeatable; port 0 picks a free port)",
    ),
    "--tls-cert": dict(type=Path, metavar="PEM", help="the TLS listeners' certificate chain"),
    "--tls-key": dict(type=Path, metavar="PEM", help="the TLS listeners' private key"),
    "--tls-client-ca": dict(
        type=Path, metavar="PEM", help="TLS clients must present a certificate this CA signed (mutual TLS)"
    ),
    "--allow-name": dict(
        action="append",
        metavar="NAME",
        help="admit TLS clients whose certificate names NAME as subject CN or DNS/URI SAN (repeatable; "
        "needs --tls-client-ca)",
    ),
    "--summary-file": dict(
        type=Path,
        metavar="PATH",
        help="on stopping, write the relay's final figures here as one JSON object (replaced atomically)",
    ),
    "--allow-network": dict(
        action="append",
        metavar="CIDR",
        help="admit TCP clients from this network (repeatable; replaces the default 127.0.0.0/8 and ::1/128)",
    ),
}
# Which headers the relay takes: versions, checksums, the domain byte, vendor types.
_WIRE_OPTIONS: dict[str, dict[str, Any]] = {
    "--versions": dict(
        type=lambda text: tuple(sorted(byte_list(text))),
        metavar="V,V",
        help="header versions accepted; any other is bad_version (1,2: Torq writes 1)",
    ),
    "--checksum": dict(
        choices=CHECKSUM_POLICIES,
        help="checksum policy: off, if_set (0 means not computed) or required (the domain's default)",
    ),
    "--domain-id": dict(
        type=source_id,
        metavar="N",
        help="the header domain byte this relay takes (for producers of Torq's 0-based numbering)",
    ),
    "--no-vendor-types": dict(action="store_true", help="reject vendor TLV types 200..254, accepted by default"),
}


def add_relay_options(parser: argparse.ArgumentParser) -> None:
    """The relay's knobs on the command line, shared by ``run`` and ``config``; ``relay_overrides`` reads them.

    Declared once here so that ``config`` prints what ``run`` would use with the same options. Raises nothing.
    """
    for flag, keywords in (_LIMIT_OPTIONS | _JOURNAL_OPTIONS).items():
        parser.add_argument(flag, **keywords)
    add_metrics_port(parser)
    for flag, keywords in (_OUTWARD_OPTIONS | _WIRE_OPTIONS).items():
        parser.add_argument(flag, **keywords)


# The relay options that set one ``RelayLogic`` field to their value as given: option's dest -> field.
_FIELD_OPTIONS = {
    "slow_policy": "slow_policy",
    "slow_timeout": "slow_timeout",
    "read_path": "read_path",
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
    "tls_cert": "tls_cert",
    "tls_key": "tls_key",
    "tls_client_ca": "tls_client_ca",
}


def relay_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The ``RelayLogic`` fields the command line sets; they win over the config file. Raises nothing."""
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
    if args.journal_keep is not None:
        keep_bytes, keep_seconds = args.journal_keep
        if keep_bytes is not None:
            overrides["journal_keep_bytes"] = keep_bytes
        if keep_seconds is not None:
            overrides["journal_keep_seconds"] = keep_seconds
    if args.no_journal:
        overrides["journal"] = False
    if args.listen is not None:
        overrides["listen"] = tuple(args.listen)
    if args.allow_name is not None:
        overrides["allowed_names"] = tuple(args.allow_name)
    if args.allow_network is not None:
        overrides["allowed_networks"] = tuple(args.allow_network)
    if args.no_vendor_types:
        overrides["vendor_types"] = False
    return overrides


def relay_logic(args: argparse.Namespace) -> RelayLogic:
    """The domain's logic: its defaults, overridden by ``--config FILE``, overridden by the other options.

    ``run`` and ``config`` both build it here, so what ``config`` prints is
    what ``run`` would use. Raises ``UsageError`` for a file or a value the
    domain cannot take.
    """
    try:
        if args.config is None:
            return build_logic(args.domain, {}, relay_overrides(args))
        from_file = read_config(args.config, args.domain)
        return build_logic(args.domain, from_file, relay_overrides(args), source=str(args.config))
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``jitrelay run`` command line, which ``run`` reads; raises nothing."""
    add_target(parser)
    add_log_options(parser)
    add_relay_options(parser)


def run(args: argparse.Namespace) -> int:
    """Run the relay until it is told to stop: 0 then, 1 when it cannot start (taken socket, folder, port).

    Raises ``UsageError`` for settings that cannot be used, and
    ``UntrustedFolder`` for a socket folder someone else can write to.
    """
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
