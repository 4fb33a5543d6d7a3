#!/usr/bin/env bash
# Every benchmark once, quickly, so that the suites cannot rot: the asv suite
# in quick mode against the jitrelay installed in this Python, then the
# pytest-benchmark kernels with minimal rounds. The figures mean little here;
# any failed or broken benchmark makes this exit non-zero. Needs the `bench`
# extra (pip install -e '.[bench]'). About a minute on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."

asv machine --yes >/dev/null
# asv exits 2 when a benchmark fails and 1 when the suite cannot be imported.
asv check --python=same
asv run --python=same --quick --show-stderr

python -m pytest benchmarks --benchmark-only -p no:cacheprovider -q \
    --benchmark-min-rounds=1 --benchmark-max-time=0.001 --benchmark-warmup=off --benchmark-disable-gc
