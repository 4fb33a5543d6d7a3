"""What Linux says about a child process in ``/proc``: its memory and CPU time, read one way for every tool.

The tests, the benchmark and the soak all watch the relay they started; these
readers are the one place that knows the file formats.
"""

from __future__ import annotations

import os
import threading
import time


def proc_status(pid: int, key: str) -> int | None:
    """One figure of ``/proc/<pid>/status`` (``VmRSS``, ``RssAnon``, ``VmHWM``…): bytes for the kB figures.

    None once the process is gone (or the key is absent): a sampler racing
    the child's exit must not fail.
    """
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name, _, rest = line.partition(":")
                if name == key:
                    value, *unit = rest.split()
                    return int(value) * 1024 if unit == ["kB"] else int(value)
    except (OSError, ValueError):
        pass
    return None


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time ``pid`` has used so far, all threads, from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # the command name in parentheses may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MemorySampler:
    """The peaks of some ``/proc/<pid>/status`` figures, read on a thread every ``interval`` seconds.

    A peak is what a single reading after the run would miss (VmHWM keeps
    only the resident peak, and not its private part). Sampling ends at
    ``stop()`` or when the process is gone.
    """

    def __init__(self, pid: int, keys: tuple[str, ...] = ("VmRSS", "RssAnon"), interval: float = 0.05) -> None:
        self.pid = pid
        self.keys = keys
        self.interval = interval
        self.peaks: dict[str, int] = dict.fromkeys(keys, 0)
        self.samples = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"memory-{pid}", daemon=True)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopped.is_set():
            values = [proc_status(self.pid, key) for key in self.keys]
            known = [v for v in values if v is not None]
            if len(known) < len(values):
                return
            for key, value in zip(self.keys, known, strict=True):
                self.peaks[key] = max(self.peaks[key], value)
            self.samples += 1
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(2)

    def peak(self, key: str) -> int | None:
        """The highest ``key`` sampled, or None when no sample was taken."""
        return self.peaks[key] if self.samples else None
