#!/usr/bin/env bash
# README command 2: set up and run the whole test suite.
# Installs the servers the integration tests start their own instances of (Mosquitto,
# PostgreSQL, RabbitMQ) and the browser the browser tests drive (Chromium) from Debian
# packages when they are missing, so nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto mosquitto-clients)
command -v node >/dev/null || need+=(nodejs)  # the JavaScript example client (tests/e2e/test_js_client.py)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v postgres >/dev/null || need+=(postgresql)
# RabbitMQ (3.10 on Debian 12, MQTT plugin included): the clustered-broker tests start
# three nodes of their own; they fail, not skip, without it.
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
# Debian's Chromium for the real-browser tests (tests/http/browserkit.py, driven by the
# playwright package the dev bootstrap installs; Playwright's own browser download is
# not used, nor reachable here).
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing test servers: ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q </dev/null >/dev/null || true
    apt-get install -y -q --no-install-recommends "${need[@]}" </dev/null
  else
    echo "warning: ${need[*]} missing and cannot be installed (not root / no apt); those tests will fail (WAYSTATION_REQUIRE_SERVERS=0 and WAYSTATION_REQUIRE_BROWSER=0 make them skip)" >&2
  fi
fi

# Optional: python3-seccomp lets two unit-sandbox tests apply the units' syscall filter
# (they skip without it); a failure to install it is not fatal.
if ! ls /usr/lib/python3/dist-packages/seccomp* >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-seccomp </dev/null >/dev/null 2>&1 \
    || echo "note: python3-seccomp not installed; two sandbox tests will skip" >&2
fi

bash scripts/bootstrap.sh dev
# Bytecode for the project's own modules, once, before the ~2,000 Python processes the
# suite starts (daemons, CLI runs; the xdist workers). With PYTHONDONTWRITEBYTECODE=1 in
# the environment (as on the CI machine) the interpreter never writes it, so each of those
# processes compiled some 150 modules from source again (~0.07 s of CPU each: ~10% of a
# CLI run's CPU). pip compiled the installed packages; the editable install's source tree
# is ours to compile. A module edited later is recompiled on import as usual (the .pyc
# records its source's mtime and size).
.venv/bin/python -m compileall -q -j 0 agent broker schemas waystation tests >/dev/null
# A test that cannot run because Mosquitto, PostgreSQL, RabbitMQ or Chromium is missing
# fails here instead of skipping (tests/server_skips.py): green means they ran.
export WAYSTATION_REQUIRE_SERVERS="${WAYSTATION_REQUIRE_SERVERS:-1}"
# The same for the real-browser tests without Chromium or Playwright.
export WAYSTATION_REQUIRE_BROWSER="${WAYSTATION_REQUIRE_BROWSER:-1}"

# Parallel workers (pytest-xdist): 2, one per core of the CI machine. The end-to-end tests
# keep about a core busy each (daemons starting, syncing), so a third worker only makes
# their deadlines tighter. --dist loadgroup keeps each xdist_group on one worker
# (tests/xdist_groups.py: the RabbitMQ cluster tests). WAYSTATION_TEST_WORKERS=N changes
# the count; 0 runs everything in this process.
workers="${WAYSTATION_TEST_WORKERS:-2}"
parallel=()
if [ "$workers" != 0 ]; then
  parallel=(-n "$workers" --dist loadgroup)
fi

if [ "${WAYSTATION_COVERAGE:-0}" = 0 ]; then
  exec .venv/bin/python -m pytest "${parallel[@]}" "$@"
fi

# Coverage (WAYSTATION_COVERAGE=1: .ci/run sets it, so CI always reports it; off by default
# here, for a quicker local run; README "Development") of the shipped packages agent/, broker/,
# schemas/ and waystation/ ([tool.coverage.run] in pyproject.toml): the xdist workers and
# every Python process the tests start (the daemons of the end-to-end tests, CLI runs,
# crash helpers) are measured too, each writing its own data file under .coverage-data/;
# they are combined and reported after the run. Reported, not gated: the exit code is
# pytest's, whatever the percentage.
rm -rf .coverage-data && mkdir .coverage-data
export COVERAGE_FILE="$PWD/.coverage-data/cov"
rc=0
if [ "$workers" != 0 ]; then
  # The xdist controller runs untraced; it hands COVERAGE_PROCESS_START to the workers
  # (tests/coverage_workers.py), which coverage's .pth file then measures from their start.
  WAYSTATION_COVERAGE_WORKERS="$PWD/pyproject.toml" \
    .venv/bin/python -m pytest "${parallel[@]}" "$@" || rc=$?
else
  .venv/bin/python -m coverage run -m pytest "$@" || rc=$?
fi
files=$(find .coverage-data -name 'cov.*' | wc -l)
.venv/bin/python -m coverage combine -q --data-file="$COVERAGE_FILE" .coverage-data >/dev/null || true
echo "coverage of agent/, broker/, schemas/, waystation/ (line coverage; $files data files: the xdist workers and the processes the tests started; reported, not gated):"
.venv/bin/python -m coverage report --data-file="$COVERAGE_FILE" --sort=cover || true
exit $rc
