#!/usr/bin/env bash
# Create .venv and install Waystation into it. Usage: scripts/bootstrap.sh [dev]
# Works on a fresh Debian/Ubuntu machine that has only python3 (>= 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "error: Waystation needs Python >= 3.11; '$PY' is $("$PY" --version 2>&1 || echo missing)." >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    # Debian splits venv/ensurepip into python3-venv.
    rm -rf .venv
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q "python${ver}-venv" </dev/null \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv </dev/null
      "$PY" -m venv .venv
    else
      echo "error: '$PY -m venv' failed; install your distribution's python3-venv package." >&2
      exit 1
    fi
  fi
fi

extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}" </dev/null
