#!/usr/bin/env bash
# README command 1: set up and run the demo (embedded broker + server + three devices).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/waystation demo "$@"
