"""The report a bench run prints: pure functions of the figures (``figures``), returning text; no I/O.

``format_report`` gives the table of every run and the lines under it;
each workload's own lines (``stuck_lines``, ``filtered_lines``,
``fanout_lines``, ``format_client``) are named by its row in
``workloads.WORKLOADS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jitrelay.tools.bench.figures import LATENCY_WORKLOADS
from jitrelay.tools.bench.messages import STUCK_BATCH, STUCK_HEALTHY, STUCK_RATE
from jitrelay.tools.bench.options import BRIDGED

Notes = Callable[[dict], list[str]]  # a workload's lines under the table, from the whole report


def _m(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e6:.3f} M" if x >= 1e5 else f"{x:,.0f}"


def _us(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _x(ratio: dict | None, workload: str) -> str:
    if not ratio:
        return "-"
    if workload not in LATENCY_WORKLOADS:
        value = ratio["delivered_msg_per_s"]
        return "-" if value is None else f"{value:.2f}"
    if ratio["p50"] is None or ratio["p99"] is None:
        return "-"
    return f"{ratio['p50']:.2f}/{ratio['p99']:.2f}"


def format_report(report: dict, notes: Sequence[Notes] = ()) -> str:
    """The table, each of ``notes`` in turn, and the relay's own figures, as printed at the end of a run."""
    out = _table(report)
    for lines in notes:
        out += lines(report)
    out += _shared_memory_lines(report)
    out += _execution_lines(report)
    out += _read_path_lines(report)
    out += _bridge_lines(report)
    out += _own_lines(report["jitrelay"])
    out += _startup_lines(report["startup"])
    return "\n".join(out)


def _table(report: dict) -> list[str]:
    """Where and how it ran, then one line per run."""
    m = report["machine"]
    opts = report["options"]
    out = [
        f"{m['cores']} cores, {m['cpu_model']}, Python {m['python']}, numba {m['numba']}, pyzmq {m['pyzmq']}; "
        f"commit {report['git_commit'] or '-'}" + (" (uncommitted changes)" if report["git_dirty"] else ""),
        f"{opts['size']}-byte messages, {opts['duration']:g} s per run; W1 in 1 MiB batches (zmq: one frame each), "
        f"W2 at {opts['rate']:g} msg/s; latency one-way in microseconds",
        "",
        f"{'relay':<20} {'load':<4} {'subs':>4} {'delivered/s per sub':>19} {'lost':>16} "
        f"{'p50':>8} {'p99':>8} {'p99.9':>8} {'x raw':>11} {'x zmq':>11} {'x limit':>11}",
    ]
    for r in report["runs"]:
        head = f"{r['relay']:<20} {r['workload']:<4} {r['subscribers']:>4}"
        if "error" in r:
            out.append(f"{head}  failed: {r['error'].splitlines()[0][:80]}")
            continue
        lat = r["latency_us"] or {}
        lost = f"{r['lost_total']}" + (f" ({100 * r['lost_fraction']:.1f}%)" if r["lost_total"] else "")
        out.append(
            f"{head} {_m(r['delivered_msg_per_s_mean']):>19} {lost:>16} {_us(lat.get('p50')):>8} "
            f"{_us(lat.get('p99')):>8} {_us(lat.get('p99_9')):>8} {_x(r.get('ratio_to_raw'), r['workload']):>11} "
            f"{_x(r.get('ratio_to_zmq'), r['workload']):>11} {_x(r.get('ratio_to_limit'), r['workload']):>11}"
        )
    out.append(
        "x raw, x zmq, x limit: W1 delivered msg/s over the baseline's; W2 p50/p99 latency over the baseline's "
        "(limit: the compiled raw-bytes forwarder)"
    )
    return out


def _done(report: dict, workload: str) -> list[dict]:
    """The runs of ``workload`` that produced figures."""
    return [r for r in report["runs"] if r["workload"] == workload and "error" not in r]


def stuck_lines(report: dict) -> list[str]:
    """W3: each relay's worst latency beside the subscriber that never reads, and over the raw forwarder's."""
    return [_stuck_line(r) for r in _done(report, "w3")]


def _stuck_line(run: dict) -> str:
    ratio = (run.get("ratio_to_raw") or {}).get("max")
    return (
        f"{run['relay']} w3: {STUCK_HEALTHY} subscribers beside one that never reads, {STUCK_RATE:,} msg/s in "
        f"batches of {STUCK_BATCH}: worst latency {_us(run['latency_us']['max'])} us"
        + ("" if ratio is None else f" = {ratio:.2f} x raw's")
    )


def filtered_lines(report: dict) -> list[str]:
    """W1f: each jitrelay relay's rate per filtered subscriber, over the unfiltered W1 of the same run."""
    return [_filtered_line(r) for r in _done(report, "w1f")]


def _filtered_line(run: dict) -> str:
    per_sub, stream = run.get("ratio_to_unfiltered"), run.get("stream_ratio_to_unfiltered")
    return (
        f"{run['relay']} w1f: four subscribers, one TLV type each (a quarter of the stream): "
        f"{_m(run['delivered_msg_per_s_mean'])} msg/s per subscriber"
        + ("" if per_sub is None else f" = {per_sub:.2f} x unfiltered W1 with 4, stream rate {stream:.2f} x")
    )


def _read_path_lines(report: dict) -> list[str]:
    """The compiled read path over the other read paths (``jitrelay-py``, ``jitrelay-uv``) in the same run."""
    out = []
    for r in report["runs"]:
        for path, theirs in (("python", "the Python steps'"), ("uvloop", "the event loop's reads'")):
            ratio = r.get(f"ratio_to_{path}_read_path")
            if "error" in r or not ratio or r["workload"] not in ("w1", "w2"):
                continue
            shown = (
                f"p50 / p99 latency {_over(ratio, 'p50')} / {_over(ratio, 'p99')} x"
                if r["workload"] == "w2"
                else f"{_over(ratio, 'delivered_msg_per_s')} x the msg/s"
            )
            out.append(f"{r['relay']} {r['workload']} {r['subscribers']} sub, compiled read path: {shown} {theirs}")
    return [""] + out if out else []


def _execution_lines(report: dict) -> list[str]:
    """The execution relay's W1 and W2 over market_data's of the same run: what its checksums and journal cost."""
    runs = [r for r in report["runs"] if r["relay"].partition(":")[0] == "jitrelay-exec" and "error" not in r]
    out = []
    for r in runs:
        ratio = r.get("ratio_to_market_data")
        if not ratio or r["workload"] not in ("w1", "w2"):
            continue
        if r["workload"] == "w2":
            lat = r["latency_us"]
            shown = (
                f"p50 {_us(lat['p50'])} us, p99 {_us(lat['p99'])} us = "
                f"{_over(ratio, 'p50')} / {_over(ratio, 'p99')} x market_data's"
            )
        else:
            shown = (
                f"{_m(r['delivered_msg_per_s_mean'])} msg/s per sub = "
                f"{_over(ratio, 'delivered_msg_per_s')} x market_data's"
            )
        out.append(f"{r['relay']} {r['workload']} {r['subscribers']} sub: {shown} (journal on)")
    return [""] + out if out else []


def _bridge_lines(report: dict) -> list[str]:
    """The bridged runs: W1 over the local relay's rate, W2 latency the bridges add."""
    bridged = [r for r in report["runs"] if r["relay"] in BRIDGED and "error" not in r]
    if not bridged:
        return []
    out = [
        "",
        "bridge: publisher on host A, subscribers on host B, through two bridges and a 3-node NATS cluster",
        "(bridge: core NATS; bridge-js: a JetStream stream, 3 replicas, both relays under block)",
    ]
    for r in bridged:
        label = f"{r['relay']} {r['workload']} {r['subscribers']} sub"
        if r["workload"] == "w1":
            ratio = (r.get("ratio_to_local") or {}).get("delivered_msg_per_s")
            share = "-" if ratio is None else f"{ratio:.3f}"
            out.append(f"{label}: {_m(r['delivered_msg_per_s_mean'])} msg/s delivered, {share} of the local relay's")
        else:
            added = r.get("latency_added_us")
            shown = "-" if added is None else f"p50 {added['p50']:+.1f} us, p99 {added['p99']:+.1f} us"
            out.append(f"{label}: latency added by the bridge {shown}")
    return out


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} MiB"


def _own_lines(own: dict | None) -> list[str]:
    """The jitrelay relay's memory during W1 and its forwarding time per batch in each run."""
    if not own:
        return []
    out = [
        "",
        f"jitrelay resident memory during W1: peak {_mib(own['w1_peak_rss_mib'])} sampled every 50 ms, "
        f"VmHWM {_mib(own['w1_vm_hwm_mib'])}, of which private (RssAnon) {_mib(own['w1_peak_anon_mib'])}",
    ]
    for fwd in own["forwarding"]:
        label = f"{fwd['relay']} {fwd['workload']} {fwd['subscribers']} sub"
        if not fwd["logged"]:
            out.append(f"jitrelay forwarding time per batch, {label}: no summary file from this relay")
        else:
            ns = fwd["ns_per_message"]
            out.append(
                f"jitrelay forwarding time per batch, {label}: p50 {_us(fwd['p50_us'])} us, "
                f"p99 {_us(fwd['p99_us'])} us, p99.9 {_us(fwd['p99_9_us'])} us; "
                + ("-" if ns is None else f"{ns:.1f}")
                + f" ns per message; own part p50 {_us(fwd['own_p50_us'])} us, p99 {_us(fwd['own_p99_us'])} us, "
                f"inside send calls p50 {_us(fwd['send_p50_us'])} us"
            )
    return out


def _startup_lines(start: dict | None) -> list[str]:
    """How long ``jitrelay run`` takes until it listens, warm and cold."""
    if not start:
        return []
    kernels = start["cold_kernels_s"]
    return [
        f"jitrelay run until listening: warm {start['warm_median_s']:.2f} s (median of {len(start['warm_s'])}), "
        f"cold {start['cold_s']:.2f} s (empty cache: building the kernels costs {start['cold_compile_s']:.2f} s"
        + ("" if kernels is None else f"; kernels ready in {kernels:.2f} s")
        + ")"
    ]


def fanout_lines(report: dict) -> list[str]:
    """Fanout: per subscriber count and relay, the time until the last subscriber had each message."""
    fanout = _done(report, "fanout")
    if not fanout:
        return []
    first = fanout[0]
    out = [
        "",
        f"fanout: one message every {first['interval_ms']:g} ms, subscribers spread over at most "
        f"{report['options'].get('fanout_hosts', '-')} processes (one polling loop each); "
        "time until the LAST subscriber had it, us",
        f"{'relay':<20} {'subs':>4} {'p50':>8} {'p99':>8} {'first p50':>9} {'x raw p50':>9} {'x sock p50':>10} "
        f"{'lost':>6} {'relay RSS':>10} {'relay CPU':>9} {'fwd p50':>8} {'own p50':>8}",
    ]
    for r in sorted(fanout, key=lambda r: (r["subscribers"], r["relay"])):
        lat, fwd = r["latency_us"], r["relay_forwarding"] or {}
        rss = r["relay_memory"]["peak_sampled_mib"]
        to_raw, to_socket = _over(r.get("ratio_to_raw"), "p50"), _over(r.get("ratio_to_socket"), "p50")
        out.append(
            f"{r['relay']:<20} {r['subscribers']:>4} {_us(lat['p50']):>8} {_us(lat['p99']):>8} "
            f"{_us(r['first_us']['p50']):>9} {to_raw:>9} {to_socket:>10} {r['lost_total']:>6} "
            + _mib(rss).rjust(10)
            + f" {r['relay_cpu_percent']:>8.0f}% {_us(fwd.get('p50_us')):>8} {_us(fwd.get('own_p50_us')):>8}"
        )
    return out


def _subscribers(run: dict) -> int:
    """A run's subscriber count: the sort key of the fanout runs."""
    return run["subscribers"]


def _over(ratio: dict | None, key: str) -> str:
    """One figure of a ratio (``ratio_to_raw`` and the like), or ``-``."""
    value = (ratio or {}).get(key)
    return "-" if value is None else f"{value:.2f}"


def _shared_memory_lines(report: dict) -> list[str]:
    """The shared-memory subscribers' figures over the raw forwarder's and the socket subscribers' of the same run."""
    shm = [r for r in report["runs"] if r["relay"].partition(":")[0] == "jitrelay-shm" and "error" not in r]
    if not shm:
        return []
    out = [
        "",
        "jitrelay-shm (subscribers read the relay's log from shared memory) x raw forwarder, x socket subscribers:",
    ]

    for r in shm:
        key = "p50" if r["workload"] in LATENCY_WORKLOADS else "delivered_msg_per_s"
        what = (
            "p50 latency" if r["workload"] == "w2" else "p50 until the last has it" if key == "p50" else "msg/s per sub"
        )
        if r["workload"] == "w3":
            continue
        out.append(
            f"  {r['relay']} {r['workload']} {r['subscribers']} sub: {what} {_over(r.get('ratio_to_raw'), key)} x raw, "
            f"{_over(r.get('ratio_to_socket'), key)} x socket"
        )
    for name in dict.fromkeys(r["relay"] for r in shm):  # each variant (policy) on its own
        fanout = sorted((r for r in shm if r["workload"] == "fanout" and r["relay"] == name), key=_subscribers)
        if len(fanout) > 1 and fanout[0]["relay_forwarding"] and fanout[-1]["relay_forwarding"]:
            low, high = fanout[0], fanout[-1]
            a, b = low["relay_forwarding"], high["relay_forwarding"]
            grow = b["p50_us"] / a["p50_us"] if a["p50_us"] else None
            out.append(
                f"  {name} forwarding time per batch, fanout {low['subscribers']} -> {high['subscribers']} "
                f"subscribers: p50 {_us(a['p50_us'])} -> {_us(b['p50_us'])} us"
                + ("" if grow is None else f" ({grow:.2f} x)")
                + f", p99 {_us(a['p99_us'])} -> {_us(b['p99_us'])} us, own p50 {_us(a['own_p50_us'])} -> "
                f"{_us(b['own_p50_us'])} us"
            )
        for r in fanout:
            memory = r["relay_memory"]
            if memory["peak_sampled_mib"] is not None:
                out.append(
                    f"  {name} relay memory, fanout {r['subscribers']} subscribers: peak RSS "
                    f"{memory['peak_sampled_mib']:.1f} MiB, private {memory['peak_anon_mib']:.1f} MiB, "
                    f"VmHWM {memory['vm_hwm_mib']:.1f} MiB"
                )
    return out


def format_client(figures: dict) -> str:
    """The client workload's lines of the report."""

    def m(x: float | None) -> str:
        return "-" if x is None else f"{x / 1e6:.3f} M"

    def r(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    out = [f"client: {figures['message_size']}-byte messages, one call per message; msg/s and x pyzmq"]
    for label, key in (("publish", "publish"), ("receive", "receive")):
        rates, ratios = figures[f"{key}_msg_per_s"], figures[f"{key}_x_pyzmq"]
        out.append(f"  {label:<8} " + "  ".join(f"{k} {m(v)} ({r(ratios[k])} x)" for k, v in rates.items()))
    lat, raw, x = figures["w2_client_latency_us"], figures["w2_raw_latency_us"], figures["w2_client_x_raw"]
    if lat and raw and x:
        out.append(
            f"  W2 through Publisher/Subscriber: p50 {lat['p50']:.1f} us, p99 {lat['p99']:.1f} us; raw-socket W2 "
            f"p50 {raw['p50']:.1f} us, p99 {raw['p99']:.1f} us; x raw p50 {r(x['p50'])}, p99 {r(x['p99'])}"
        )
    drain = figures["receive_x_pyzmq_drain"]
    out.append("  receive x pyzmq-drain: " + "  ".join(f"{k} {r(v)}" for k, v in drain.items()))
    if figures.get("receive_ceiling_msg_per_s"):
        out.append(
            f"  receive ceiling (views of a batch in memory, no socket): {m(figures['receive_ceiling_msg_per_s'])} "
            f"= {r(figures['receive_ceiling_x_pyzmq_drain'])} x pyzmq-drain"
        )
    for key, error in figures["errors"].items():
        out.append(f"  {key} failed: {error.splitlines()[0][:100]}")
    return "\n".join(out)


def format_records(figures: dict) -> str:
    """The records workload's lines of the report."""

    def m(x: float | None) -> str:
        return "-" if x is None else f"{x / 1e6:.2f} M"

    def r(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    out = [
        f"records: trades, {figures['message_size']}-byte messages, {figures['batch_records']:,} per 1 MiB batch; "
        "records/s and x the struct loop of the same run"
    ]
    if "decode_records_per_s" in figures:
        rates, x, cost = figures["decode_records_per_s"], figures["decode_x_struct"], figures["decode_us_per_batch"]
        out.append(
            f"  decode  records.decode view {m(rates['view'])} ({r(x['view'])} x, {cost['view']:,.0f} us a batch)  "
            f"copy=True {m(rates['copy'])} ({r(x['copy'])} x, {cost['copy']:,.0f} us)  "
            f"struct.unpack_from {m(rates['struct'])} ({cost['struct']:,.0f} us)"
        )
    if "encode_records_per_s" in figures:
        rates = figures["encode_records_per_s"]
        out.append(
            f"  encode  records.encode {m(rates['kernel'])} ({r(figures['encode_x_struct'])} x)  "
            f"struct.pack_into {m(rates['struct'])}"
        )
    e2e, each = figures["end_to_end_msg_per_s"], figures["end_to_end_runs_msg_per_s"]
    out.append(
        f"  end to end, msg/s, the best of {len(each['bytes'])} runs each: "
        f'record_batches("trade") {m(e2e["records"])}, batches() {m(e2e["bytes"])}: '
        f"{r(figures['end_to_end_records_x_bytes'])} x "
        f"(runs: {', '.join(m(x) for x in each['records'])}; {', '.join(m(x) for x in each['bytes'])})"
    )
    for key, error in figures["errors"].items():
        out.append(f"  {key} failed: {error.splitlines()[0][:100]}")
    return "\n".join(out)
