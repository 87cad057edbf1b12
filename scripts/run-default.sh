#!/usr/bin/env bash
# The README's main command: sets up a fresh machine, builds, and runs the embedded
# default recipe (recipes/tiny.textproto) into runs/tiny.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
exec ./build/llama3 run recipes/tiny.textproto --out runs/tiny "$@"
