#!/bin/sh
# The whole accelerated path: dosd --net dpdk in a guest, its dataplane loop serving
# DOSP through DPDK's virtio PMD on a virtio-net NIC bound to vfio-pci (behind the
# emulated intel-iommu), its objects on two QEMU NVMe controllers through dosd's own
# user-space NVMe driver (VFIO too, in the same process), its management API on a
# second, kernel-driven NIC. The clients are on the host: the ordinary dosp client on
# the tap segment and curl on the forwarded management port, both in the harness's
# network namespace (qemu/suites/dpdk.host, asked for with dosd-host-check), each
# object checked against an MD5 of the host's own (md5sum): store, fetch, range,
# contents, delete of 0 B to 4 MiB + 1 objects, eight clients at once, /v1/disks
# naming both NVMe controllers, and objects fetched again after a restart of dosd
# (EAL, the port and both controllers again). With the cluster's key: every request is
# signed (the host checks' dosp has $DOSP_KEY_FILE), an unsigned one is refused
# and counted. Each step is bounded: a DPDK port in the
# wrong IOVA mode hangs silently.
#
# qemu-disk: id=nvme0 serial=DOSDDPDK0 size=256M
# qemu-disk: id=nvme1 serial=DOSDDPDK1 size=256M
# qemu-nic: id=mgmt kind=user fwd=7380
# qemu-nic: id=data kind=tap mac=52:54:00:77:00:02 host=10.77.0.1/24
# qemu-mem: 1536
# qemu-smp: 2
# qemu-hugepages: 256
# qemu-timeout: 900
# qemu-cluster-key: yes
set -u

NODE_IP=10.77.0.2
MGMT=10.0.2.15:7380

passed=0
failed=0
failures=""

# run NAME COMMAND...: one named check; its output is shown, its status counted.
run() {
    name=$1
    shift
    echo "=== RUN $name: $*"
    start=$(date +%s)
    if "$@"; then
        echo "=== PASS $name ($(($(date +%s) - start)) s)"
        passed=$((passed + 1))
    else
        echo "=== FAIL $name ($(($(date +%s) - start)) s)"
        failed=$((failed + 1))
        failures="$failures $name"
    fi
}

# wait_for SECONDS COMMAND...: polls COMMAND every 0.2 s until it succeeds.
wait_for() {
    wait_polls=$(($1 * 5))
    shift
    while ! "$@" 2>/dev/null; do
        wait_polls=$((wait_polls - 1))
        [ "$wait_polls" -gt 0 ] || return 1
        sleep 0.2
    done
}

# nvme_addr SERIAL: the PCI address of the kernel-driven controller with that serial.
nvme_addr() {
    for c in /sys/class/nvme/nvme*; do
        if [ "$(sed 's/ *$//' "$c/serial" 2>/dev/null)" = "$1" ]; then
            basename "$(readlink -f "$c/device")"
            return 0
        fi
    done
    return 1
}

driver_of() { basename "$(readlink -f "/sys/bus/pci/devices/$1/driver")" 2>/dev/null; }

# The data NIC to vfio-pci: DPDK's virtio PMD drives it from user space.
bind_data_nic() {
    bdf=$(dosd-nic --pci data) || return 1
    echo "data NIC: $(dosd-nic data 2>/dev/null || echo '?') at $bdf on $(driver_of "$bdf")"
    [ -e "/sys/bus/pci/devices/$bdf/iommu_group" ] || { echo "$bdf has no IOMMU group"; return 1; }
    group=$(basename "$(readlink "/sys/bus/pci/devices/$bdf/iommu_group")")
    echo vfio-pci >"/sys/bus/pci/devices/$bdf/driver_override"
    if [ -e "/sys/bus/pci/devices/$bdf/driver" ]; then
        echo "$bdf" >"/sys/bus/pci/devices/$bdf/driver/unbind"
    fi
    echo "$bdf" >/sys/bus/pci/drivers_probe
    is_vfio() { [ "$(driver_of "$bdf")" = vfio-pci ] && [ -e "/dev/vfio/$group" ]; }
    wait_for 10 is_vfio || { echo "$bdf is on $(driver_of "$bdf"), not vfio-pci"; return 1; }
    echo "data NIC $bdf on vfio-pci, /dev/vfio/$group"
    # The management NIC is still the kernel's, with its address.
    ip -4 addr show dev "$(dosd-nic mgmt)" | grep -q "inet ${MGMT%:*}/" ||
        { echo "the management NIC has no ${MGMT%:*}"; ip addr; return 1; }
}

dosd_pid=""
dosd_failed() {
    echo "--- dosd's log (last 40 lines):"
    tail -n 40 /tmp/dosd.log
    echo "--- dosd's counters:"
    timeout 10 wget -qO- "http://$MGMT/metrics" 2>/dev/null | grep -v '^#' | grep -v '_bucket' | grep -v ' 0$' | head -n 60
    return 1
}

start_dosd() {
    : >/tmp/dosd.out
    : >/tmp/dosd.log
    nvme0=$(nvme_addr DOSDDPDK0) && nvme1=$(nvme_addr DOSDDPDK1) ||
        { echo "NVMe controllers DOSDDPDK0/1 not on the kernel's driver"; return 1; }
    echo "NVMe: DOSDDPDK0 at $nvme0, DOSDDPDK1 at $nvme1"
    # One lcore (the dataplane thread), only the data NIC, hugepages, no files in /var/run.
    DOSD_LOG=info dosd --data-dir /tmp/dosd-data --dataplane-cores 1 --cluster-key-file /etc/dosd/cluster.keys \
        --disk nvme:DOSDDPDK0 --disk nvme:DOSDDPDK1 \
        --net dpdk --dpdk-args "-l 0 -a $bdf --in-memory --huge-dir /dev/hugepages" \
        --dpdk-ip "$NODE_IP/24" --listen "$NODE_IP:7370" --mgmt-listen "$MGMT" \
        >/tmp/dosd.out 2>/tmp/dosd.log &
    dosd_pid=$!
    # EAL under TCG (and a busy host) takes seconds; the driver resets two controllers.
    if ! wait_for 120 grep -q '^listening' /tmp/dosd.out; then
        if kill -0 "$dosd_pid" 2>/dev/null; then
            echo "dosd did not start in 120 s"
            kill -9 "$dosd_pid"
        else
            wait "$dosd_pid"
            echo "dosd exited with $? before it served"
        fi
        dosd_failed
        return 1
    fi
    cat /tmp/dosd.out
    grep -q "dosp=$NODE_IP:7370 " /tmp/dosd.out || { echo "dosd does not serve DOSP on $NODE_IP:7370"; return 1; }
    # Seen from inside: the network backend is DPDK, both disks are NVMe.
    timeout 10 wget -qO /tmp/node.json "http://$MGMT/v1/node" || { echo "no /v1/node"; return 1; }
    grep -q '"network":"dpdk"' /tmp/node.json || { echo "/v1/node does not say dpdk"; cat /tmp/node.json; return 1; }
    grep -q "dataplane loop serving DOSP on the DPDK port" /tmp/dosd.log || { echo "no DPDK port in dosd's log"; return 1; }
    [ "$(grep -c "NVMe I/O queue pair ready" /tmp/dosd.log)" -ge 2 ] ||
        { echo "not one NVMe queue pair per disk"; dosd_failed; return 1; }
}

# The host stores, fetches, range-fetches, lists and deletes over the DPDK port.
host_objects() {
    dosd-host-check -t 600 objects "$NODE_IP:7370" || dosd_failed
}

host_keep() {
    dosd-host-check -t 300 keep "$NODE_IP:7370" || dosd_failed
}

# After a restart: EAL, the port and the NVMe controllers again, the objects still there.
restart_dosd() {
    stop_dosd || return 1
    start_dosd || return 1
    dosd-host-check -t 300 kept "$NODE_IP:7370" || dosd_failed
}

# The host reads the disks over the management NIC (forwarded port).
host_mgmt() {
    dosd-host-check -t 120 mgmt "$nvme0,DOSDDPDK0" "$nvme1,DOSDDPDK1" || dosd_failed
}

# SIGTERM: a clean exit, NVMe controllers shut down and given back to the kernel.
stop_dosd() {
    kill -TERM "$dosd_pid" 2>/dev/null
    gone() { ! kill -0 "$dosd_pid" 2>/dev/null; }
    if ! wait_for 60 gone; then
        echo "dosd did not stop within 60 s of SIGTERM"
        kill -9 "$dosd_pid"
        dosd_failed
        return 1
    fi
    wait "$dosd_pid"
    rc=$?
    echo "dosd exited with $rc"
    [ "$rc" -eq 0 ] || { dosd_failed; return 1; }
    grep -q "NVMe controller shut down cleanly" /tmp/dosd.log ||
        { echo "no clean NVMe shutdown"; dosd_failed; return 1; }
    wait_for 10 nvme_addr DOSDDPDK0 && wait_for 10 nvme_addr DOSDDPDK1 ||
        { echo "the controllers were not given back to the nvme driver"; return 1; }
}

# --- The benchmark (only with dosd.bench=1 on the kernel command line:
# DOSD_QEMU_APPEND=dosd.bench=1 qemu/test dpdk): 4 MiB fetches from the host through
# dosd --net dpdk on the virtio PMD, then through dosd on the kernel backend on the
# same NIC given back to virtio-net, the same disks, the same client; dosd's CPU time
# in the guest over each fetch phase. The host prints the table and the ratios.

# utime + stime of dosd, in clock ticks.
dosd_ticks() { awk '{ print $14 + $15 }' "/proc/$dosd_pid/stat"; }

bench_dpdk() {
    start_dosd || return 1
    t0=$(dosd_ticks)
    dosd-host-check -t 900 bench dpdk "$NODE_IP:7370" || { dosd_failed; return 1; }
    dpdk_ticks=$(($(dosd_ticks) - t0))
    stop_dosd
}

# The data NIC back to the kernel's virtio-net, with the node's address.
nic_to_kernel() {
    echo virtio-pci >"/sys/bus/pci/devices/$bdf/driver_override"
    echo "$bdf" >"/sys/bus/pci/devices/$bdf/driver/unbind"
    echo "$bdf" >/sys/bus/pci/drivers_probe
    wait_for 20 dosd-nic data >/dev/null || { echo "the data NIC did not come back as a netdev"; return 1; }
    dev=$(dosd-nic data)
    ip addr add "$NODE_IP/24" dev "$dev" && ip link set "$dev" up || return 1
    echo "data NIC $bdf on $(driver_of "$bdf") as $dev, $NODE_IP"
}

bench_kernel() {
    nic_to_kernel || return 1
    : >/tmp/dosd.out
    DOSD_LOG=info dosd --data-dir /tmp/dosd-data --dataplane-cores 1 --cluster-key-file /etc/dosd/cluster.keys \
        --disk nvme:DOSDDPDK0 --disk nvme:DOSDDPDK1 \
        --listen "$NODE_IP:7370" --multicast-if "$NODE_IP" --mgmt-listen "$MGMT" \
        >/tmp/dosd.out 2>/tmp/dosd.log &
    dosd_pid=$!
    wait_for 120 grep -q '^listening' /tmp/dosd.out || { echo "dosd (kernel) did not start"; dosd_failed; return 1; }
    t0=$(dosd_ticks)
    dosd-host-check -t 900 bench kernel "$NODE_IP:7370" || { dosd_failed; return 1; }
    kernel_ticks=$(($(dosd_ticks) - t0))
    stop_dosd
}

bench_report() {
    dosd-host-check -t 60 report "$dpdk_ticks" "$kernel_ticks" "$(getconf CLK_TCK 2>/dev/null || echo 100)"
}

run bind-data-nic bind_data_nic
if [ "$failed" -eq 0 ]; then
    rm -rf /tmp/dosd-data
    run dosd-start start_dosd
fi
if [ "$failed" -eq 0 ]; then
    run host-objects host_objects
    run host-mgmt host_mgmt
    run host-keep host_keep
    run dosd-restart restart_dosd
    run dosd-stop stop_dosd
fi
if [ "$failed" -eq 0 ] && grep -qw dosd.bench=1 /proc/cmdline; then
    run bench-dpdk bench_dpdk
    [ "$failed" -eq 0 ] && run bench-kernel bench_kernel
    [ "$failed" -eq 0 ] && run bench-report bench_report
fi
if [ "$failed" -ne 0 ] && [ -n "$dosd_pid" ] && kill -0 "$dosd_pid" 2>/dev/null; then
    kill -9 "$dosd_pid"
fi

echo "dpdk suite: $passed passed, $failed failed${failures:+ (failed:$failures)}"
[ "$failed" -eq 0 ]
