"""Runs ``jitrelay bench`` (``jitrelay.bench``, where the workloads W1 and W2 live) with this script's arguments.

Kept so that ``python benchmarks/workloads.py --relays jitrelay,raw --duration 5`` still works.
"""

import sys

from jitrelay.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
