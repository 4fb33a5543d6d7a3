"""What one ``jitrelay bench`` runs: the relays it may start, and the options, whose defaults live only here.

``Options`` is the command line resolved (``command.parse``); its field
defaults are the defaults ``--help`` shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jitrelay.tools.options import MESSAGE_SIZE

RELAYS = (
    "jitrelay",
    "jitrelay-shm",
    "jitrelay-exec",
    "jitrelay-py",
    "jitrelay-uv",
    "raw",
    "raw-bytes",
    "zmq",
    "zmq-default",
    "limit",
    "bridge",
    "bridge-js",
)
# A jitrelay relay: market_data with its subscribers on sockets or on its log in shared memory, or execution
# (checksums required, every message journaled) on sockets; or market_data forwarding each read by the
# engine's Python steps (``--read-path python``) or by one compiled call per read the event loop makes
# (``--read-path uvloop``): the baselines of its compiled read path.
JITRELAYS = ("jitrelay", "jitrelay-shm", "jitrelay-exec", "jitrelay-py", "jitrelay-uv")
READ_PATH_BASELINES = {"jitrelay-py": "python", "jitrelay-uv": "uvloop"}
FILTERING = ("jitrelay", "jitrelay-shm")  # W1f's relays: its subscribers filter on market_data's types 1..4
BRIDGED = ("bridge", "bridge-js")
POLICIES = ("block", "disconnect")
RESULTS_DIR = Path("bench-results")  # where the JSON report goes unless --json says


@dataclass(frozen=True)
class Options:
    """What to run, resolved from the command line; each field's default is the option's.

    Constructing one checks nothing: ``command.parse`` does, and raises
    ``UsageError`` for what cannot run.
    """

    relays: tuple[str, ...] = tuple(
        name for name in RELAYS if name not in ("jitrelay-shm", "jitrelay-exec", *READ_PATH_BASELINES, "raw-bytes")
    )  # the rest when asked
    workloads: tuple[str, ...] = ("w1", "w2", "w1f", "w3")  # ``fanout``, ``client`` and ``records`` when asked for
    subscribers: tuple[int, ...] = (1, 4)  # W1 subscriber counts
    latency_subscribers: int | None = None  # W2 subscriber count; None: the largest W1 count
    size: int = MESSAGE_SIZE
    duration: float = 5.0  # seconds of publishing per run
    rate: float = 5000.0  # W2 messages per second
    startup_runs: int = 3
    json_path: Path | None = None  # None: RESULTS_DIR/<UTC time>.json
    progress: bool = True
    argv: list[str] = field(default_factory=list)
    idle_subscribers: int = 0  # W1 on jitrelay: subscribers connected beside the measured ones that select nothing
    fanout_subscribers: tuple[int, ...] = (1, 10, 100, 200)
    fanout_interval_ms: float = 5.0  # fanout: one message every this many milliseconds
    fanout_hosts: int = 4  # fanout: subscriber processes, each polling its share of the subscribers in one loop

    @property
    def drain_limit(self) -> float:
        """How long subscribers may take after the publisher: a lossless zmq proxy queues what they cannot take."""
        return 30.0 + 10.0 * self.duration

    @property
    def latency_count(self) -> int:
        """W2's subscriber count: ``latency_subscribers``, or else the largest W1 count."""
        return max(self.subscribers) if self.latency_subscribers is None else self.latency_subscribers

    def described(self) -> dict:
        """The options as the JSON report gives them; fanout's only when fanout runs."""
        shown = {
            "relays": list(self.relays),
            "workloads": list(self.workloads),
            "subscribers": list(self.subscribers),
            "latency_subscribers": self.latency_count,
            "size": self.size,
            "duration": self.duration,
            "rate": self.rate,
            "startup_runs": self.startup_runs,
        }
        if "fanout" in self.workloads:
            shown["fanout_subscribers"] = list(self.fanout_subscribers)
            shown["fanout_interval_ms"] = self.fanout_interval_ms
            shown["fanout_hosts"] = self.fanout_hosts
        return shown


DEFAULTS = Options()


def listed(values: tuple) -> str:
    """A default as the command line spells it: ``1,4``."""
    return ",".join(str(value) for value in values)
