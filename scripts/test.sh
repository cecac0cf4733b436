#!/usr/bin/env bash
# Runs every test of dosd on a fresh Debian 12 machine: installs what is missing,
# then format check, lints, unit/property/integration tests, fuzzing, schemathesis
# and the QEMU suites.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v md5sum >/dev/null || need_apt+=(coreutils)
command -v cc >/dev/null || need_apt+=(gcc)
# For the schemathesis run (from PyPI, into a venv under target/).
python3 -m venv --help >/dev/null 2>&1 || need_apt+=(python3-venv)
# Debian's headless-capable browser for tests/status_page.rs (the status page at `/`
# rendered, its DOM asserted, screenshots in target/status-page*.png).
command -v chromium >/dev/null || need_apt+=(chromium)
# DPDK 22.11 for the dpdk crate's `dpdk` feature (its static archives and headers).
command -v pkg-config >/dev/null && pkg-config --exists libdpdk ||
    need_apt+=(dpdk dpdk-dev libdpdk-dev pkg-config)
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
echo "==> cargo doc (warnings are errors: broken intra-doc links fail the run)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
echo "==> building binaries"
cargo build --workspace --bins --locked
echo "==> cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked -- --test-threads="${DOSD_TEST_THREADS:-2}" 2>&1 | tee "$log"
# The DPDK bindings with DPDK linked in: lints, then the port layer on net_ring and
# net_null (no hugepages, no privileges). The workspace steps above build them without.
echo "==> cargo clippy -p dpdk --features dpdk"
cargo clippy -p dpdk --features dpdk --all-targets --locked -- -D warnings
echo "==> cargo test -p dpdk --features dpdk"
cargo test -p dpdk --features dpdk --locked 2>&1 | tee -a "$log"
# The dataplane loop over DpdkPort (smoltcp on mbufs) served to the kernel through a
# net_tap vdev (root; it says SKIPPED otherwise). Its own test binary: EAL is once per
# process.
echo "==> cargo clippy -p dataplane --features dpdk"
cargo clippy -p dataplane --features dpdk --all-targets --locked -- -D warnings
echo "==> cargo test -p dataplane --features dpdk,copy-count (dpdk_port)"
cargo test -p dataplane --features dpdk,copy-count --locked --test dpdk_port -- --test-threads=1 2>&1 | tee -a "$log"
# The unit tests that exist only with the feature (ARP sharing, the receive guard).
cargo test -p dataplane --features dpdk,copy-count --locked --lib -- dpdk_port rx_guard 2>&1 | tee -a "$log"
# The whole node: `dosd --net dpdk` on a net_tap vdev, the client on the kernel side
# (root; it says SKIPPED otherwise).
echo "==> cargo clippy --features dpdk (dosd)"
cargo clippy --features dpdk --all-targets --locked -- -D warnings
echo "==> cargo test --features dpdk (net_dpdk)"
cargo test --features dpdk --locked --test net_dpdk -- --test-threads=1 2>&1 | tee -a "$log"
# The same node under bad input: raw frames at the tap (malformed, bad checksums,
# fragments, out-of-window segments, a SYN flood), each drop counted in /metrics.
echo "==> cargo test --features dpdk (net_dpdk_bad)"
cargo test --features dpdk --locked --test net_dpdk_bad -- --test-threads=1 2>&1 | tee -a "$log"
echo "==> fuzz (bounded)"
./scripts/fuzz.sh "${DOSD_FUZZ_SECS:-20}"

# schemathesis against a real node's /openapi.json: every operation, generated and
# mutated requests, every check (status codes, content types, response schemas, no
# 5xx). Seeded, so that a failure replays; bounded examples keep it well under two
# minutes. DOSD_SCHEMATHESIS_EXAMPLES=0 skips it.
st_examples="${DOSD_SCHEMATHESIS_EXAMPLES:-50}"
if ((st_examples > 0)); then
    echo "==> schemathesis ($st_examples examples per operation)"
    venv=target/schemathesis-venv
    if [[ ! -x $venv/bin/schemathesis ]]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q 'schemathesis>=4,<5'
    fi
    st_dir="$(mktemp -d)"
    st_pid=
    trap 'rm -f "$log"; [[ -n $st_pid ]] && kill "$st_pid" 2>/dev/null; rm -rf "$st_dir"' EXIT
    # Its own multicast group, so that its heartbeats meet no other test's node.
    coproc DOSD {
        exec target/debug/dosd --data-dir "$st_dir/data" --disks 2 --disk-size 64M \
            --listen 127.0.0.1:0 --mgmt-listen 127.0.0.1:0 --mgmt-token schemathesis \
            --multicast "239.255.$((RANDOM % 250 + 1)).$((RANDOM % 250 + 1)):17999" \
            --multicast-if 127.0.0.1 2>"$st_dir/dosd.log"
    }
    st_pid=$DOSD_PID
    # The first line says where it listens, once the disks are open.
    read -r -t 30 line <&"${DOSD[0]}" || { cat "$st_dir/dosd.log"; exit 1; }
    mgmt="$(sed -n 's/.* mgmt=\([^ ]*\).*/\1/p' <<<"$line")"
    st_bin="$PWD/$venv/bin/schemathesis"
    # From the scratch directory: its example database and caches stay out of the tree.
    (cd "$st_dir" && "$st_bin" run "http://$mgmt/openapi.json" \
        -H "Authorization: Bearer schemathesis" --checks all \
        --max-examples "$st_examples" --seed "${DOSD_SCHEMATHESIS_SEED:-1}")
    kill "$st_pid"
    wait "$st_pid" 2>/dev/null || true
    st_pid=
fi

# The QEMU suites (qemu/README.md): the harness's own smoke check, then the user-space
# NVMe driver against QEMU's emulated controllers through VFIO, the object store on
# them and surprise removal, then dosd --net dpdk on a virtio-net NIC through DPDK's
# virtio PMD with NVMe disks, driven from the host. qemu/test installs QEMU, the Debian
# kernel and busybox itself; the suites share one static guest build (with DPDK), which
# the appliance image (image/build) packs too.
# DOSD_QEMU=0 skips them (e.g. on a machine without QEMU's needs).
qemu_summary=""
if [[ ${DOSD_QEMU:-1} != 0 ]]; then
    for suite in smoke nvme dpdk; do
        echo "==> qemu/test $suite"
        ./qemu/test "$suite"
        qemu_summary+="qemu/test $suite passed; "
    done
    # The appliance (README "Appliance"): image/build twice (byte-identical; the guest
    # build above is reused), the image booted under OVMF by qemu/node (and again without
    # an IOMMU, from NVMe), served to the host's dosp. About 70 s (2 min on a busy host).
    echo "==> qemu/test appliance"
    ./qemu/test appliance
    qemu_summary+="qemu/test appliance passed; "
    # Three appliance nodes on one L2 segment in a network namespace (README "Appliance"):
    # LOCATE, heartbeats, a partition, a disk pulled under a workload. About 2 minutes.
    echo "==> qemu/test appliance-cluster"
    ./qemu/test appliance-cluster
    qemu_summary+="qemu/test appliance-cluster passed; "
    # A/B updates (README "Updating a node"): a good update POSTed and kept, a broken
    # one tried 3 times and rolled back by systemd-boot's boot counting, one QEMU
    # process, 6 boots. About 5 minutes (268–297 s measured 2026-11-30).
    # DOSD_QEMU_UPDATE=0 skips it.
    if [[ ${DOSD_QEMU_UPDATE:-1} != 0 ]]; then
        echo "==> qemu/test appliance-update"
        ./qemu/test appliance-update
        qemu_summary+="qemu/test appliance-update passed; "
    fi
fi

# One closing line with the totals of every cargo test binary above.
awk '/^test result:/ { for (i = 1; i <= NF; i++) {
        if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
[[ -z $qemu_summary ]] || echo "${qemu_summary% }"
