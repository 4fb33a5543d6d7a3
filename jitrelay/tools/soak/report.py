"""The soak's report: what a run's figures add up to (a dict, written as JSON), and that dict as text.

Pure: the controller gathers the figures (counters, the relay's summary file,
failure details, gap checks) into ``RunFigures``; nothing here reads a file
or a process.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from jitrelay.core import protocol
from jitrelay.core.units import MiB
from jitrelay.tools.soak.counters import CLOSED_BY_RELAY, ENDED, ERROR, FAILURE_KINDS, Client, failures
from jitrelay.tools.soak.options import SoakOptions
from jitrelay.tools.soak.verify import MAX_DETAILS, GapCheck

KINDS = ("socket", "shm")


@dataclass
class RunFigures:
    """Everything a finished run knows, for ``build_report``."""

    opts: SoakOptions
    seed: int
    max_size: int
    relay_options: tuple[str, ...]
    clients: list[Client]
    detail_lines: dict[int, list[str]]  # by client index: the first failure details it wrote (JSON lines)
    gap_checks: dict[int, GapCheck]  # by client index: a positioned subscriber's gaps against the witness's record
    load_seconds: float = 0.0
    interrupted: bool = False
    kills: Counter[str] = field(default_factory=Counter)
    replaced: Counter[str] = field(default_factory=Counter)
    sigstops: int = 0
    sigstop_seconds: float = 0.0
    sigstopped: Counter[str] = field(default_factory=Counter)  # SIGSTOPs by the kind of subscriber stopped
    resumes: int = 0  # replacements that resumed from a killed subscriber's recorded position
    unrecorded: int = 0  # positioned subscribers killed before they had recorded one
    probes_sent: int = 0
    echo_beacons: int = 0
    echo_echoes: int = 0
    echo_error: str | None = None
    relay_exit: int | None = None
    relay_figures: dict | None = None  # its summary file
    relay_tail: list[str] = field(default_factory=list)  # the end of its log, when it died
    rss_samples: list[tuple[float, int]] = field(default_factory=list)


def relay_summary(figures: dict | None) -> dict | None:
    """What the report keeps of the relay's final figures (its summary file), or None when it wrote none.

    Raises ``KeyError`` for figures without the relay's counts.
    """
    if figures is None:
        return None
    verdicts = figures["verdicts"]
    return {
        "received": figures["messages_received"],
        "forwarded": figures["messages_forwarded"],
        "rejected": {name: verdicts[name] for name in protocol.REJECT_NAMES if verdicts.get(name)},
        "faults": figures["faults"],
        "control": verdicts.get("control", 0),
        "slow_dropped": figures["slow_actions"]["disconnect"],
        "connections": figures["connections_accepted"],
        "torn_messages": figures["torn_messages"],
    }


@dataclass
class _Judged:
    """The clients that failed other than by their stream, each list a failure kind of the report."""

    errors: list[Client]
    hung: list[Client]
    unexpected: list[Client]  # closed by the relay, not as slow
    miscut: list[Client]  # shared-memory readers cut off other than by a lap they reported
    torn: list[Client]  # a clean end with a torn message left over


def _judge(run: RunFigures, subs: list[Client], summary: dict | None, dropped_pids: set[int]) -> _Judged:
    """Which clients erred, hung, were closed or cut off unexpectedly, or ended on a torn message."""
    closed = [c for c in subs if not c.killed and c.stats.state == CLOSED_BY_RELAY]
    unexpected = [c for c in closed if c.pid not in dropped_pids]
    if summary and summary["slow_dropped"] > len(dropped_pids):  # more drops than the pids kept: trust the count
        unexpected = unexpected[summary["slow_dropped"] - len(dropped_pids) :]
    return _Judged(
        # A subscriber that stopped on a framing failure is counted under ``framing``, not as an error.
        errors=[c for c in run.clients if c.stats.state == ERROR and not (c.kind == "sub" and c.stats.framing > 0)],
        hung=[c for c in run.clients if c.hung],
        unexpected=unexpected,
        # A shared-memory reader is cut off only by a lap it reported itself, and one that asked for positions never.
        miscut=[
            c
            for c in subs
            if c.shm and not c.killed and c.pid in dropped_pids and (c.positioned or not c.stats.shm_cut_off)
        ],
        # The relay closes a stream between messages; bytes left over at a clean end are a torn message.
        torn=[c for c in subs if c.stats.state == ENDED and c.stats.tail],
    )


def _failures(run: RunFigures, subs: list[Client], judged: _Judged, summary: dict | None) -> Counter[str]:
    """The run's failures by kind, in the report's order; ``missing`` and the relay's are added by the caller."""
    counts: Counter[str] = Counter()
    for client in subs:
        for kind in FAILURE_KINDS:
            counts[kind] += getattr(client.stats, kind)
    counts["client_error"] = len(judged.errors) + (run.echo_error is not None)
    counts["client_hung"] = len(judged.hung)
    counts["unexpected_close"] = len(judged.unexpected)
    counts["shm_cut_off"] = len(judged.miscut)
    counts["torn_tail"] = len(judged.torn)
    counts["position"] = sum(c.stats.position_failures for c in subs)
    counts["gap_count"] = sum(check.mismatches for check in run.gap_checks.values())
    return counts


def _details(run: RunFigures, subs: list[Client], judged: _Judged, missing: dict[str, int]) -> list[dict]:
    """The failures' details, the clients' own first, then each failure the report found."""
    details = []
    for client in subs + judged.errors:
        for line in run.detail_lines.get(client.index, []):
            details.append({"client": f"{client.kind}-{client.index}", "role": _role(client), **json.loads(line)})
    if run.echo_error is not None:
        details.append({"client": "echo", "kind": "error", "error": run.echo_error})
    details += [{"client": f"sub-{c.index}", "kind": "torn_tail", "bytes": c.stats.tail} for c in judged.torn]
    details += [{"client": f"{c.kind}-{c.index}", "kind": "hung", "state": c.state} for c in judged.hung]
    details += [{"client": f"sub-{c.index}", "kind": "unexpected_close", "pid": c.pid} for c in judged.unexpected]
    details += [{"client": f"sub-{c.index}", "kind": "shm_cut_off", "role": _role(c)} for c in judged.miscut]
    details += [{"client": name, "kind": "missing", "messages": gap} for name, gap in missing.items() if gap]
    gap_details: list[dict] = []
    for check in run.gap_checks.values():
        gap_details += check.stream_details[: max(0, MAX_DETAILS - len(gap_details))]
        gap_details += check.gap_details
    return details + gap_details


def build_report(run: RunFigures) -> dict:
    """The run's report: its options, every figure, failures and their details, and whether it is OK."""
    subs = [c for c in run.clients if c.kind == "sub"]
    pubs = [c for c in run.clients if c.kind == "pub"]
    summary = relay_summary(run.relay_figures)
    dropped_pids = set(run.relay_figures["slow_disconnected_pids"]) if run.relay_figures else set()
    judged = _judge(run, subs, summary, dropped_pids)
    counts = _failures(run, subs, judged, summary)
    forwarded = summary["forwarded"] if summary else None
    complete = [
        c
        for c in subs
        if c.from_start and not c.killed and c.stats.state == ENDED and not c.filtered and not c.stats.changes
    ]
    soak_traffic = run.probes_sent + run.echo_beacons + run.echo_echoes
    missing = {}
    if forwarded is not None:
        missing = {f"sub-{c.index}": forwarded - soak_traffic - c.stats.verified for c in complete}
        counts["missing"] = sum(1 for m in missing.values() if m)
    counts["relay_rejected"] = sum((summary["rejected"] if summary else {}).values())
    counts["relay_faults"] = sum((summary["faults"] if summary else {}).values())
    relay_died = run.relay_exit != 0 or summary is None
    total_failures = sum(counts.values())
    report = {
        "domain": run.opts.domain,
        "seed": run.seed,
        "argv": run.opts.argv,
        "options": _options(run),
        "load_seconds": round(run.load_seconds, 3),
        "interrupted": run.interrupted,
        "messages_published": sum(c.stats.published for c in pubs),
        "messages_verified": sum(c.stats.verified for c in subs),
        "verification_failures": total_failures,
        "gaps": counts["sequence"] + counts["head"],
        "failures": dict(counts),
        "failure_details": _details(run, subs, judged, missing)[:20],
        "complete_subscribers": {
            "expected_each": None if forwarded is None else forwarded - soak_traffic,
            "missing": missing,
        },
        "subscriptions": _subscriptions(run, subs, summary),
        "faults": _faults(run, subs, summary, dropped_pids),
        "positions": _positions(run, subs),
        "kinds": {kind: _kind_figures(run, kind, subs, dropped_pids) for kind in KINDS},
        "clients": {"publishers": len(pubs), "subscribers": len(subs)},
        "relay": {
            "exit_code": run.relay_exit,
            "died": relay_died,
            "summary": summary,
            "probes": run.probes_sent,
            "log_tail": run.relay_tail if relay_died else [],
        },
        "rss": rss_figures(run.rss_samples, run.opts.duration),
    }
    report["ok"] = total_failures == 0 and not relay_died
    return report


def _options(run: RunFigures) -> dict[str, Any]:
    """The options the run had, as the report names them."""
    opts = run.opts
    return {
        "duration_s": opts.duration,
        "rate": opts.rate,
        "publishers": opts.publishers,
        "subscribers": opts.subscribers,
        "churn_per_s": opts.churn,
        "stall_prob": opts.stall_prob,
        "stall_max_s": opts.stall_max,
        "filtered": opts.filtered,
        "resubscribe_prob": opts.resubscribe,
        "resuming": opts.resuming,
        "sigstop_per_s": opts.sigstop,
        "shm": opts.shm,
        "max_size": run.max_size,
        "relay_options": list(run.relay_options),
    }


def _subscriptions(run: RunFigures, subs: list[Client], summary: dict | None) -> dict[str, Any]:
    """What the subscribers' subscriptions and their changes came to."""
    return {
        "subscribed_at_connect": sum(1 for c in subs if c.stats.subscribed),
        "subscribers_changed": sum(1 for c in subs if c.stats.changes),
        "changes": sum(c.stats.changes for c in subs),
        "unsubscribes": sum(c.stats.unsubscribes for c in subs),
        "messages_verified": sum(c.stats.filtered_verified for c in subs),
        "windows_closed_by_message": sum(c.stats.by_message for c in subs),
        "windows_closed_by_echo": sum(c.stats.by_echo for c in subs),
        "streams_skipped_ahead": sum(c.stats.skipped_ahead for c in subs),
        "beacons_echoed": run.echo_beacons,
        "relay_control_messages": summary["control"] if summary else None,
    }


def _faults(run: RunFigures, subs: list[Client], summary: dict | None, dropped_pids: set[int]) -> dict[str, Any]:
    """The faults the run made (kills, stalls, SIGSTOPs) and the ones the relay dealt (drops, torn messages)."""
    dropped = Counter(c.kind for c in run.clients if c.pid in dropped_pids)  # killed ones too
    return {
        "clients_killed": sum(run.kills.values()),
        "publishers_killed": run.kills["pub"],
        "subscribers_killed": run.kills["sub"],
        "torn_messages_discarded": summary["torn_messages"] if summary else None,
        "subscribers_dropped_slow": dropped["sub"],
        "publishers_dropped_slow": dropped["pub"],
        "relay_slow_dropped": summary["slow_dropped"] if summary else None,
        "stalls": sum(c.stats.stalls for c in subs),
        "stall_seconds": round(sum(c.stats.stall_ms for c in subs) / 1000, 1),
        "sigstops": run.sigstops,
        "sigstop_seconds": round(run.sigstop_seconds, 1),
        "clients_replaced_after_exit": dict(run.replaced),
    }


def _positions(run: RunFigures, subs: list[Client]) -> dict[str, Any]:
    """The positioned subscribers' figures, and their gaps as checked against the witness's record."""
    positioned = [c for c in subs if c.positioned]
    figures = run.relay_figures
    checks = run.gap_checks.values()
    mismatches = sum(check.mismatches for check in checks)
    return {
        "positioned_subscribers": len(positioned),
        "resumes": run.resumes,
        "killed_before_recording": run.unrecorded,
        "positions_recorded": sum(c.stats.recorded for c in positioned),
        "set_aside_before_notice": sum(c.stats.before_notice for c in positioned),
        "gap_notices": sum(c.stats.gap_notices for c in positioned),
        "messages_missed": sum(c.stats.gap_messages for c in positioned),
        "relay_gap_notices": (figures or {}).get("slow_actions", {}).get("gap_notice"),
        "dropped_as_slow": sum(1 for c in positioned if figures and c.pid in figures["slow_disconnected_pids"]),
        "gaps_checked": sum(check.gaps_checked for check in checks),
        "missed_stream_messages": sum(check.missed_stream_messages for check in checks),
        "missed_soak_traffic": sum(check.missed_soak_traffic for check in checks),
        "streams_checked": sum(check.streams_checked for check in checks),
        "gaps_unchecked": sum(check.gaps_unchecked for check in checks),
        "position_failures": sum(c.stats.position_failures for c in positioned),
        "gap_count_failures": mismatches,
    }


def _kind_figures(run: RunFigures, kind: str, subs: list[Client], dropped_pids: set[int]) -> dict[str, Any]:
    """What the subscribers of one kind (``socket`` or ``shm``: how they read) ran and verified, and lost."""
    mine = [c for c in subs if _kind(c) == kind]
    positioned = [c for c in mine if c.positioned]
    return {
        "subscribers": len(mine),
        "granted": sum(c.stats.shm_granted for c in mine),
        "positioned": len(positioned),
        "resumed": sum(1 for c in mine if c.resumed),
        "filtered": sum(1 for c in mine if c.filtered),
        "killed": sum(1 for c in mine if c.killed),
        "sigstops": run.sigstopped[kind],
        "messages_verified": sum(c.stats.verified for c in mine),
        "verified_under_a_subscription": sum(c.stats.filtered_verified for c in mine),
        "failures": sum(failures(c.stats, ("position_failures",)) for c in mine),
        "gap_notices": sum(c.stats.gap_notices for c in positioned),
        "messages_missed": sum(c.stats.gap_messages for c in positioned),
        "laps": sum(c.stats.shm_laps for c in mine),  # shm: laps a positioned reader recorded as gaps
        "cut_off": sum(1 for c in mine if c.pid in dropped_pids),  # dropped as slow, lapped (shm)
        "cut_off_by_lap": sum(c.stats.shm_cut_off for c in mine),
    }


def rss_figures(samples: list[tuple[float, int]], duration: float) -> dict[str, Any]:
    """The relay's resident memory at the start, after warm-up, at most and at the end, with every sample."""
    if not samples:
        return {"start_mib": None, "warmup_mib": None, "max_mib": None, "end_mib": None, "samples": []}
    warmup_at = max(5.0, 0.1 * duration)
    warm = next((rss for t, rss in samples if t >= warmup_at), samples[-1][1])
    end = samples[-1][1]
    return {
        "start_mib": samples[0][1] / MiB,
        "warmup_at_s": warmup_at,
        "warmup_mib": warm / MiB,
        "max_mib": max(rss for _, rss in samples) / MiB,
        "end_mib": end / MiB,
        "end_over_warmup": end / warm,
        "samples": [[round(t, 2), rss] for t, rss in samples],
    }


def _kind(client: Client) -> str:
    """How a subscriber reads its stream: from its socket, or from the relay's log in shared memory."""
    return "shm" if client.shm else "socket"


def _role(client: Client) -> str:
    """What a client was, for a failure's detail."""
    if client.kind == "pub":
        return f"publisher {client.key:#06x}"
    kind = (
        "witness"
        if client.witness
        else "positioned"
        if client.positioned
        else "filtered"
        if client.filtered
        else "plain"
    )
    changes = client.stats.changes
    return (
        kind
        + (", shared memory" if client.shm else "")
        + (", resumed" if client.resumed else "")
        + (", initial" if client.from_start else "")
        + (f", {changes} subscription changes" if changes else "")
    )


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _message_rows(report: dict) -> list[tuple[str, str]]:
    """The report's rows on messages, failures and subscriptions."""
    fail = report["failures"]
    expected = report["complete_subscribers"]["expected_each"]
    missing = report["complete_subscribers"]["missing"]
    subs = report["subscriptions"]
    return [
        ("load", f"{report['load_seconds']:.1f} s" + (" (interrupted)" if report["interrupted"] else "")),
        ("messages published", f"{report['messages_published']:,}"),
        (
            "messages verified",
            f"{report['messages_verified']:,} (CRC-32 and sequence, by {report['clients']['subscribers']} subscribers)",
        ),
        (
            "verification failures",
            f"{report['verification_failures']} ("
            + ", ".join(
                f"{k} {v}" for k, v in fail.items() if v or k in ("crc", "sequence", "subscription", "gap_count")
            )
            + ")",
        ),
        ("gaps", str(report["gaps"])),
        (
            "subscriptions",
            f"{subs['subscribed_at_connect']} at connect, {subs['changes']} changes by "
            f"{subs['subscribers_changed']} subscribers ({subs['unsubscribes']} unsubscribes); "
            f"relay read {'-' if subs['relay_control_messages'] is None else subs['relay_control_messages']} "
            "control messages",
        ),
        (
            "verified under a subscription",
            f"{subs['messages_verified']:,} (switch windows closed: {subs['windows_closed_by_message']} by a "
            f"message, {subs['windows_closed_by_echo']} by the echo; {subs['streams_skipped_ahead']} streams "
            "went on from the head after a change)",
        ),
        (
            "complete subscribers",
            "-"
            if expected is None
            else f"{len(missing)} verified {expected:,} each, missing {sum(abs(m) for m in missing.values())}",
        ),
    ]


def _fault_rows(report: dict) -> list[tuple[str, str]]:
    """The report's rows on faults, positions, gaps and each kind of subscriber."""
    f, pos = report["faults"], report["positions"]
    relay_gaps = pos["relay_gap_notices"]
    return [
        (
            "clients killed (SIGKILL)",
            f"{f['clients_killed']} ({f['publishers_killed']} pub, {f['subscribers_killed']} sub)",
        ),
        ("torn messages discarded", str(f["torn_messages_discarded"])),
        (
            "dropped as slow",
            f"{f['subscribers_dropped_slow']} sub, {f['publishers_dropped_slow']} pub "
            f"(relay's count: {f['relay_slow_dropped']})",
        ),
        ("stalls", f"{f['stalls']} ({f['stall_seconds']} s)"),
        ("SIGSTOP stalls", f"{f['sigstops']} ({f['sigstop_seconds']} s)"),
        (
            "positioned subscribers",
            f"{pos['positioned_subscribers']}, {pos['positions_recorded']:,} positions recorded; "
            f"{pos['resumes']} resumes after SIGKILL ({pos['killed_before_recording']} killed before recording); "
            f"{pos['set_aside_before_notice']} sent before the resume took effect, set aside; "
            f"{pos['dropped_as_slow']} dropped as slow",
        ),
        (
            "gap notices",
            f"{pos['gap_notices']} read (relay sent {'-' if relay_gaps is None else relay_gaps}), "
            f"{pos['messages_missed']:,} messages missed ({pos['missed_stream_messages']:,} of streams, "
            f"{pos['missed_soak_traffic']:,} soak traffic); {pos['gaps_checked']} gaps and {pos['streams_checked']} "
            f"streams checked against the witness, {pos['gap_count_failures']} wrong",
        ),
        *(
            (
                f"{kind} subscribers",
                f"{k['subscribers']} ({k['positioned']} positioned, {k['resumed']} resumed, {k['filtered']} "
                f"filtered; {k['killed']} killed, {k['sigstops']} SIGSTOPs), {k['messages_verified']:,} messages "
                f"verified, {k['failures']} failures; {k['gap_notices']} gaps ({k['messages_missed']:,} messages), "
                f"{k['cut_off']} cut off"
                + (
                    f"; {k['granted']} granted the log, {k['laps']} laps, {k['cut_off_by_lap']} by a lap"
                    if kind == "shm"
                    else ""
                ),
            )
            for kind, k in report["kinds"].items()
        ),
    ]


def _relay_rows(report: dict) -> list[tuple[str, str]]:
    """The report's rows on the relay, and the result."""
    r, relay = report["rss"], report["relay"]
    summary = relay["summary"] or {}
    return [
        ("relay received/forwarded", f"{summary.get('received', '-')} / {summary.get('forwarded', '-')}"),
        ("relay rejected / faults", f"{summary.get('rejected') or 0} / {summary.get('faults') or 0}"),
        (
            "relay RSS MiB",
            f"start {_mib(r['start_mib'])}, warm-up {_mib(r['warmup_mib'])}, max {_mib(r['max_mib'])}, "
            f"end {_mib(r['end_mib'])}",
        ),
        ("relay exit", "died" if relay["died"] else f"code {relay['exit_code']}"),
        ("result", "OK" if report["ok"] else "FAILED"),
    ]


def format_report(report: dict) -> str:
    """The report as the lines ``jitrelay soak`` prints: a head line, one row per figure, the first failures.

    Raises ``KeyError`` for a dict that is not ``build_report``'s.
    """
    o = report["options"]
    rows = _message_rows(report) + _fault_rows(report) + _relay_rows(report)
    head = (
        f"jitrelay soak: {report['domain']} relay, {o['duration_s']:g} s at {o['rate']:g} msg/s, "
        f"{o['publishers']} publishers, {o['subscribers']} subscribers, churn {o['churn_per_s']:g}/s, "
        f"seed {report['seed']}"
    )
    width = max(len(k) for k, _ in rows)
    body = [f"  {k:<{width}}  {v}" for k, v in rows]
    for detail in report["failure_details"][:5]:
        body.append(f"  ! {json.dumps(detail)[:300]}")
    for line in report["relay"]["log_tail"]:
        body.append(f"  relay: {line}")
    return "\n".join([head, *body])
