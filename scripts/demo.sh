#!/usr/bin/env bash
# Sets up, builds and runs qmoe's main job on its built-in example: `qmoe demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
build/tools/qmoe/qmoe demo "$@"
