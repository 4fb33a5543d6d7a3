"""``jitrelay bench``: the relay against its ceiling and against pyzmq, on the same workloads, in one run.

``add_arguments`` declares the command line, ``run`` carries it out: every
relay asked for (``relays``) on every workload asked for (``workloads``,
the table), then how long ``jitrelay run`` takes to start; it prints the
report (``report``) and writes every figure (``figures``) as JSON.

"Lost" is exact: every subscriber is attached before the timed run starts, so
it is messages sent minus messages received. On a stream relay each subscriber
connects and receives a probe message before the publisher connects; PUB/SUB
has a slow-joiner problem (a subscription takes a moment to reach the
publisher), so the zmq publisher repeats the probe until every subscriber has
seen one, and subscribers skip the extra probes.

For the jitrelay relay the benchmark also reports its resident memory
(VmRSS sampled every 50 ms during the run, and VmHWM), the forwarding-time
figures of the summary file it writes when it stops (``--summary-file``), and
how long ``jitrelay run`` takes until it is listening, with its kernels already
built and with an empty cache (the one-off build a fresh install pays).

The relay, publisher and subscribers share the machine's cores, so absolute
figures move with anything else running; relays run side by side on each
workload and the figures to read are their ratios.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from jitrelay.tools.bench import hdr
from jitrelay.tools.bench.figures import add_ratios, git_commit, jitrelay_summary, machine
from jitrelay.tools.bench.limit_relay import limit_built
from jitrelay.tools.bench.messages import records_for
from jitrelay.tools.bench.options import BRIDGED, DEFAULTS, JITRELAYS, POLICIES, RELAYS, RESULTS_DIR, Options, listed
from jitrelay.tools.bench.relays import BenchError
from jitrelay.tools.bench.report import format_report
from jitrelay.tools.bench.runs import measure_startup
from jitrelay.tools.bench.workloads import NAMES, WORKLOADS, Workload, notes
from jitrelay.tools.options import non_negative, non_negative_float
from jitrelay.tools.usage import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``jitrelay bench`` command line, which ``parse`` reads; the defaults are ``Options``'."""
    parser.add_argument(
        "--relays",
        default=listed(DEFAULTS.relays),
        help="comma-separated: jitrelay (or jitrelay:block, jitrelay:disconnect), jitrelay-shm (subscribers read the "
        "log from shared memory; also :block, :disconnect), jitrelay-exec (the execution relay, checksums required and "
        "journal on, set against jitrelay), jitrelay-py (jitrelay forwarding each read by the engine's Python steps), "
        "jitrelay-uv (jitrelay with the event loop's reads, one compiled call each): the baselines of its compiled "
        "read path; raw, raw-bytes (raw with a new bytes object per read), zmq, "
        "zmq-default, limit (a compiled raw-bytes forwarder, built with the system C compiler), bridge, bridge-js",
    )
    parser.add_argument(
        "--workloads",
        default=listed(DEFAULTS.workloads),
        help="comma-separated: " + ", ".join(w.about for w in WORKLOADS),
    )
    _counts_option(parser, "--subscribers", DEFAULTS.subscribers, "W1 subscriber counts")
    parser.add_argument(
        "--latency-subscribers", type=non_negative, help="W2 subscriber count (default: the largest W1 count)"
    )
    _number_options(
        parser,
        ("--size", non_negative, DEFAULTS.size, "bytes per message, header included"),
        ("--duration", non_negative_float, DEFAULTS.duration, "seconds of publishing per run"),
        ("--rate", non_negative_float, DEFAULTS.rate, "W2 messages per second"),
        (
            "--startup-runs",
            non_negative,
            DEFAULTS.startup_runs,
            "warm starts of `jitrelay run` to time, followed by one cold start; 0 skips it",
        ),
        (
            "--idle-subscribers",
            non_negative,
            DEFAULTS.idle_subscribers,
            "W1 on jitrelay: also connect N subscribers that select nothing, so the relay's memory shows whether it "
            "grows with subscribers",
        ),
    )
    _counts_option(parser, "--fanout-subscribers", DEFAULTS.fanout_subscribers, "fanout subscriber counts")
    _number_options(
        parser,
        ("--fanout-interval", non_negative_float, DEFAULTS.fanout_interval_ms, "fanout: milliseconds between messages"),
        (
            "--fanout-hosts",
            non_negative,
            DEFAULTS.fanout_hosts,
            "fanout: subscriber processes the subscribers are spread over, each polling its own in one loop",
        ),
    )
    parser.add_argument("--json", type=Path, help=f"where to write every figure ({RESULTS_DIR}/<UTC time>.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _counts_option(parser: argparse.ArgumentParser, flag: str, default: tuple[int, ...], about: str) -> None:
    """An option of comma-separated subscriber counts, which ``_counts`` reads."""
    parser.add_argument(flag, default=listed(default), help=f"{about}, comma-separated ({listed(default)})")


def _number_options(parser: argparse.ArgumentParser, *options: tuple[str, Callable[[str], float], float, str]) -> None:
    """Options of one number each: (flag, type, default, what it is); the help ends with the default."""
    for flag, kind, default, about in options:
        parser.add_argument(flag, type=kind, default=default, help=f"{about} ({default:g})")


def _names(text: str) -> list[str]:
    return [part.strip().lower() for part in text.split(",") if part.strip()]


def _counts(text: str, option: str) -> tuple[int, ...]:
    """``1,10,100``: subscriber counts; raises ``UsageError`` naming ``option`` for anything else."""
    try:
        return tuple(int(n) for n in _names(text))
    except ValueError:
        raise UsageError(f"{option} takes comma-separated counts, not {text!r}") from None


def _relays(text: str) -> tuple[str, ...]:
    """The relays asked for; the bridged ones dropped from the default list without nats-server, limit without cc.

    Raises ``UsageError`` for an unknown relay, a bridge asked for without
    nats-server, or none left to run.
    """
    relays = _names(text)
    for name in relays:
        base, _, policy = name.partition(":")
        if base not in RELAYS or (policy and (base not in JITRELAYS or policy not in POLICIES)):
            raise UsageError(f"unknown relay {name!r}; choose from {', '.join(RELAYS)}, jitrelay:block")
    if any(name in BRIDGED for name in relays):
        from jitrelay.testing.nats_cluster import nats_server_path

        if nats_server_path() is None:
            if text != listed(DEFAULTS.relays):
                raise UsageError("the bridge runs need nats-server (Debian: apt-get install nats-server)")
            relays = [name for name in relays if name not in BRIDGED]
            print("jitrelay bench: no nats-server, so no bridge runs (apt-get install nats-server)", file=sys.stderr)
    if "limit" in relays and not limit_built():
        relays = [name for name in relays if name != "limit"]
    if not relays:
        raise UsageError("no relay to run")
    return tuple(relays)


def parse(args: argparse.Namespace, argv: list[str] | None = None) -> Options:
    """Check the ``bench`` command line; a :class:`UsageError` says what is wrong."""
    relays = _relays(args.relays)
    workloads = tuple(_names(args.workloads))
    for name in workloads:
        if name not in NAMES:
            raise UsageError(f"unknown workload {name!r}; choose from {', '.join(NAMES)}")
    counts = _counts(args.subscribers, "--subscribers")
    if not counts or min(counts) < 1:
        raise UsageError("--subscribers needs counts of at least 1")
    latency_subs = max(counts) if args.latency_subscribers is None else args.latency_subscribers
    if latency_subs < 1:
        raise UsageError("--latency-subscribers needs at least 1")
    if not args.duration > 0 or not args.rate > 0 or args.startup_runs < 0:
        raise UsageError("--duration and --rate must be positive, --startup-runs at least 0")
    fanout = _counts(args.fanout_subscribers, "--fanout-subscribers")
    if not fanout or min(fanout) < 1 or args.fanout_hosts < 1 or not args.fanout_interval > 0:
        raise UsageError(
            "--fanout-subscribers needs counts of at least 1, --fanout-hosts at least 1, "
            "--fanout-interval a positive number of milliseconds"
        )
    records_for(args.size)  # a size one record cannot make raises UsageError
    if any(w in ("w2", "w3") for w in workloads) and not hdr.available():
        raise UsageError("W2's latency histogram needs hdrhistogram: pip install 'jitrelay[bench]'")
    if any(r.startswith("zmq") for r in relays):
        try:
            import zmq  # noqa: F401
        except ImportError:
            raise UsageError("the zmq relays need pyzmq: pip install 'jitrelay[bench]'") from None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Options(
        relays=relays,
        workloads=workloads,
        subscribers=counts,
        latency_subscribers=latency_subs,
        size=args.size,
        duration=args.duration,
        rate=args.rate,
        startup_runs=args.startup_runs,
        json_path=args.json or RESULTS_DIR / f"{stamp}.json",
        progress=not args.no_progress,
        argv=list(sys.argv if argv is None else argv),
        idle_subscribers=args.idle_subscribers,
        fanout_subscribers=fanout,
        fanout_interval_ms=args.fanout_interval,
        fanout_hosts=args.fanout_hosts,
    )


class _Progress:
    """A tqdm bar over the runs on stderr, or nothing when hidden (tqdm is needed only to show one)."""

    def __init__(self, total: int, shown: bool):
        self.bar = None
        if shown:
            try:
                from tqdm import tqdm
            except ImportError:
                raise UsageError("the progress bar needs tqdm (pip install 'jitrelay[bench]')") from None
            self.bar = tqdm(total=total, file=sys.stderr, unit="run")

    def set_description(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def write(self, text: str) -> None:
        """A line on stderr that does not break the bar."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Session:
    """Everything one ``jitrelay bench`` measures, in order, and whether any of it failed."""

    def __init__(self, opts: Options):
        self.opts = opts
        chosen = [w for w in WORKLOADS if w.name in opts.workloads]
        self.steps = [(w, n, relay) for w in chosen if w.run is not None for n, relay in w.steps(opts)]
        self.alone = [w for w in chosen if w.alone is not None]
        jitrelays = any(r.partition(":")[0] in JITRELAYS for r in opts.relays)
        self.measure_start = opts.startup_runs > 0 and jitrelays
        self.runs: list[dict] = []
        self.alone_figures: dict[str, dict] = {}
        self.startup: dict | None = None
        self.failed = False

    def measure(self, bar: _Progress) -> None:
        """The relay runs, the workloads run alone, then the startup (last: the kernels are built by then)."""
        for workload, n, relay in self.steps:
            bar.set_description(f"{relay} {workload.name} {n} sub")
            self.runs.append(self._one(workload, n, relay, bar))
            bar.update()
        for workload in self.alone:
            assert workload.alone is not None
            bar.set_description(workload.name)
            figures = self.alone_figures[workload.name] = workload.alone(self.opts)
            self.failed = self.failed or bool(figures["errors"])
            bar.update()
        if self.measure_start:
            bar.set_description("jitrelay startup")
            try:
                self.startup = measure_startup(self.opts.startup_runs)
            except BenchError as exc:
                self.failed = True
                bar.write(f"startup measurement failed: {exc}")
            bar.update()

    def _one(self, workload: Workload, n: int, relay: str, bar: _Progress) -> dict:
        """One run's figures, or what went wrong with it."""
        assert workload.run is not None
        try:
            return workload.run(relay, n, self.opts)
        except BenchError as exc:
            self.failed = True
            bar.write(f"{relay} {workload.name} {n} sub failed: {exc}")
            return {"relay": relay, "workload": workload.name, "subscribers": n, "error": str(exc)}

    def report(self, started: datetime) -> dict:
        """Every figure, as the JSON file has them."""
        add_ratios(self.runs)
        return {
            "timestamp_utc": started.isoformat(timespec="seconds"),
            "command_line": self.opts.argv,
            "options": self.opts.described(),
            **git_commit(),
            "machine": machine(),
            "runs": self.runs,
            "jitrelay": jitrelay_summary(self.runs),
            "startup": self.startup,
            **{w.name: self.alone_figures.get(w.name) for w in WORKLOADS if w.alone is not None},
        }


def run(args: argparse.Namespace) -> int:
    """Run every relay on every workload, print the report, write the JSON; 1 if any run failed, 130 on Ctrl-C.

    Raises ``UsageError`` for a command line that cannot run (``parse``).
    """
    opts = parse(args)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    session = _Session(opts)
    started = datetime.now(timezone.utc)
    bar = _Progress(len(session.steps) + session.measure_start + len(session.alone), opts.progress)
    try:
        session.measure(bar)
    except KeyboardInterrupt:
        bar.close()
        print("interrupted", file=sys.stderr)
        return 130
    bar.close()
    report = session.report(started)
    print(format_report(report, notes()))
    for workload in session.alone:
        assert workload.alone_report is not None
        print("\n" + workload.alone_report(report[workload.name]))
    assert opts.json_path is not None
    opts.json_path.parent.mkdir(parents=True, exist_ok=True)
    logs = hdr.write_logs(opts.json_path, report["runs"])
    opts.json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nevery figure: {opts.json_path}")
    if logs:
        print(f"latency histograms (HdrHistogram logs): {', '.join(str(path) for path in logs)}")
    return 1 if session.failed else 0
