"""What a soak run is asked to do: ``SoakOptions``, the only home of its defaults, and the command line built from it.

Each field that the command line sets carries its flag's type and help in its
metadata; ``add_arguments`` declares the options from the fields, and
``options`` reads them back by field name, so no field is copied by hand.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from jitrelay.core import protocol
from jitrelay.core.domains import LOGICS
from jitrelay.tools.options import byte_count, non_negative, non_negative_float
from jitrelay.tools.usage import UsageError

MAX_KEYS = 1 << 16  # stream keys: a source byte and a flags byte


def _flag(default: Any, help: str, type: Any = None, *, share: str = "", **extra: Any) -> Any:
    """A field set by the command line: ``help`` may name ``{default}``; ``share`` says what a 0..1 value is."""
    return field(default=default, metadata={"help": help, "type": type, "share": share, **extra})


def _probability(default: float, help: str) -> Any:
    """A field for a chance per second, 0..1."""
    return _flag(default, help, non_negative_float, share="a probability per second")


def _share(default: float, help: str) -> Any:
    """A field for a share of the subscribers, 0..1."""
    return _flag(default, help, non_negative_float, share="a share of the subscribers")


@dataclass
class SoakOptions:
    """One soak run's settings; the defaults here are the command line's."""

    domain: str = _flag("market_data", "relay domain ({default})", choices=list(LOGICS))
    duration: float = _flag(300.0, "seconds of load ({default:g})", non_negative_float)
    rate: float = _flag(20000.0, "messages per second, all publishers", non_negative_float)
    publishers: int = _flag(3, "publisher processes at a time ({default})", non_negative)
    subscribers: int = _flag(4, "subscriber processes at a time ({default})", non_negative)
    churn: float = _flag(1.0, "clients killed and replaced per second", non_negative_float)
    stall_prob: float = _probability(0.2, "chance per second that a subscriber stalls ({default:g})")
    stall_max: float = _flag(2.0, "longest stall in seconds ({default:g})", non_negative_float)
    filtered: float = _share(
        0.5, "share of subscribers that subscribe at connect to some publishers' sources ({default:g})"
    )
    resubscribe: float = _probability(0.2, "chance per second that a subscriber changes its subscription ({default:g})")
    resuming: float = _share(
        0.5, "share of subscribers (the witness aside) that ask for positions, resumed when killed ({default:g})"
    )
    sigstop: float = _flag(
        0.1,
        "subscriber processes stopped with SIGSTOP per second, for up to --stall-max ({default:g})",
        non_negative_float,
    )
    shm: float = _share(
        0.25, "share of subscribers (the witness aside) that read the relay's log from shared memory ({default:g})"
    )
    # the relay's log in bytes; 0: RELAY_OPTIONS' 16 MiB
    log_size: int = _flag(
        0,
        "the relay's log (16MiB); a smaller one leaves stalled subscribers behind sooner",
        byte_count,
        metavar="BYTES",
    )
    max_size: int = _flag(1024, "largest message in bytes ({default})", non_negative)
    seed: int | None = _flag(None, "random seed, to repeat a run (default: random)", non_negative)
    json_path: Path | None = _flag(
        None, "also write the report, with memory samples, as JSON here", Path, flag="--json", metavar="JSON"
    )
    socket_dir: Path | None = _flag(None, "where the relay's socket goes (default: a fresh /tmp folder)", Path)
    progress: bool = _flag(True, "no progress lines on stderr", flag="--quiet", action="store_false")
    argv: list[str] = field(default_factory=list)


def _flags() -> list[tuple[str, dict[str, Any]]]:
    """Each command-line field's name and metadata."""
    return [(f.name, dict(f.metadata, default=f.default)) for f in fields(SoakOptions) if f.metadata]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``jitrelay soak`` command line, which ``options`` reads; its defaults are ``SoakOptions``'."""
    for name, meta in _flags():
        flag = meta.get("flag", "--" + name.replace("_", "-"))
        default = meta["default"]
        declared = {key: meta[key] for key in ("type", "action", "choices", "metavar") if meta.get(key) is not None}
        parser.add_argument(flag, dest=name, default=default, help=meta["help"].format(default=default), **declared)


def options(args: argparse.Namespace, argv: list[str] | None = None) -> SoakOptions:
    """The run the command line asks for; ``UsageError`` when it asks for something impossible."""
    if args.domain not in LOGICS:
        raise UsageError(f"unknown domain {args.domain!r}; choose one of {', '.join(LOGICS)}")
    if args.duration <= 0 or args.rate <= 0:
        raise UsageError("--duration and --rate must be positive")
    if args.publishers < 1 or args.subscribers < 1:
        raise UsageError("need at least one publisher and one subscriber")
    for name, meta in _flags():
        if meta["share"] and not 0 <= getattr(args, name) <= 1:
            raise UsageError(f"--{name.replace('_', '-')} is {meta['share']}, 0..1")
    if args.publishers > 255:
        raise UsageError("at most 255 publishers: each has a source byte of its own")
    if args.max_size < protocol.HEADER_SIZE + 2:
        raise UsageError(f"--max-size must be at least {protocol.HEADER_SIZE + 2} bytes (a header and one record)")
    if args.churn * args.duration > MAX_KEYS // 4:
        raise UsageError(f"--churn x --duration above {MAX_KEYS // 4} kills could run out of stream keys")
    chosen = {name: getattr(args, name) for name, _ in _flags()}
    return SoakOptions(**chosen, argv=list(sys.argv[1:] if argv is None else argv))
