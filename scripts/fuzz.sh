#!/usr/bin/env bash
# Runs every libFuzzer target (fuzz/fuzz_targets) for a bounded time each.
# Needs a nightly toolchain (cargo-fuzz instruments with -Zsanitizer); installs
# cargo-fuzz from crates.io when missing. Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-${DOSD_FUZZ_SECS:-60}}"

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "==> fuzz: skipped (no nightly toolchain on this machine; cargo-fuzz needs one)"
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install --quiet --locked cargo-fuzz
fi
cargo +nightly fuzz build -O
for target in $(cargo +nightly fuzz list); do
    echo "==> fuzz $target for ${secs}s"
    # -rss_limit_mb: the store target keeps two 2 MiB disks plus libFuzzer's corpus.
    cargo +nightly fuzz run -O "$target" -- -max_total_time="$secs" -rss_limit_mb=4096 2>&1 \
        | grep -E '^(Done|==|SUMMARY|thread)|panicked|ERROR' || true
    # cargo fuzz exits non-zero and leaves an artifact on a crash.
    if compgen -G "artifacts/$target/*" >/dev/null; then
        echo "fuzz target $target found a crash: fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
