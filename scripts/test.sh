#!/usr/bin/env bash
# The README's test command: sets up a fresh machine, builds, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
cd build
ctest --output-on-failure -j 2 --timeout 900
