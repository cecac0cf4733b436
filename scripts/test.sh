#!/usr/bin/env bash
# Runs every test of dosd on a fresh Debian 12 machine: installs what is missing,
# then format check, lints, unit/property/integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v md5sum >/dev/null || need_apt+=(coreutils)
command -v cc >/dev/null || need_apt+=(gcc)
if ((${#need_apt[@]})); then
    echo "==> installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}"
fi

# The toolchain is pinned in rust-toolchain.toml; rustup installs it (and the
# components) on first use where it is missing.
rustup show active-toolchain >/dev/null
rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> building binaries"
cargo build --workspace --bins --locked
echo "==> cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked -- --test-threads="${DOSD_TEST_THREADS:-2}" 2>&1 | tee "$log"
echo "==> fuzz (bounded)"
./scripts/fuzz.sh "${DOSD_FUZZ_SECS:-20}"

# One closing line with the totals of every cargo test binary above.
awk '/^test result:/ { for (i = 1; i <= NF; i++) {
        if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
