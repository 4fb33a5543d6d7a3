"""W2's latency distribution in HdrHistogram form (the ``hdrhistogram`` package): in the JSON and in log files.

Each paced run (W2, W3) carries ``latency_hdr``: every subscriber's
latencies in nanoseconds, recorded into one HdrHistogram (1 ns to 60 s, 3
significant digits) and encoded the standard way (compressed, base64), which
``HdrHistogram.decode`` and every HdrHistogram implementation read back.
``write_logs`` also writes each one next to the JSON as an HdrHistogram log
(``<json>.<workload>.<relay>.<n>sub.hlog``), the file HistogramLogAnalyzer
and ``hdrh.log.HistogramLogReader`` open.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

LOWEST_NS = 1
HIGHEST_NS = 60 * 10**9
DIGITS = 3


def available() -> bool:
    """Whether the ``hdrhistogram`` package is installed (the bench extra has it)."""
    try:
        import hdrh.histogram  # noqa: F401
    except ImportError:
        return False
    return True


def encode_latencies(samples_ns: Any) -> str:
    """The samples (a numpy array of nanoseconds) as an encoded HdrHistogram; values clipped into its range."""
    import numpy as np
    from hdrh.histogram import HdrHistogram

    histogram = HdrHistogram(LOWEST_NS, HIGHEST_NS, DIGITS)
    values, counts = np.unique(np.clip(samples_ns, LOWEST_NS, HIGHEST_NS), return_counts=True)
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        histogram.record_value(value, count)
    encoded: bytes = histogram.encode()
    return encoded.decode("ascii")


def decode(encoded: str) -> Any:
    """An encoded histogram (``latency_hdr``) back as an ``HdrHistogram``."""
    from hdrh.histogram import HdrHistogram

    return HdrHistogram.decode(encoded.encode("ascii"))


def log_path(json_path: Path, run: dict) -> Path:
    """Where ``write_logs`` puts a run's histogram: beside the JSON, named by workload, relay and subscribers."""
    relay = re.sub(r"[^A-Za-z0-9_-]", "-", run["relay"])
    return json_path.with_name(f"{json_path.stem}.{run['workload']}.{relay}.{run['subscribers']}sub.hlog")


def write_logs(json_path: Path, runs: list[dict]) -> list[Path]:
    """Each run's ``latency_hdr`` as an HdrHistogram log beside ``json_path``; the run notes its file's name."""
    from hdrh.log import HistogramLogWriter

    written = []
    for run in runs:
        if not run.get("latency_hdr"):
            continue
        path = log_path(json_path, run)
        with path.open("w") as out:
            writer = HistogramLogWriter(out)
            writer.output_comment(f"jitrelay bench {run['workload']} {run['relay']} {run['subscribers']} sub, ns")
            writer.output_legend()
            writer.output_interval_histogram(decode(run["latency_hdr"]), 0, run["duration_s"], 1.0)
        run["latency_hdr_log"] = path.name
        written.append(path)
    return written
