"""A NATS cluster on loopback, for the bridge's tests and ``jitrelay bench``: nats-server processes routed together.

Each node is a ``nats-server`` child listening on 127.0.0.1 with free ports
picked at start (clients, cluster routes, HTTP monitoring), logging to a file
in a temporary folder. ``start`` returns once every node's monitoring
endpoint reports a route to every other node, so a message published on any
node reaches subscribers on all of them. Ports are found by binding port 0
and releasing it, so another process may take one in between: a node that
does not come up makes ``start`` try again with fresh ports.

JetStream is enabled on every node (``-js``, a store folder of its own beside
its log), so the cluster also holds replicated streams; core NATS traffic is
unaffected by it. With ``jetstream=True`` ``start`` also waits until the
JetStream meta group has elected a leader, so a stream can be created at once.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from jitrelay.testing.processes import die_with_parent

START_ATTEMPTS = 3
STOP_SECONDS = 5.0


class NatsClusterError(RuntimeError):
    """The cluster could not be started."""


def nats_server_path() -> str | None:
    """Where ``nats-server`` is: on PATH, or in the sbin folders Debian's package installs to."""
    return shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback TCP ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class NatsNode:
    """One nats-server of the cluster."""

    name: str
    client_port: int
    cluster_port: int
    monitor_port: int
    log_path: Path
    proc: subprocess.Popen | None = None
    killed: bool = False  # stopped on purpose by ``NatsCluster.kill``

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def route_url(self) -> str:
        return f"nats://127.0.0.1:{self.cluster_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def monitor(self, endpoint: str, timeout: float = 1.0) -> dict:
        """A monitoring endpoint's JSON (``varz``, ``routez``, ``connz``, ...)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/{endpoint}", timeout=timeout) as reply:
            return json.load(reply)

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _meta_leader(node: NatsNode) -> bool:
    try:
        return bool(node.monitor("jsz").get("meta_cluster", {}).get("leader"))
    except (OSError, urllib.error.URLError, ValueError):
        return False


@dataclass(frozen=True)
class NatsTls:
    """TLS for a cluster's clients: the servers' certificate and key, and the CA whose client certificates they take.

    With ``verify`` a client must present a certificate that CA signed (mutual TLS).
    """

    cert: Path
    key: Path
    ca: Path
    verify: bool = True

    def config(self) -> str:
        """The ``tls`` block of a nats-server configuration file."""
        return (
            f'tls {{\n  cert_file: "{self.cert}"\n  key_file: "{self.key}"\n  ca_file: "{self.ca}"\n'
            f"  verify: {str(self.verify).lower()}\n  timeout: 5\n}}\n"
        )


class NatsCluster:
    """``size`` nats-server processes on 127.0.0.1, each with routes to all the others.

    Use as a context manager, or ``start()`` and ``stop()``. ``kill(i)``
    SIGKILLs one node, as a crash would.
    """

    def __init__(
        self,
        size: int = 3,
        executable: str | None = None,
        name: str = "jitrelay",
        max_payload: int | None = None,
        max_pending: int | None = None,
        jetstream: bool = False,
        tls: NatsTls | None = None,
    ):
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.size = size
        self.name = name
        self.max_payload = max_payload  # the servers' limit on one NATS message; None keeps theirs (1 MiB)
        # Bytes a server queues for one client before it drops it as a slow consumer; None keeps theirs (64 MiB).
        self.max_pending = max_pending
        self.jetstream = jetstream  # wait for a JetStream meta leader at start and restart
        self.tls = tls  # clients must speak TLS (routes between the nodes stay plain, on loopback)
        self.executable = executable or nats_server_path()
        self.folder: Path | None = None
        self.nodes: list[NatsNode] = []

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def servers(self) -> str:
        """Every node's client URL, comma-separated, as ``jitrelay bridge --nats`` takes them."""
        return ",".join(self.urls)

    def node_at(self, url: str) -> int:
        """The index of the node whose client URL is ``url`` (``nats://127.0.0.1:PORT``)."""
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        for index, node in enumerate(self.nodes):
            if node.client_port == port:
                return index
        raise KeyError(f"no node of this cluster listens on {url}")

    def start(self, timeout: float = 30.0) -> NatsCluster:
        if self.executable is None:
            raise NatsClusterError("nats-server is not installed (Debian: apt-get install nats-server)")
        self.folder = Path(tempfile.mkdtemp(prefix="jitrelay-nats-"))
        error = ""
        for _ in range(START_ATTEMPTS):
            ports = free_ports(3 * self.size)
            self.nodes = [
                NatsNode(f"{self.name}-{i}", client, cluster, monitor, self.folder / f"node{i}.log")
                for i, (client, cluster, monitor) in enumerate(zip(*[iter(ports)] * 3, strict=True))
            ]
            for node in self.nodes:
                self._launch(node)
            try:
                self.wait_routed(timeout)
                return self
            except NatsClusterError as exc:
                error = str(exc)
                self._stop_nodes()
        self.stop()
        raise NatsClusterError(error)

    def _launch(self, node: NatsNode) -> None:
        assert self.executable is not None
        routes = ",".join(other.route_url for other in self.nodes if other is not node)
        command = [
            self.executable,
            "-a",
            "127.0.0.1",
            "-p",
            str(node.client_port),
            "-m",
            str(node.monitor_port),
            "-n",
            node.name,
            "-l",
            str(node.log_path),
            "-js",
            "-sd",
            str(node.log_path.with_suffix(".store")),
        ]
        if self.size > 1:  # a single JetStream server must run standalone: clustered, it would want routes
            command += ["--cluster_name", self.name, "--cluster", node.route_url]
        if routes:
            command += ["--routes", routes]
        settings = {"max_payload": self.max_payload, "max_pending": self.max_pending}
        lines = [f"{key}: {value}\n" for key, value in settings.items() if value is not None]
        if self.tls is not None:
            lines.append(self.tls.config())
        if lines:
            config = node.log_path.with_suffix(".conf")
            config.write_text("".join(lines))
            command += ["-c", str(config)]
        node.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )

    def wait_routed(self, timeout: float = 30.0) -> None:
        """Wait until every running node has a route to every other running node; a node that died fails it."""
        deadline = time.monotonic() + timeout
        while True:
            running = [node for node in self.nodes if node.running]
            dead = [node for node in self.nodes if node.proc is not None and not node.running and not node.killed]
            pending = []
            for node in running:
                try:
                    routes = node.monitor("routez").get("num_routes", 0)
                except (OSError, urllib.error.URLError, ValueError):
                    routes = -1
                if routes < len(running) - 1:
                    pending.append(f"{node.name}: {routes} routes")
            if dead:
                raise NatsClusterError(f"{dead[0].name} exited: {dead[0].log_tail()}")
            if not pending and self.jetstream:
                pending = [f"{node.name}: no JetStream meta leader" for node in running if not _meta_leader(node)]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise NatsClusterError(f"cluster not routed within {timeout:.0f} s: {', '.join(pending)}")
            time.sleep(0.05)

    def stream_state(self, stream: str) -> dict:
        """A stream's state (``messages``, ``bytes``, ...) as the first running node reports it."""
        for node in self.nodes:
            if node.running:
                report = node.monitor("jsz?streams=true", timeout=2.0)
                for account in report.get("account_details", []):
                    for detail in account.get("stream_detail", []):
                        if detail.get("name") == stream:
                            return detail.get("state", {})
        return {}

    def kill(self, index: int) -> None:
        """SIGKILL node ``index``: its clients see their connection drop, as in a crash."""
        node = self.nodes[index]
        node.killed = True
        if node.proc is not None and node.running:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(STOP_SECONDS)

    def restart(self, index: int, timeout: float = 30.0) -> None:
        """Start node ``index`` again on the same ports, after ``kill``, and wait until it has its routes."""
        node = self.nodes[index]
        if node.running:
            raise NatsClusterError(f"{node.name} is running")
        node.killed = False
        self._launch(node)
        self.wait_routed(timeout)

    def _stop_nodes(self) -> None:
        for node in self.nodes:
            if node.running and node.proc is not None:
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()

    def stop(self) -> None:
        """Stop every node and remove the folder."""
        self._stop_nodes()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
