#!/bin/sh
# The user-space NVMe driver against QEMU's emulated NVMe controllers, through real
# VFIO behind an emulated IOMMU: bring-up and Identify, I/O across PRP shapes, flush,
# write zeroes, deallocate, several queue pairs from several threads, the SMART log,
# clean shutdown, the object store's conformance suite, store/fetch through a dosd
# with two dataplane loops (each its own queue pair on every disk and its own shard)
# on two NVMe disks (and again after a restart) with a SMART critical warning raised
# and cleared on the way, kill -9 of a storing dosd and a restart that finds its
# controllers still on vfio-pci, and last surprise removals under I/O:
# of a device the driver alone is using, and of one disk of a serving dosd.
#
# qemu-disk: id=nvme0 serial=DOSDNVME0 size=512M
# qemu-disk: id=nvme1 serial=DOSDNVME1 size=256M
# qemu-disk: id=nvme2 serial=DOSDNVME2 size=256M
# qemu-disk: id=nvme3 serial=DOSDNVME3 size=128M
# qemu-disk: id=nvme4 serial=DOSDNVME4 size=128M
# qemu-disk: id=nvme5 serial=DOSDNVME5 size=128M
# qemu-mem: 1536
# qemu-smp: 3
# qemu-hugepages: 256
# qemu-timeout: 1800
# qemu-cluster-key: yes
set -u

# The node has the cluster's key (a fresh one per run); the suite's dosp signs with it,
# and `dosp watch` drops what no key of it signed.
export DOSP_KEY_FILE=/etc/dosd/cluster.keys

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

# on_kernel_driver SERIAL: the kernel's nvme driver has the controller (it shows up
# in /sys/class/nvme with that serial, space-padded there).
on_kernel_driver() {
    for c in /sys/class/nvme/nvme*; do
        [ "$(sed 's/ *$//' "$c/serial" 2>/dev/null)" = "$1" ] && return 0
    done
    return 1
}

dosd_pid=""
# start_dosd [SERIAL...]: a node on these NVMe disks (default DOSDNVME1 DOSDNVME2).
start_dosd() {
    : >/tmp/dosd.out
    disks=""
    for s in ${*:-DOSDNVME1 DOSDNVME2}; do disks="$disks --disk nvme:$s"; done
    # shellcheck disable=SC2086
    dosd --data-dir /tmp/dosd-data --dataplane-cores 2 --cluster-key-file "$DOSP_KEY_FILE" $disks \
        >/tmp/dosd.out 2>>/tmp/dosd.log &
    dosd_pid=$!
    if ! wait_for 120 grep -q '^listening' /tmp/dosd.out; then
        echo "dosd did not start; its log:"
        tail -n 30 /tmp/dosd.log
        return 1
    fi
    cat /tmp/dosd.out
    # Two loops, each a thread of its own with its own queue pair on every disk.
    wait_for 10 loops_running || { echo "dosd does not run two dataplane loops"; return 1; }
}

loops_running() {
    [ "$(cat /proc/"$dosd_pid"/task/*/comm 2>/dev/null | grep -c '^dataplane-[01]$')" -eq 2 ]
}

# queue_pairs SERIAL: how many distinct I/O queue pairs the last dosd made on it.
queue_pairs() {
    # The log may carry colour escapes around each field: drop them first.
    grep "NVMe I/O queue pair ready" /tmp/dosd.log | tr -d '\033' | sed 's/\[[0-9;]*m//g' |
        grep "serial=$1" | sed 's/.*qid=\([0-9]*\).*/\1/' | sort -u | wc -l
}

stop_dosd() {
    kill -TERM "$dosd_pid" 2>/dev/null
    wait "$dosd_pid"
    rc=$?
    echo "dosd exited with $rc"
    [ "$rc" -eq 0 ]
}

dosd_store_fetch() {
    ip link set lo up 2>/dev/null || true
    rm -rf /tmp/dosd-data /tmp/dosd.log
    start_dosd || return 1
    dosp disks || return 1
    # Unsigned, a STORE is refused (AUTH_FAILED) and stores nothing.
    head -c 999 /dev/urandom >/tmp/unsigned
    if env -u DOSP_KEY_FILE dosp store /tmp/unsigned 2>/tmp/err; then echo "an unsigned STORE was accepted"; return 1; fi
    grep -q AUTH_FAILED /tmp/err || { echo "an unsigned STORE: $(cat /tmp/err)"; return 1; }
    echo "unsigned STORE refused: $(cat /tmp/err)"
    for s in DOSDNVME1 DOSDNVME2; do
        [ "$(queue_pairs "$s")" -ge 2 ] || { echo "$s: not one queue pair per loop"; grep "queue pair" /tmp/dosd.log; return 1; }
    done
    # The REST view names the NVMe backend and carries the device's SMART data.
    timeout 10 wget -qO /tmp/disks.json http://127.0.0.1:7380/v1/disks || return 1
    grep -q '"backend":"nvme"' /tmp/disks.json || { echo "REST does not show the nvme backend"; cat /tmp/disks.json; return 1; }
    grep -q '"temperature_kelvin"' /tmp/disks.json || { echo "REST has no SMART health"; cat /tmp/disks.json; return 1; }
    # A SMART critical warning raised on the controller (QEMU's property, set from
    # the host) reaches /v1/health and /metrics through the driver's health log reads.
    health_has() { timeout 10 wget -qO- http://127.0.0.1:7380/v1/health | grep -q "$1"; }
    dosd-host qom-set nvme1 smart_critical_warning 4
    wait_for 30 health_has disk_critical_warning || { echo "critical warning not reported"; return 1; }
    timeout 10 wget -qO- http://127.0.0.1:7380/v1/health; echo
    timeout 10 wget -qO- http://127.0.0.1:7380/metrics | grep 'dosd_disk_critical_warning{disk="0"} 4' ||
        { echo "critical warning not in /metrics"; return 1; }
    dosd-host qom-set nvme1 smart_critical_warning 0
    wait_for 30 health_has '"status":"ok"' || { echo "health did not return to ok"; return 1; }
    : >/tmp/fps
    for size in 0 1 4096 70000 1048577 3000000; do
        head -c "$size" /dev/urandom >"/tmp/obj.$size"
        fp=$(dosp store "/tmp/obj.$size") || return 1
        echo "$size $fp" >>/tmp/fps
    done
    echo "stored:"
    cat /tmp/fps
    while read -r size fp; do
        dosp fetch "$fp" -o /tmp/back || return 1
        cmp "/tmp/obj.$size" /tmp/back || { echo "object of $size bytes differs"; return 1; }
    done </tmp/fps
    stop_dosd || return 1
    # The controllers went back to the kernel's nvme driver on exit.
    for s in DOSDNVME1 DOSDNVME2; do
        on_kernel_driver "$s" || { echo "$s was not given back to the nvme driver"; return 1; }
    done
    grep -q "NVMe controller shut down cleanly" /tmp/dosd.log ||
        { echo "no clean NVMe shutdown on SIGTERM"; tail -n 20 /tmp/dosd.log; return 1; }
    echo "after restart:"
    start_dosd || return 1
    while read -r size fp; do
        dosp fetch "$fp" -o /tmp/back || return 1
        cmp "/tmp/obj.$size" /tmp/back || { echo "object of $size bytes differs after restart"; return 1; }
    done </tmp/fps
    stop_dosd
}

# kill -9 under a store workload: the controllers stay on vfio-pci, enabled, with
# commands possibly in flight. The next dosd finds them by serial on vfio-pci (by
# Identify), resets them, and every acknowledged object is there.
dosd_kill9() {
    rm -rf /tmp/dosd-data /tmp/dosd.log
    start_dosd || return 1
    : >/tmp/acked
    i=0
    (
        while :; do
            i=$((i + 1))
            head -c $((i * 7919 % 300000)) /dev/urandom >"/tmp/k.$i"
            fp=$(dosp store "/tmp/k.$i") && echo "$i $fp" >>/tmp/acked
        done
    ) &
    writer=$!
    sleep 4
    kill -9 "$dosd_pid"
    kill -9 "$writer" 2>/dev/null
    wait "$writer" 2>/dev/null
    wait "$dosd_pid" 2>/dev/null
    acked=$(wc -l </tmp/acked)
    echo "dosd killed with $acked objects acknowledged"
    [ "$acked" -gt 0 ] || { echo "nothing was stored before the kill"; return 1; }
    for s in DOSDNVME1 DOSDNVME2; do
        ! on_kernel_driver "$s" || { echo "$s is back on the nvme driver: the kill did not leave it on vfio-pci"; return 1; }
    done
    start_dosd || return 1
    while read -r i fp; do
        dosp fetch "$fp" -o /tmp/back || { echo "acknowledged object $i ($fp) lost"; return 1; }
        cmp "/tmp/k.$i" /tmp/back || { echo "object $i differs"; return 1; }
    done </tmp/acked
    echo "all $acked acknowledged objects fetched intact after kill -9 and restart"
    stop_dosd
}

# A serving node loses one of its two disks: the disk goes down, the node announces
# it, keeps serving the other disk and never returns wrong bytes.
dosd_disk_pulled() {
    rm -rf /tmp/dosd-data /tmp/dosd.log
    # Two fresh disks of one size: new objects alternate between them.
    start_dosd DOSDNVME4 DOSDNVME5 || return 1
    : >/tmp/fps
    for i in 1 2 3 4 5 6 7 8; do
        head -c $((i * 50000)) /dev/urandom >"/tmp/obj.$i"
        fp=$(dosp store "/tmp/obj.$i") || return 1
        echo "$i $fp" >>/tmp/fps
    done
    timeout 600 dosp watch >/tmp/watch.out 2>&1 &
    watch_pid=$!
    sleep 1
    dosd-host device_del nvme5
    # pciehp waits ~5 s after the attention button, then the kernel asks for the device.
    down() { dosp disks | awk '$1 == 1 && $2 == "down" { found = 1 } END { exit !found }'; }
    wait_for 60 down || { echo "disk 1 never went down"; dosp disks; tail -n 20 /tmp/dosd.log; return 1; }
    dosp disks
    good=0
    while read -r i fp; do
        if dosp fetch "$fp" -o /tmp/back 2>/tmp/err; then
            cmp "/tmp/obj.$i" /tmp/back || { echo "object $i came back wrong"; return 1; }
            good=$((good + 1))
        else
            echo "object $i: $(cat /tmp/err)"
        fi
    done </tmp/fps
    [ "$good" -gt 0 ] || { echo "nothing could be fetched from the surviving disk"; return 1; }
    [ "$good" -lt 8 ] || { echo "no object was on the pulled disk: the check proves nothing"; return 1; }
    timeout 10 wget -qO /tmp/health.json http://127.0.0.1:7380/v1/health || return 1
    cat /tmp/health.json; echo
    grep -q '"status":"degraded"' /tmp/health.json || { echo "health is not degraded"; return 1; }
    kill "$watch_pid" 2>/dev/null
    grep -q "disk-down" /tmp/watch.out || { echo "no disk-down announcement heard"; cat /tmp/watch.out; return 1; }
    grep "disk-down" /tmp/watch.out | head -n 1
    grep -q "NVMe device lost" /tmp/dosd.log || { echo "driver did not report the loss"; return 1; }
    echo "$good of 8 objects still served from the surviving disk; the others refused, none wrong"
    stop_dosd
}

run identify nvme-guest identify DOSDNVME0 --expect-serial DOSDNVME0 --expect-bytes 536870912
run rw nvme-guest rw DOSDNVME0
run threads nvme-guest threads DOSDNVME0 --threads 4 --ops 100
run smart nvme-guest smart DOSDNVME0
run shutdown-cycle nvme-guest shutdown-cycle DOSDNVME0
run store-conformance nvme-guest store DOSDNVME1 DOSDNVME2 --seed 7
run dosd-store-fetch dosd_store_fetch
run dosd-kill9 dosd_kill9
run surprise-removal nvme-guest hotplug DOSDNVME3 --device-id nvme3
run dosd-disk-pulled dosd_disk_pulled

echo "nvme suite: $passed passed, $failed failed${failures:+ (failed:$failures)}"
[ "$failed" -eq 0 ]
