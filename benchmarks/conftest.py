"""pytest-benchmark support: each kernel benchmark's figures, and a summary of them at the end of the run.

Only ``pytest benchmarks --benchmark-only`` loads this; the test suite proper
lives in tests/ (pyproject's testpaths).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from asv_bench import common

_LINES = pytest.StashKey[list[str]]()


class Figures:
    """Turns a finished benchmark into rates and a ratio to a baseline timed right after it."""

    def __init__(self, lines: list[str]):
        self.lines = lines

    def record(
        self,
        benchmark,
        *,
        messages: int = 0,
        nbytes: int = 0,
        baseline: str = "",
        baseline_call: Callable[[], object] | None = None,
    ) -> None:
        """Attach msg/s, bytes/s and ``ratio_to_baseline`` (baseline time / kernel time) to ``extra_info``.

        Times are the best call: every disturbance on a shared machine only adds time.
        """
        if benchmark.stats is None:  # --benchmark-disable: nothing was timed
            return
        seconds = benchmark.stats.stats.min
        info: dict[str, object] = {"best_seconds": seconds}
        text = [f"{benchmark.name}: {seconds * 1e6:.1f} us"]
        if messages:
            info["messages_per_second"] = messages / seconds
            text.append(f"{messages / seconds / 1e6:.1f} M msg/s")
        if nbytes:
            info["bytes_per_second"] = nbytes / seconds
            text.append(f"{nbytes / seconds / 1e9:.2f} GB/s")
        if baseline_call is not None:
            base = common.best_time(baseline_call)
            info.update(baseline=baseline, baseline_seconds=base, ratio_to_baseline=base / seconds)
            text.append(f"{base / seconds:.2f} x {baseline}")
        benchmark.extra_info.update(info)
        self.lines.append(", ".join(text))


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    return Figures(request.config.stash.setdefault(_LINES, []))


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    lines = config.stash.get(_LINES, [])
    if lines:
        terminalreporter.section("kernel figures (ratio: baseline time / kernel time, above 1 is faster)")
        for line in lines:
            terminalreporter.write_line(line)
