"""``jitrelay bench`` end to end in a tiny mode: the JSON it writes and the figures in it.

Figures are checked for what must hold whatever the machine's speed (every
message delivered, nothing lost, percentiles in order), never against a speed.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
from datetime import datetime
from pathlib import Path

import numba
import numpy
import pytest
import uvloop
import zmq  # the zmq baselines need it: a dependency of the bench extra
from support.relays import StartRelay

from jitrelay.cli import main
from jitrelay.core import protocol
from jitrelay.core.histogram import Histogram
from jitrelay.server.figures import read_figures
from jitrelay.tools.bench.figures import relay_forwarding
from jitrelay.tools.bench.messages import probe_message
from jitrelay.tools.bench.relays import Endpoint
from jitrelay.tools.bench.workers import publish_batches, publish_paced

ROOT = Path(__file__).resolve().parents[2]


def bench(options: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``jitrelay bench --no-progress`` with ``options``, written as on a command line (space-separated).

    ``env`` adds to (or overrides) this process's environment.
    """
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "NUMBA_DISABLE_JIT"}  # relays run compiled
    return subprocess.run(
        [sys.executable, "-m", "jitrelay", "bench", "--no-progress", *options.split()],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
    )


def bench_report(path: Path, options: str) -> tuple[dict, str]:
    """``bench(options)`` writing its figures to ``path``, which must succeed: the report it wrote, what it printed."""
    done = bench(f"{options} --json={path}")
    assert done.returncode == 0, done.stderr
    return json.loads(path.read_text()), done.stdout


def by_run(report: dict) -> dict[tuple[str, str], dict]:
    return {(r["relay"], r["workload"]): r for r in report["runs"]}


def check_delivered_all(run: dict) -> None:
    assert run["sent"] > 0
    assert run["lost"] == [0] * run["subscribers"]
    assert run["lost_total"] == 0
    for sub in run["per_subscriber"]:
        assert sub["received"] == run["sent"]
        assert sub["last_sequence"] == run["sent"] - 1 and sub["last_sequence_ok"]
        assert sub["sequence_gaps"] == 0 and sub["bad_magic"] == 0 and sub["partial_bytes"] == 0
        assert sub["stop"] == "all received"
    assert run["delivered_msg_per_s_mean"] > 0


def check_latency(run: dict, expected_samples: int) -> None:
    lat = run["latency_us"]
    assert lat["samples"] == expected_samples
    assert 0 < lat["p50"] <= lat["p99"] <= lat["p99_9"] <= lat["max"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("bench") / "figures.json"
    options = "--relays=jitrelay,raw --workloads=w1,w2 --subscribers=1 --duration=0.5 --rate=500 --startup-runs=1"
    report, printed = bench_report(path, options)
    assert f"every figure: {path}" in printed
    assert "delivered/s per sub" in printed
    return report


def test_report_describes_the_run(report: dict) -> None:
    assert report["options"] == {
        "relays": ["jitrelay", "raw"],
        "workloads": ["w1", "w2"],
        "subscribers": [1],
        "latency_subscribers": 1,
        "size": 71,
        "duration": 0.5,
        "rate": 500.0,
        "startup_runs": 1,
    }
    assert report["command_line"][1:3] == ["bench", "--no-progress"]
    assert datetime.fromisoformat(report["timestamp_utc"]).utcoffset().total_seconds() == 0
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert report["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    m = report["machine"]
    assert m["cores"] == os.cpu_count()
    assert isinstance(m["cpu_model"], str) and m["cpu_model"]
    assert m["python"] == platform.python_version()
    assert (m["numpy"], m["numba"], m["uvloop"]) == (numpy.__version__, numba.__version__, uvloop.__version__)
    assert m["pyzmq"] == zmq.__version__
    assert m["kernels"] == "aot"


def test_every_message_reaches_the_subscriber(report: dict) -> None:
    runs = by_run(report)
    assert sorted(runs) == [("jitrelay", "w1"), ("jitrelay", "w2"), ("raw", "w1"), ("raw", "w2")]
    for run in runs.values():
        assert run["subscribers"] == 1 and run["message_size"] == 71
        check_delivered_all(run)
    for relay in ("jitrelay", "raw"):
        assert runs[relay, "w1"]["latency_us"] is None
        assert runs[relay, "w1"]["publisher"]["batch_messages"] == (1 << 20) // 71
        assert runs[relay, "w1"]["sent"] % ((1 << 20) // 71) == 0
        assert runs[relay, "w2"]["sent"] == 250  # 0.5 s at 500 msg/s
        check_latency(runs[relay, "w2"], 250)


def test_ratios_are_to_the_baselines_of_the_same_workload(report: dict) -> None:
    runs = by_run(report)
    assert runs["raw", "w1"]["ratio_to_raw"] == {"delivered_msg_per_s": 1.0}
    assert runs["raw", "w2"]["ratio_to_raw"] == {"p50": 1.0, "p99": 1.0, "p99_9": 1.0, "max": 1.0}
    mine, raw = runs["jitrelay", "w1"], runs["raw", "w1"]
    expected = mine["delivered_msg_per_s_mean"] / raw["delivered_msg_per_s_mean"]
    assert mine["ratio_to_raw"]["delivered_msg_per_s"] == pytest.approx(expected)
    mine, raw = runs["jitrelay", "w2"], runs["raw", "w2"]
    assert mine["ratio_to_raw"]["p99"] == pytest.approx(mine["latency_us"]["p99"] / raw["latency_us"]["p99"])
    assert all(run["ratio_to_zmq"] is None for run in runs.values())  # no zmq run to compare with


def test_relay_memory_forwarding_time_and_startup(report: dict) -> None:
    runs = by_run(report)
    for run in runs.values():
        memory = run["relay_memory"]
        assert memory["samples"] > 0 and memory["peak_sampled_mib"] > 0 and memory["vm_hwm_mib"] > 0
    for workload in ("w1", "w2"):
        fwd = runs["jitrelay", workload]["relay_forwarding"]
        assert 0 <= fwd["p50_us"] <= fwd["p99_us"] <= fwd["p99_9_us"]
        assert fwd["ns_per_message"] > 0
        assert runs["raw", workload]["relay_forwarding"] is None  # the raw forwarder writes no summary file
    own = report["jitrelay"]
    assert own["w1_peak_rss_mib"] == runs["jitrelay", "w1"]["relay_memory"]["peak_sampled_mib"]
    assert 0 < own["w1_peak_anon_mib"] < own["w1_peak_rss_mib"]
    assert [(f["workload"], f["logged"]) for f in own["forwarding"]] == [("w1", True), ("w2", True)]
    start = report["startup"]
    assert len(start["warm_s"]) == 1 and start["warm_median_s"] == start["warm_s"][0] > 0
    assert start["cold_s"] > 0 and start["cold_kernels_s"] > 0 and start["warm_kernels_s"] > 0
    assert start["cold_compile_s"] == pytest.approx(start["cold_s"] - start["warm_median_s"])


def test_zmq_proxy_lossless_and_default(tmp_path: Path) -> None:
    done = bench("--relays=zmq,zmq-default --workloads=w1,w2 --subscribers=1 --duration=0.3 --rate=500", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (written,) = (tmp_path / "bench-results").glob("*.json")  # the default place
    report = json.loads(written.read_text())
    runs = by_run(report)
    assert sorted(runs) == [("zmq", "w1"), ("zmq", "w2"), ("zmq-default", "w1"), ("zmq-default", "w2")]
    check_delivered_all(runs["zmq", "w1"])
    check_delivered_all(runs["zmq", "w2"])
    check_latency(runs["zmq", "w2"], 150)
    lossy = runs["zmq-default", "w1"]
    (sub,) = lossy["per_subscriber"]
    assert 0 < sub["received"] <= lossy["sent"]
    assert lossy["lost"] == [lossy["sent"] - sub["received"]]
    assert runs["zmq", "w1"]["ratio_to_zmq"] == {"delivered_msg_per_s": 1.0}
    assert runs["zmq", "w1"]["ratio_to_raw"] is None
    assert runs["zmq", "w1"]["relay_command"][-2:] == ["--hwm", "0"]
    assert "--hwm" not in runs["zmq-default", "w1"]["relay_command"]
    assert report["jitrelay"] is None and report["startup"] is None


def test_forwarding_figures_come_from_the_summary_file(start_relay: StartRelay, short_dir: Path) -> None:
    """What the bench reports of a relay's forwarding time is its summary file's, the histogram's percentiles."""
    summary = short_dir / "figures.json"
    relay = start_relay("market_data", "--summary-file", str(summary))
    batch = protocol.build_batch(1, 1000, [(1, b"v" * 37)]).tobytes()
    with relay.connect() as subscriber, relay.connect() as publisher:
        for _ in range(5):
            publisher.sendall(batch)
        received = 0
        while received < 5 * len(batch):
            received += len(subscriber.recv(1 << 20))
    relay.send_signal(signal.SIGTERM)
    assert relay.wait_exit(15) == 0
    figures = read_figures(summary)
    assert (figures["messages_received"], figures["messages_forwarded"]) == (5000, 5000)
    timing = Histogram()
    timing.counts = list(figures["forward_buckets"])
    timing.count = sum(timing.counts)
    timing.max = round(figures["forward_max_us"] * 1e3)
    assert timing.count == figures["batches"] >= 1
    assert relay_forwarding(figures) == {
        "p50_us": timing.percentile(50) / 1e3,
        "p99_us": timing.percentile(99) / 1e3,
        "p99_9_us": timing.percentile(99.9) / 1e3,
        "ns_per_message": figures["forward_total_ns"] / 5000,
        "own_p50_us": figures["own_p50_us"],
        "own_p99_us": figures["own_p99_us"],
        "send_p50_us": figures["send_p50_us"],
        "send_p99_us": figures["send_p99_us"],
    }
    assert 0 < figures["forward_p50_us"] <= figures["forward_p99_us"] <= figures["forward_p99_9_us"]
    assert figures["kernel_build"] == "aot" and figures["kernel_load_seconds"] > 0
    assert relay_forwarding(None) is None  # a baseline: no summary file


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--relays=jitrelay,nats", "unknown relay 'nats'"),
        ("--relays=raw:block", "unknown relay 'raw:block'"),
        ("--workloads=w4", "unknown workload 'w4'"),
        ("--relays=jitrelay-shm:fast", "unknown relay 'jitrelay-shm:fast'"),
        ("--fanout-subscribers=0", "--fanout-subscribers needs counts of at least 1"),
        ("--fanout-subscribers=ten", "--fanout-subscribers takes comma-separated counts"),
        ("--subscribers=0", "--subscribers needs counts of at least 1"),
        ("--size=20", "cannot make a 20-byte message"),
    ],
)
def test_bad_command_line_exits_2(option: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", option]) == 2
    assert message in capsys.readouterr().err


def test_filtered_w1_gives_each_subscriber_its_quarter(tmp_path: Path) -> None:
    options = "--relays=jitrelay,raw --workloads=w1,w1f --subscribers=4 --duration=0.5 --startup-runs=0"
    report, printed = bench_report(tmp_path / "filtered.json", options)
    runs = by_run(report)
    assert sorted(runs) == [("jitrelay", "w1"), ("jitrelay", "w1f"), ("raw", "w1")]  # raw cannot filter
    filtered, unfiltered = runs["jitrelay", "w1f"], runs["jitrelay", "w1"]
    sent = filtered["sent"]
    assert filtered["subscribers"] == 4 and sent % 4 == 0
    for k, sub in enumerate(filtered["per_subscriber"]):
        assert sub["expected"] == (sent - k + 3) // 4
        assert (sub["received"], sub["lost"], sub["partial_bytes"]) == (sub["expected"], 0, 0), sub
        assert sub["sequence_gaps"] == 0 and sub["bad_magic"] == 0 and sub["last_sequence_ok"], sub
    ratio = filtered["delivered_msg_per_s_mean"] / unfiltered["delivered_msg_per_s_mean"]
    assert filtered["ratio_to_unfiltered"] == pytest.approx(ratio)
    assert filtered["stream_ratio_to_unfiltered"] == pytest.approx(4 * ratio)
    assert "jitrelay w1f: four subscribers, one TLV type each" in printed


def test_bench_runs_from_an_installed_wheel_with_its_baselines(tmp_path: Path) -> None:
    """Built and installed as a user would get it, away from the checkout: the baselines ship in the package.

    The wheel goes into a virtualenv of its own; the dependencies come from
    this environment's site-packages, added by a ``.pth`` line (which does not
    run the checkout's editable-install hook), so nothing is downloaded.
    """
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("jitrelay-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = (venv / "lib").glob("python*/site-packages")
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    assert (site / "jitrelay" / "tools" / "bench" / "raw_forwarder.py").is_file()
    assert (site / "jitrelay" / "tools" / "bench" / "zmq_proxy.py").is_file()
    assert (site / "jitrelay" / "tools" / "bench" / "c_forwarder.c").is_file()  # the limit relay's source

    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_DISABLE_JIT", "PYTHONPATH")}
    where = subprocess.run(
        [python, "-c", "import jitrelay; print(jitrelay.__file__)"], capture_output=True, text=True, cwd=tmp_path
    )
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    figures = tmp_path / "figures.json"
    args = ["--relays=raw,zmq", "--workloads=w1", "--subscribers=1", "--duration=0.3", "--startup-runs=0"]
    done = subprocess.run(
        [python, "-m", "jitrelay", "bench", "--no-progress", *args, f"--json={figures}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    runs = by_run(json.loads(figures.read_text()))
    check_delivered_all(runs[("raw", "w1")])
    check_delivered_all(runs[("zmq", "w1")])


def test_client_workload_measures_every_client_and_baseline_and_loses_nothing(tmp_path: Path) -> None:
    options = "--relays=jitrelay --workloads=client --duration=0.3 --startup-runs=0"
    report, printed = bench_report(tmp_path / "client.json", options)
    client = report["client"]
    assert client["errors"] == {}
    assert set(client["publish_msg_per_s"]) == {
        "jitrelay",
        "jitrelay-unbatched",
        "jitrelay-async",
        "jitrelay-async-nowait",
        "pyzmq",
        "nats",
    }
    assert set(client["receive_msg_per_s"]) == {"jitrelay", "jitrelay-async", "pyzmq", "pyzmq-drain", "nats"}
    assert all(rate > 0 for rate in [*client["publish_msg_per_s"].values(), *client["receive_msg_per_s"].values()])
    assert client["publish_x_pyzmq"]["pyzmq"] == 1.0
    assert all(lost == 0 for lost in client["lost"].values()), client["lost"]
    for name in ("publish jitrelay", "publish jitrelay-async"):
        run = client["runs"][name]
        assert [s["received"] for s in run["subscribers"]] == [run["publisher"]["sent"]] * len(run["subscribers"])
    latency = client["w2_client_latency_us"]
    assert latency["samples"] > 0 and 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    assert "client: 71-byte messages" in printed


def test_w3_times_three_subscribers_beside_one_that_never_reads(tmp_path: Path) -> None:
    options = "--relays=jitrelay,raw --workloads=w3 --duration=0.5 --startup-runs=0"
    report, printed = bench_report(tmp_path / "w3.json", options)
    runs = by_run(report)
    for relay in ("jitrelay", "raw"):
        run = runs[relay, "w3"]
        assert run["subscribers"] == 3 and run["rate"] == 200_000
        check_delivered_all(run)
        check_latency(run, 3 * run["sent"])
    assert runs["jitrelay", "w3"]["ratio_to_raw"]["max"] > 0
    assert "beside one that never reads" in printed


def test_shared_memory_subscribers_on_w1_and_w2_lose_nothing(tmp_path: Path) -> None:
    options = "--workloads=w1,w2 --subscribers=2 --duration=0.3 --rate=500 --startup-runs=0"
    report, printed = bench_report(tmp_path / "shm.json", f"--relays=raw,jitrelay,jitrelay-shm {options}")
    runs = by_run(report)
    assert sorted(runs) == [(relay, w) for relay in ("jitrelay", "jitrelay-shm", "raw") for w in ("w1", "w2")]
    for run in runs.values():
        assert run["subscribers"] == 2
        check_delivered_all(run)
    check_latency(runs["jitrelay-shm", "w2"], 2 * 150)
    shm, sockets, raw = runs["jitrelay-shm", "w1"], runs["jitrelay", "w1"], runs["raw", "w1"]
    assert shm["ratio_to_raw"]["delivered_msg_per_s"] == pytest.approx(
        shm["delivered_msg_per_s_mean"] / raw["delivered_msg_per_s_mean"]
    )
    assert shm["ratio_to_socket"]["delivered_msg_per_s"] == pytest.approx(
        shm["delivered_msg_per_s_mean"] / sockets["delivered_msg_per_s_mean"]
    )
    assert "ratio_to_socket" not in sockets
    assert shm["relay_forwarding"]["p50_us"] > 0  # the relay is jitrelay's: its summary file is read
    assert "jitrelay-shm w1 2 sub: msg/s per sub" in printed


def test_execution_relay_journals_w2_and_is_set_against_market_data(tmp_path: Path) -> None:
    options = "--workloads=w2 --subscribers=2 --duration=0.5 --rate=500 --startup-runs=0"
    report, printed = bench_report(tmp_path / "exec.json", f"--relays=jitrelay,jitrelay-exec {options}")
    runs = by_run(report)
    assert sorted(runs) == [("jitrelay", "w2"), ("jitrelay-exec", "w2")]
    for run in runs.values():
        check_delivered_all(run)  # the execution relay let every message through: each checksum was right
        check_latency(run, 2 * 250)
    execution, market_data = runs["jitrelay-exec", "w2"], runs["jitrelay", "w2"]
    command = execution["relay_command"]
    assert command[3:5] == ["run", "execution"] and "--journal-dir" in command
    assert execution["journal_bytes"] >= execution["sent"] * 71  # every message journaled
    ratio = execution["ratio_to_market_data"]
    assert ratio["p50"] == pytest.approx(execution["latency_us"]["p50"] / market_data["latency_us"]["p50"])
    assert ratio["p99"] == pytest.approx(execution["latency_us"]["p99"] / market_data["latency_us"]["p99"])
    assert "ratio_to_market_data" not in market_data and "journal_bytes" not in market_data
    assert execution["relay_forwarding"]["p50_us"] > 0  # a jitrelay relay: its summary file is read
    assert f"jitrelay-exec w2 2 sub: p50 {execution['latency_us']['p50']:.1f} us" in printed
    assert f"= {ratio['p50']:.2f} / {ratio['p99']:.2f} x market_data's (journal on)" in printed


def test_the_compiled_read_path_is_set_against_the_other_read_paths(tmp_path: Path) -> None:
    options = "--workloads=w2 --subscribers=2 --duration=0.5 --rate=500 --startup-runs=0"
    report, printed = bench_report(tmp_path / "paths.json", f"--relays=jitrelay,jitrelay-py,jitrelay-uv {options}")
    runs = by_run(report)
    assert sorted(runs) == [("jitrelay", "w2"), ("jitrelay-py", "w2"), ("jitrelay-uv", "w2")]
    for run in runs.values():
        check_delivered_all(run)
        check_latency(run, 2 * 250)
    compiled = runs["jitrelay", "w2"]
    assert "--read-path" not in compiled["relay_command"]
    for name, path, theirs in (("jitrelay-py", "python", "the Python steps'"), ("jitrelay-uv", "uvloop", "reads'")):
        other = runs[name, "w2"]
        assert other["relay_command"][-2:] == ["--read-path", path]
        ratio = compiled[f"ratio_to_{path}_read_path"]
        assert ratio["p50"] == pytest.approx(compiled["latency_us"]["p50"] / other["latency_us"]["p50"])
        assert f"ratio_to_{path}_read_path" not in other
        line = f"jitrelay w2 2 sub, compiled read path: p50 / p99 latency {ratio['p50']:.2f} / {ratio['p99']:.2f} x"
        assert any(text.startswith(line) and text.endswith(theirs) for text in printed.splitlines()), line


@pytest.mark.parametrize("workload", ["w1", "w2"])
def test_publishers_fill_in_the_checksums_of_execution_messages(workload: str, short_dir: Path) -> None:
    """What the publishers send the execution relay carries execution records and, after each stamp, a right CRC."""
    path = str(short_dir / "relay.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    end, start = Endpoint("unix", path, domain=protocol.EXECUTION), threading.Event()
    start.set()
    got = bytearray()

    def read() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(1 << 20):
                got.extend(data)

    reader = threading.Thread(target=read)
    reader.start()
    if workload == "w1":
        sent = publish_batches("pub", queue.Queue(), end, 71, 0.01, start)["sent"]
    else:
        sent = publish_paced("pub", queue.Queue(), end, 71, 0.1, start, 500.0)["sent"]
    reader.join(30)
    listener.close()
    messages = list(protocol.decode_messages(bytes(got)))
    assert len(messages) == sent > 0
    for k, message in enumerate(messages):
        assert (message.header.relay_domain, message.header.sequence) == (protocol.EXECUTION, k)
        assert message.header.timestamp_ns > 0 and message.header.checksum != 0
        assert protocol.message_checksum(message.raw) == message.header.checksum
        assert [t for t, _ in message.records] == [40]
    probe = protocol.decode_message(probe_message(71, domain=protocol.EXECUTION))[0]
    assert probe.header.relay_domain == protocol.EXECUTION and probe.checksum_ok


def test_fanout_times_each_message_until_every_subscriber_has_it(tmp_path: Path) -> None:
    fanout = "--fanout-subscribers=1,5 --fanout-hosts=2 --fanout-interval=10"
    options = f"--relays=raw,jitrelay,jitrelay-shm --workloads=fanout {fanout} --duration=0.3 --startup-runs=0"
    report, printed = bench_report(tmp_path / "fanout.json", options)
    assert report["options"]["fanout_subscribers"] == [1, 5] and report["options"]["fanout_hosts"] == 2
    runs = {(r["relay"], r["subscribers"]): r for r in report["runs"]}
    assert sorted(runs) == [(relay, n) for relay in ("jitrelay", "jitrelay-shm", "raw") for n in (1, 5)]
    for (relay, n), run in runs.items():
        assert run["workload"] == "fanout" and run["sent"] == 30  # 0.3 s, one message every 10 ms
        assert run["hosting"] == ([1] if n == 1 else [3, 2])  # the same processes for every relay
        assert run["lost_total"] == 0 and run["reached_all"] == run["sent"]
        for sub in run["per_subscriber"]:
            assert (sub["received"], sub["lost"], sub["partial_bytes"]) == (30, 0, 0), sub
            assert sub["sequence_gaps"] == 0 and sub["bad_magic"] == 0 and sub["last_sequence_ok"], sub
            assert sub["stop"] == "all received"
        last, first, each = run["latency_us"], run["first_us"], run["each_us"]
        assert last["samples"] == first["samples"] == 30 and each["samples"] == 30 * n
        assert 0 < first["p50"] <= last["p50"] <= last["p99"] <= last["max"]
        assert first["max"] <= last["max"] and each["max"] == last["max"]
        assert run["relay_memory"]["peak_sampled_mib"] > 0
        assert (run["relay_forwarding"] is None) == (relay == "raw")
    assert runs["raw", 5]["ratio_to_raw"]["p50"] == 1.0
    shm = runs["jitrelay-shm", 5]
    assert shm["ratio_to_socket"]["p50"] == pytest.approx(
        shm["latency_us"]["p50"] / runs["jitrelay", 5]["latency_us"]["p50"]
    )
    assert "time until the LAST subscriber had it" in printed
    assert "jitrelay-shm forwarding time per batch, fanout 1 -> 5 subscribers" in printed


def test_records_workload_sets_the_kernels_against_struct_and_loses_nothing(tmp_path: Path) -> None:
    options = "--relays=jitrelay --workloads=records --duration=0.3 --startup-runs=0"
    report, printed = bench_report(tmp_path / "records.json", options)
    figures = report["records"]
    assert figures["errors"] == {}
    assert (figures["message_size"], figures["batch_records"]) == (74, (1 << 20) // 74)
    for rates, baseline in (
        (figures["decode_records_per_s"], {"view", "copy", "struct"}),
        (figures["encode_records_per_s"], {"kernel", "struct"}),
        (figures["end_to_end_msg_per_s"], {"bytes", "records"}),
    ):
        assert set(rates) == baseline and all(rate > 0 for rate in rates.values()), rates
    decode = figures["decode_records_per_s"]
    for path in ("view", "copy"):
        assert figures["decode_x_struct"][path] == pytest.approx(decode[path] / decode["struct"])
    encode = figures["encode_records_per_s"]
    assert figures["encode_x_struct"] == pytest.approx(encode["kernel"] / encode["struct"])
    e2e = figures["end_to_end_msg_per_s"]
    assert figures["end_to_end_records_x_bytes"] == pytest.approx(e2e["records"] / e2e["bytes"])
    assert figures["lost"] == {"bytes": 0, "records": 0}
    for key, runs in figures["runs"].items():
        assert len(runs) == 2 and max(figures["end_to_end_runs_msg_per_s"][key]) == e2e[key]
        for run in runs:
            assert run["subscribers"][0]["received"] == run["publisher"]["sent"] > 0
    assert "records: trades, 74-byte messages" in printed
    assert 'record_batches("trade")' in printed
