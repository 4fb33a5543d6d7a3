"""A relay (or any daemon that says on stderr when it is ready) as a child process: one harness for tests and tools.

A ``ChildProcess`` runs a command with its stderr read on a thread into a list
of lines, so a caller can wait for the ready line and look at lines written
later (faults, slow subscribers). ``RelayProcess`` is ``jitrelay run`` on
that machinery, with the relay's socket and, when asked for, the summary file
of final figures it writes as it stops: what a program reads of a stopped
relay, rather than its log lines. The test fixtures, ``jitrelay soak`` and
``jitrelay bench`` (whose baselines are other commands) all start their
children here, and read ``/proc`` through :mod:`jitrelay.testing.procfs`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from jitrelay.server.figures import read_figures
from jitrelay.testing.processes import die_with_parent
from jitrelay.testing.procfs import proc_status

READY_TIMEOUT = 60.0  # the first start of a fresh checkout builds the kernels
KILL_GRACE = 3.0  # after SIGTERM, seconds before ``kill`` sends SIGKILL


class ProcessFailed(AssertionError):
    """A child did not do what was waited for: no such line in time, it exited, or it left no summary.

    An ``AssertionError``, so that in a test it reads as the failed check it
    is; the tools turn it into their own errors.
    """


def relay_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without NUMBA_DISABLE_JIT (the kernel tests set it, and a relay run as Python is too slow)."""
    return {**{k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_JIT"}, **(extra or {})}


class ChildProcess:
    """One child process and every line it wrote to stderr; stdin and stdout are closed."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        ready_marker: str | None = None,
        env: Mapping[str, str] | None = None,
        umask: int = -1,
        tie_to_parent: bool = False,
        new_session: bool = False,
    ) -> None:
        """Start ``args``. ``ready_marker`` is text of the line that says it is ready (for ``wait_ready``).

        ``tie_to_parent`` has Linux kill the child if this process dies (the
        tools, which must leave nothing behind); ``new_session`` keeps a Ctrl-C
        at the terminal from reaching it, so the caller stops it in order.
        """
        self.args = list(args)
        self.ready_marker = ready_marker
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=None if env is None else dict(env),
            umask=umask,
            start_new_session=new_session,
            preexec_fn=die_with_parent if tie_to_parent else None,
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

    def tail(self, n: int = 20) -> str:
        """The last ``n`` stderr lines, for error messages."""
        with self._changed:
            return "\n".join(self.lines[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def find_line(self, *needles: str, start: int = 0) -> str | None:
        """The first line from ``start`` on that contains every needle."""
        with self._changed:
            for line in self.lines[start:]:
                if all(n in line for n in needles):
                    return line
        return None

    def wait_line(self, *needles: str, timeout: float = 5.0, start: int = 0) -> str:
        """Wait for a stderr line that contains every needle; ``ProcessFailed`` with the whole log if none comes."""
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
        raise ProcessFailed(
            f"no stderr line containing {needles!r} within {timeout} s (exit code {self.proc.poll()}); "
            f"stderr so far:\n{self.stderr}"
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait for the ready line."""
        assert self.ready_marker is not None, "no ready marker to wait for"
        self.wait_line(self.ready_marker, timeout=timeout)

    def wait_exit(self, timeout: float) -> int:
        """The exit code; ``ProcessFailed`` if the child is still running after ``timeout``."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ProcessFailed(f"still running after {timeout} s; stderr:\n{self.stderr}") from None
        self._reader.join(2.0)
        return code

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, and SIGKILL if it lingers past ``timeout``: the exit code, or None when it had to be killed.

        SIGTERM first so that a relay writes its summary (and a coverage run its data).
        """
        killed = False
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                killed = True
        self.proc.wait(10)
        self._reader.join(5.0)  # the lines written on the way out are in once it ends
        return None if killed else self.proc.returncode

    def kill(self) -> None:
        """Stop it whatever happened (SIGTERM, SIGKILL after ``KILL_GRACE``) and close its stderr."""
        self.stop(KILL_GRACE)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def rss_bytes(self) -> int:
        """Resident set size now, from /proc/<pid>/status."""
        rss = proc_status(self.pid, "VmRSS")
        if rss is None:
            raise ProcessFailed("no VmRSS line; has the process exited?")
        return rss


class RelayProcess(ChildProcess):
    """One ``jitrelay run`` child process, its stderr lines and, with ``summary_file``, its final figures."""

    def __init__(
        self,
        domain: str,
        socket_path: Path | None,
        options: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        umask: int = -1,
        pass_socket: bool = True,
        *,
        summary_file: Path | None = None,
        tie_to_parent: bool = False,
        new_session: bool = False,
    ) -> None:
        """Run the ``domain`` relay on ``socket_path`` with ``options``; ``env`` is added to this environment.

        With ``pass_socket=False`` the command line has no ``--socket`` (the
        relay then picks its path from ``JITRELAY_SOCKET_DIR``) and
        ``socket_path`` is where the caller expects it.
        """
        self.domain = domain
        self.socket_path = socket_path
        self.summary_file = summary_file
        if summary_file is not None:  # an earlier run's file must not pass for this one's
            with contextlib.suppress(FileNotFoundError):
                Path(summary_file).unlink()
        args = [sys.executable, "-m", "jitrelay", "run", domain]
        if socket_path is not None and pass_socket:
            args += ["--socket", str(socket_path)]
        args += ["--log-level", "INFO", *options]
        if summary_file is not None:
            args += ["--summary-file", str(summary_file)]
        marker = None if socket_path is None else f"jitrelay {domain} relay listening on {socket_path}"
        super().__init__(
            args,
            ready_marker=marker,
            env=relay_environ(env),
            umask=umask,
            tie_to_parent=tie_to_parent,
            new_session=new_session,
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait for the line that says it listens on its socket."""
        assert self.socket_path is not None, "the ready line names the socket path"
        super().wait_ready(timeout)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """A blocking client socket connected to the relay."""
        assert self.socket_path is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(self.socket_path))
        return sock

    def figures(self) -> dict:
        """The final figures from the summary file (the fields of ``Figures``), once the relay has stopped.

        ``ProcessFailed`` when it wrote none: no ``summary_file`` was asked
        for, or the relay died without stopping cleanly.
        """
        if self.summary_file is None:
            raise ProcessFailed("this relay was started without a summary file")
        try:
            return read_figures(self.summary_file)
        except FileNotFoundError:
            raise ProcessFailed(
                f"the relay wrote no summary to {self.summary_file} (exit code {self.proc.poll()}); "
                f"stderr:\n{self.tail()}"
            ) from None
