"""``jitrelay kernels``: build the compiled kernels if needed, and say which build runs."""

from __future__ import annotations

import argparse
import logging

from jitrelay import kernels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``jitrelay kernels`` takes no options; raises nothing."""


def run(args: argparse.Namespace) -> int:
    """Build ahead of time what the next ``jitrelay run`` would, so a deployment pays it once and sees failures.

    0 when the requested build runs, 1 on a fallback; raises nothing of its own.
    """
    logging.basicConfig(level=logging.WARNING, format="jitrelay kernels: %(message)s")
    loaded = kernels.backend()
    print(f"{loaded['name']} {loaded['path']} (ready in {loaded['seconds']:.3f} s)")
    return 0 if loaded["name"] == kernels.requested_backend() else 1
