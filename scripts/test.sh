#!/usr/bin/env bash
# The test command: sets up, checks formatting and lints, runs every test
# (unit, property, kernel integration in network namespaces), after the demo
# and the benchmark so their figures show in the log. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features --quiet -- -D warnings
./target/release/tcpr demo --migrations 4 --interval 0.5
./target/release/tcpr bench --counts 1,100,10000
./target/release/tcpr bench-handoff --counts 1,100,10000 --moves 100
./target/release/tcpr soak --duration 60
cargo test --workspace --all-features --release -- --test-threads=2
