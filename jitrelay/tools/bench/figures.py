"""The figures of a bench run: each run's, from its processes' reports, then set against each other.

``summarize`` and ``summarize_fanout`` turn one run's reports into its
figures, ``add_ratios`` sets every run against the baselines of the same
workload, ``jitrelay_summary`` gathers the jitrelay relay's own; ``machine``
and ``git_commit`` say where and on what they were measured.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from jitrelay.tools.bench.hdr import encode_latencies
from jitrelay.tools.bench.messages import FILTERED_SUBSCRIBERS, STUCK_RATE, share, stride_of
from jitrelay.tools.bench.options import BRIDGED, JITRELAYS, READ_PATH_BASELINES, Options

LATENCY_WORKLOADS = ("w2", "w3", "fanout")  # their figures are latency percentiles, not a rate


def relay_forwarding(figures: dict | None) -> dict | None:
    """A stopped jitrelay relay's forwarding time per batch, from its summary file; None without one (a baseline)."""
    if figures is None:
        return None
    return {
        "p50_us": figures["forward_p50_us"],
        "p99_us": figures["forward_p99_us"],
        "p99_9_us": figures["forward_p99_9_us"],
        "ns_per_message": figures["forward_ns_per_message"],
        # The relay's own part (read to the send loop's call) and the part inside the send loop's system calls.
        "own_p50_us": figures["own_p50_us"],
        "own_p99_us": figures["own_p99_us"],
        "send_p50_us": figures["send_p50_us"],
        "send_p99_us": figures["send_p99_us"],
    }


def percentiles(values: Any) -> dict:
    """p50, p99, p99.9, max and mean of a numpy array of samples; None for each when it is empty."""
    import numpy as np

    if not len(values):
        return {"samples": 0, "p50": None, "p99": None, "p99_9": None, "max": None, "mean": None}
    p50, p99, p999 = np.percentile(values, [50, 99, 99.9])
    return {
        "samples": int(len(values)),
        "p50": float(p50),
        "p99": float(p99),
        "p99_9": float(p999),
        "max": float(values.max()),
        "mean": float(values.mean()),
    }


def summarize(relay: str, workload: str, opts: Options, pub: dict, subs: list[dict], relay_cpu: float) -> dict:
    """One run's figures: each subscriber against its ``share`` of the messages sent."""
    import numpy as np

    sent = pub["sent"]
    elapsed = pub["elapsed_s"]
    stride = stride_of(workload)
    wanted = []
    for k, sub in enumerate(subs):
        want, last = share(sent, stride, k % stride)
        wanted.append(want)
        sub["expected"] = want
        sub["lost"] = want - sub["received"]
        sub["last_sequence_ok"] = sub["last_sequence"] == last
        span = sub["first_to_last_s"]
        sub["msg_per_s"] = sub["received"] / span if span > 0 else 0.0
    rates = [s["msg_per_s"] for s in subs]
    lost = [s["lost"] for s in subs]
    figures: dict[str, Any] = {
        "relay": relay,
        "workload": workload,
        "subscribers": len(subs),
        "message_size": opts.size,
        "duration_s": opts.duration,
        "sent": sent,
        "publisher_msg_per_s": sent / elapsed if elapsed > 0 else 0.0,
        "delivered_msg_per_s": rates,
        "delivered_msg_per_s_mean": float(np.mean(rates)),
        "delivered_mb_per_s_mean": float(np.mean(rates)) * opts.size / 1e6,
        "lost": lost,
        "lost_total": sum(lost),
        "lost_fraction": sum(lost) / sum(wanted) if sum(wanted) else 0.0,
        "latency_us": None,
        "relay_cpu_percent": 100 * relay_cpu / elapsed if elapsed > 0 else 0.0,
        "publisher_cpu_percent": 100 * pub["cpu_s"] / elapsed if elapsed > 0 else 0.0,
        "subscriber_cpu_percent": [100 * s["cpu_s"] / elapsed if elapsed > 0 else 0.0 for s in subs],
        "publisher": pub,
        "per_subscriber": subs,
    }
    if workload in ("w2", "w3"):
        figures["rate"] = opts.rate if workload == "w2" else STUCK_RATE
        samples = np.concatenate([np.frombuffer(s.pop("latency_ns"), dtype=np.int64) for s in subs])
        figures["latency_us"] = percentiles(samples / 1e3)
        figures["latency_hdr"] = encode_latencies(samples)  # against the intended send times, in ns
    return figures


def add_ratios(runs: list[dict]) -> None:
    """Each run's figures over the raw forwarder's, the lossless zmq proxy's and the C limit's on the same workload.

    A bridged run is also set against the local relay's: its W1 rate over the
    local one (``ratio_to_local``), and on W2 the latency the bridges add
    (``latency_added_us``: bridged percentile minus local percentile). An
    execution relay's run (``jitrelay-exec``, journal on) is set against the
    market_data relay of the same policy (``ratio_to_market_data``): what the
    checksums and the journal cost. The ``jitrelay`` run is set against
    ``jitrelay-py`` (``ratio_to_python_read_path``) and ``jitrelay-uv``
    (``ratio_to_uvloop_read_path``): what the relay's own compiled reads gain
    over the engine's Python steps, and over the event loop's reads.
    """
    done = [r for r in runs if "error" not in r]

    def by_workload(relay: str) -> dict[tuple[str, int], dict]:
        return {(r["workload"], r["subscribers"]): r for r in done if r["relay"] == relay}

    for r in done:
        if r["workload"] != "w1f":
            continue
        base = by_workload(r["relay"]).get(("w1", FILTERED_SUBSCRIBERS))
        if base is not None and base["delivered_msg_per_s_mean"]:
            per_sub = r["delivered_msg_per_s_mean"] / base["delivered_msg_per_s_mean"]
            r["ratio_to_unfiltered"] = per_sub
            # Each filtered subscriber gets a quarter of the stream: the stream rate is four times its rate.
            r["stream_ratio_to_unfiltered"] = per_sub * FILTERED_SUBSCRIBERS
    for base_name, key in (("raw", "ratio_to_raw"), ("zmq", "ratio_to_zmq"), ("limit", "ratio_to_limit")):
        bases = by_workload(base_name)
        for r in done:
            r[key] = _ratio(r, bases.get((r["workload"], r["subscribers"])))
    for r in done:  # shared-memory subscribers against socket subscribers of the same relay (and policy)
        base, _, policy = r["relay"].partition(":")
        if base == "jitrelay-shm":
            sockets = by_workload("jitrelay" + (f":{policy}" if policy else ""))
            r["ratio_to_socket"] = _ratio(r, sockets.get((r["workload"], r["subscribers"])))
        elif base == "jitrelay-exec":
            market_data = by_workload("jitrelay" + (f":{policy}" if policy else ""))
            r["ratio_to_market_data"] = _ratio(r, market_data.get((r["workload"], r["subscribers"])))
        elif base == "jitrelay":  # the compiled read path against the other read paths of the same relay
            for baseline, path in READ_PATH_BASELINES.items():
                steps = by_workload(baseline + (f":{policy}" if policy else ""))
                r[f"ratio_to_{path}_read_path"] = _ratio(r, steps.get((r["workload"], r["subscribers"])))
    local = by_workload("jitrelay")
    for r in done:
        if r["relay"] in BRIDGED:
            base = local.get((r["workload"], r["subscribers"]))
            r["ratio_to_local"] = _ratio(r, base)
            if r["workload"] == "w2":
                r["latency_added_us"] = _added(r, base)


def _added(run: dict, base: dict | None) -> dict | None:
    if base is None or run["latency_us"]["p50"] is None or base["latency_us"]["p50"] is None:
        return None
    return {p: run["latency_us"][p] - base["latency_us"][p] for p in ("p50", "p99")}


def _ratio(run: dict, base: dict | None) -> dict | None:
    def over(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    if base is None:
        return None
    if run["workload"] not in LATENCY_WORKLOADS:
        return {"delivered_msg_per_s": over(run["delivered_msg_per_s_mean"], base["delivered_msg_per_s_mean"])}
    mine, theirs = run["latency_us"], base["latency_us"]
    return {p: over(mine[p], theirs[p]) for p in ("p50", "p99", "p99_9", "max")}


def summarize_fanout(relay: str, opts: Options, pub: dict, hosts: list[dict], relay_cpu: float) -> dict:
    """Per message: its delay to each subscriber; the largest (the last to have it) is what fanout reports."""
    import numpy as np

    sent, elapsed = pub["sent"], pub["elapsed_s"]
    held = [len(host["subscribers"]) for host in hosts]
    subs = [sub for host in hosts for sub in host.pop("subscribers")]
    delays = np.full((len(subs), sent), -1, dtype=np.int64)
    for k, sub in enumerate(subs):
        seqs = np.frombuffer(sub.pop("sequences"), dtype=np.uint64)
        got = np.frombuffer(sub.pop("delays_ns"), dtype=np.int64)
        inside = seqs < sent
        delays[k, seqs[inside].astype(np.int64)] = got[inside]
        sub["expected"] = sent
        sub["lost"] = sent - sub["received"]
        sub["last_sequence_ok"] = sub["last_sequence"] == sent - 1
    complete = (delays >= 0).all(axis=0)
    reached = delays[:, complete]
    lost = [s["lost"] for s in subs]
    return {
        "relay": relay,
        "workload": "fanout",
        "subscribers": len(subs),
        "hosts": len(hosts),
        "hosting": held,
        "message_size": opts.size,
        "duration_s": opts.duration,
        "interval_ms": opts.fanout_interval_ms,
        "sent": sent,
        "publisher_msg_per_s": sent / elapsed if elapsed > 0 else 0.0,
        "delivered_msg_per_s_mean": None,
        "reached_all": int(complete.sum()),
        "lost": lost,
        "lost_total": sum(lost),
        "lost_fraction": sum(lost) / (sent * len(subs)) if sent and subs else 0.0,
        # The time until the last subscriber had the message: the fanout figure.
        "latency_us": percentiles(reached.max(axis=0) / 1e3) if reached.size else percentiles(np.array([])),
        "first_us": percentiles(reached.min(axis=0) / 1e3) if reached.size else percentiles(np.array([])),
        "each_us": percentiles(delays[delays >= 0] / 1e3),
        "relay_cpu_percent": 100 * relay_cpu / elapsed if elapsed > 0 else 0.0,
        "publisher_cpu_percent": 100 * pub["cpu_s"] / elapsed if elapsed > 0 else 0.0,
        "host_cpu_percent": [100 * h["cpu_s"] / elapsed if elapsed > 0 else 0.0 for h in hosts],
        "publisher": pub,
        "per_host": hosts,
        "per_subscriber": subs,
    }


def jitrelay_summary(runs: list[dict]) -> dict | None:
    """The jitrelay relay's own figures gathered over its runs: memory during W1 and forwarding time."""
    mine = [r for r in runs if r["relay"].partition(":")[0] in JITRELAYS and "error" not in r]
    if not mine:
        return None
    w1 = [r["relay_memory"] for r in mine if r["workload"] == "w1"]
    peaks = [m["peak_sampled_mib"] for m in w1 if m["peak_sampled_mib"] is not None]
    hwms = [m["vm_hwm_mib"] for m in w1 if m["vm_hwm_mib"] is not None]
    anons = [m["peak_anon_mib"] for m in w1 if m.get("peak_anon_mib") is not None]
    return {
        "w1_peak_rss_mib": max(peaks) if peaks else None,
        "w1_peak_anon_mib": max(anons) if anons else None,
        "w1_vm_hwm_mib": max(hwms) if hwms else None,
        "forwarding": [
            {"relay": r["relay"], "workload": r["workload"], "subscribers": r["subscribers"], **_or_nulls(r)}
            for r in mine
        ],
    }


def _or_nulls(run: dict) -> dict:
    fwd = run["relay_forwarding"]
    keys = ("p50_us", "p99_us", "p99_9_us", "ns_per_message", "own_p50_us", "own_p99_us", "send_p50_us", "send_p99_us")
    return {"logged": fwd is not None, **{k: fwd[k] if fwd else None for k in keys}}


def machine() -> dict:
    """The machine and the versions the figures were measured with."""
    from jitrelay import kernels

    model = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{dist: version(dist) for dist in ("numpy", "numba", "uvloop", "pyzmq", "jitrelay")},
        "kernels": kernels.backend()["name"],
    }


def git_commit() -> dict:
    """The checkout's commit and whether it has uncommitted changes; None for both outside a checkout."""
    import jitrelay

    root = Path(jitrelay.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return {"git_commit": None, "git_dirty": None}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}
