#!/usr/bin/env bash
# The API reference, generated from the docstrings with pdoc into FOLDER (default build/api): one HTML page per
# module. scripts/test.sh builds it on every run, so a docstring that no longer matches an importable module
# fails the suite instead of rotting. Open FOLDER/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-build/api}"
rm -rf "$out"
python -m pdoc --docformat markdown --no-show-source -o "$out" \
    jitrelay jitrelay.client jitrelay.core jitrelay.kernels jitrelay.server jitrelay.bridge jitrelay.tools \
    jitrelay.testing '!jitrelay.__main__'
test -s "$out/jitrelay/client.html"
echo "API reference: $out/index.html ($(find "$out" -name '*.html' | wc -l) pages)"
