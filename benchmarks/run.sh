#!/usr/bin/env bash
# The full benchmark run whose results live in benchmarks/results/: udskit and every peer
# side by side (`udskit bench`), saved as the printed table, JSON, and a PNG chart.
# Needs the bench extra (pip install -e '.[bench]') and a C compiler for the C reference.
# Usage: bash benchmarks/run.sh [more udskit bench options, e.g. --quick]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=benchmarks/results
mkdir -p "$out"
"$PY" -m udskit bench --json "$out/bench.json" --plot "$out/bench.png" "$@" | tee "$out/bench.txt"
