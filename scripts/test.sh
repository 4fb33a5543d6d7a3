#!/usr/bin/env bash
# The whole test suite: lint, the type check, the API reference, every test with the kernels built ahead of time
# (what the relay runs), the kernel tests again with numba's JIT build (the
# fallback) and as plain Python (NUMBA_DISABLE_JIT=1) so coverage sees kernel
# code, then the combined coverage gate. Fails on the first failure; pytest's
# "no tests ran" (exit 5) is a failure too.
set -euo pipefail
cd "$(dirname "$0")/.."

# The bridge tests start a real NATS cluster: Debian's nats-server, installed here when missing.
if ! command -v nats-server >/dev/null && ! [ -x /usr/sbin/nats-server ]; then
    sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)
    echo "installing nats-server (Debian) for the bridge tests" >&2
    { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server; } >/dev/null
fi

ruff check jitrelay tests benchmarks
ruff format --check jitrelay tests benchmarks
mypy  # jitrelay/, as configured in pyproject.toml
scripts/api-docs.sh build/api  # the API reference from the docstrings: a module that no longer imports fails here

coverage erase
python -m pytest --cov=jitrelay --cov-report= "$@"
JITRELAY_KERNELS=jit python -m pytest -m kernels "$@"
NUMBA_DISABLE_JIT=1 python -m pytest -m kernels --cov=jitrelay --cov-append --cov-report= "$@"
coverage combine --append >/dev/null 2>&1 || true
coverage report --fail-under=90
