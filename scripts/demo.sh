#!/usr/bin/env bash
# The main job: sets everything up, then migrates a live connection between
# two hosts made of network namespaces. Needs nothing but root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec ./target/release/tcpr demo "$@"
