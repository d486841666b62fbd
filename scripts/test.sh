#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs the real peers the tests talk to
# (Debian packages), the Python test dependencies (in .venv), then runs lint, types and
# pytest with branch coverage. Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v socat >/dev/null || need+=(socat)
command -v nc >/dev/null || need+=(netcat-openbsd)
command -v nginx >/dev/null || need+=(nginx-light)
command -v tmux >/dev/null || need+=(tmux)
command -v cc >/dev/null || need+=(gcc)
command -v systemd-socket-activate >/dev/null || need+=(systemd)
command -v tshark >/dev/null || need+=(tshark)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing test peers: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check src tests examples benchmarks
.venv/bin/ruff format --check src tests examples benchmarks
.venv/bin/mypy

# Peers that a test needs must be present in CI: a missing one fails, it does not skip.
export UDSKIT_REQUIRE_PEERS=${UDSKIT_REQUIRE_PEERS:-${CI:-}}
rm -f .coverage .coverage.*
# Two workers: most tests wait on peers and processes, so two share two CPUs well, and the
# suite takes half the time; a worker that runs out of tests takes some of the other's.
# UDSKIT_TEST_WORKERS=0 runs it in this process alone.
.venv/bin/python -m pytest -p no:cacheprovider -n "${UDSKIT_TEST_WORKERS:-2}" --dist worksteal \
  --durations=20 \
  --cov=udskit --cov-branch --cov-report=term --cov-fail-under=90 "$@"
