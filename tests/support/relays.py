"""A real `jitrelay run` process for a test: its stderr read on a thread, waited on line by line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

READY_TIMEOUT = 60.0  # the first start of a fresh checkout builds the kernels


def relay_environ() -> dict[str, str]:
    """This environment without NUMBA_DISABLE_JIT: the kernel tests set it, and a relay run as Python is too slow."""
    return {k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_JIT"}


class RelayProcess:
    """One ``jitrelay run`` subprocess and everything it wrote to stderr."""

    def __init__(
        self,
        domain: str,
        socket_path: Path | None,
        options: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        umask: int = -1,
        pass_socket: bool = True,
    ) -> None:
        self.domain = domain
        self.socket_path = socket_path
        args = [sys.executable, "-m", "jitrelay", "run", domain]
        if socket_path is not None and pass_socket:
            args += ["--socket", str(socket_path)]
        args += ["--log-level", "INFO", *options]
        self.args = args
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**relay_environ(), **(env or {})},
            umask=umask,
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def find_line(self, *needles: str, start: int = 0) -> str | None:
        """The first line from ``start`` on that contains every needle."""
        with self._changed:
            for line in self.lines[start:]:
                if all(n in line for n in needles):
                    return line
        return None

    def wait_line(self, *needles: str, timeout: float = 5.0, start: int = 0) -> str:
        """Wait for a stderr line that contains every needle; fail with the whole log if none comes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    if all(n in line for n in needles):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    break
                self._changed.wait(min(left, 0.1))
        raise AssertionError(
            f"no stderr line containing {needles!r} within {timeout} s (exit code {self.proc.poll()}); "
            f"stderr so far:\n{self.stderr}"
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        assert self.socket_path is not None, "the ready line names the socket path"
        self.wait_line(f"jitrelay {self.domain} relay listening on {self.socket_path}", timeout=timeout)

    def wait_exit(self, timeout: float) -> int:
        """The exit code; fails if the relay is still running after ``timeout``."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"relay still running after {timeout} s; stderr:\n{self.stderr}") from None
        self._reader.join(2.0)
        return code

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGTERM (so a coverage run can save its data), then SIGKILL if the relay lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(10)
        self._reader.join(2.0)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def rss_bytes(self) -> int:
        """Resident set size, from /proc/<pid>/status."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line; has the relay exited?")

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """A blocking client socket connected to the relay."""
        assert self.socket_path is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(self.socket_path))
        return sock


StartRelay = Callable[..., RelayProcess]
