#!/bin/sh
# Smoke suite of the QEMU harness: the VM is what the other suites expect.
# NVMe controllers by serial, IOMMU groups, hugepages, a controller bound to vfio-pci,
# hot-unplug of a controller on the host's side, a host binary with its libraries,
# and the static guest binaries.
#
# qemu-disk: id=nvme0 serial=DOSDSMOKE0 size=64M
# qemu-disk: id=nvme1 serial=DOSDSMOKE1 size=32M
# qemu-mem: 512
# qemu-smp: 2
# qemu-hugepages: 64
# qemu-timeout: 300
# qemu-host-bin: fio
set -eu

fail() {
    echo "smoke: FAIL: $*"
    exit 1
}
ok() { echo "smoke: ok: $*"; }

# wait_for SECONDS COMMAND...: polls COMMAND every 0.2 s until it succeeds.
wait_for() {
    n=$(($1 * 5))
    shift
    while ! "$@"; do
        n=$((n - 1))
        [ "$n" -gt 0 ] || return 1
        sleep 0.2
    done
}

# The nvme class entry (nvmeN) of the controller with serial $1.
ctrl_by_serial() {
    for c in /sys/class/nvme/nvme*; do
        [ -e "$c/serial" ] || continue
        if [ "$(sed 's/ *$//' "$c/serial")" = "$1" ]; then
            basename "$c"
            return 0
        fi
    done
    return 1
}

[ "${DOSD_QEMU:-}" = 1 ] || fail "DOSD_QEMU is not set"
echo "smoke: kernel $(uname -r), $(nproc) CPUs, $(sed -n 's/MemTotal: *//p' /proc/meminfo)"

# NVMe controllers by serial.
c0=$(ctrl_by_serial DOSDSMOKE0) || fail "no NVMe controller with serial DOSDSMOKE0"
c1=$(ctrl_by_serial DOSDSMOKE1) || fail "no NVMe controller with serial DOSDSMOKE1"
addr0=$(basename "$(readlink -f "/sys/class/nvme/$c0/device")")
addr1=$(basename "$(readlink -f "/sys/class/nvme/$c1/device")")
ok "DOSDSMOKE0 is $c0 at $addr0, DOSDSMOKE1 is $c1 at $addr1"
wait_for 10 test -b "/dev/${c1}n1" || fail "no namespace block device /dev/${c1}n1"
ok "namespace /dev/${c1}n1: $(cat "/sys/block/${c1}n1/size") sectors"

# IOMMU.
ngroups=$(ls /sys/kernel/iommu_groups | wc -l)
[ "$ngroups" -gt 0 ] || fail "/sys/kernel/iommu_groups is empty (no IOMMU)"
group0=$(basename "$(readlink "/sys/bus/pci/devices/$addr0/iommu_group")") ||
    fail "$addr0 has no IOMMU group"
ok "$ngroups IOMMU groups; $addr0 in group $group0 with: $(ls "/sys/kernel/iommu_groups/$group0/devices" | tr '\n' ' ')"

# Hugepages.
total=$(sed -n 's/^HugePages_Total: *//p' /proc/meminfo)
[ "$total" -ge 64 ] || fail "HugePages_Total is $total, want 64"
grep -q ' /dev/hugepages hugetlbfs ' /proc/mounts || fail "hugetlbfs not mounted on /dev/hugepages"
ok "$total hugepages of $(sed -n 's/^Hugepagesize: *//p' /proc/meminfo), hugetlbfs on /dev/hugepages"

# A host binary and its shared libraries (qemu-host-bin), on the namespace of nvme1.
fio --version >/dev/null || fail "fio (qemu-host-bin) does not run"
fio --name=smoke --filename="/dev/${c1}n1" --size=8M --bs=4k --rw=randwrite \
    --ioengine=io_uring --direct=1 --verify=crc32c --minimal >/tmp/fio.out ||
    fail "fio with io_uring on /dev/${c1}n1 failed: $(cat /tmp/fio.out)"
ok "$(fio --version) wrote and verified 8 MiB on /dev/${c1}n1 with io_uring"

# Bind nvme0 to vfio-pci.
echo vfio-pci >"/sys/bus/pci/devices/$addr0/driver_override"
echo "$addr0" >"/sys/bus/pci/devices/$addr0/driver/unbind"
echo "$addr0" >/sys/bus/pci/drivers_probe
wait_for 10 test -c "/dev/vfio/$group0" || fail "/dev/vfio/$group0 did not appear"
drv=$(basename "$(readlink "/sys/bus/pci/devices/$addr0/driver")")
[ "$drv" = vfio-pci ] || fail "$addr0 is bound to $drv, not vfio-pci"
ok "$addr0 bound to vfio-pci: /dev/vfio/$group0"

# Hot-unplug nvme1 from the host (QMP device_del); pciehp removes it after ~5 s.
dosd-host device_del nvme1
gone() { [ ! -e "/sys/bus/pci/devices/$addr1" ] && [ ! -e "/sys/class/nvme/$c1" ]; }
wait_for 30 gone || fail "$addr1 ($c1) still present 30 s after device_del nvme1"
ok "nvme1 ($addr1) hot-unplugged"

# The static guest binaries.
for b in dosd dosp; do
    if command -v "$b" >/dev/null; then
        "$b" --help >/tmp/help.out 2>&1 || fail "$b --help failed: $(cat /tmp/help.out)"
        ok "$b --help: $(head -n 1 /tmp/help.out)"
    else
        echo "smoke: note: no $b binary in the image"
    fi
done
bins=
for f in /bin/*; do
    [ -L "$f" ] || [ "$f" = /bin/busybox ] || bins="$bins ${f#/bin/}"
done
echo "smoke: binaries in /bin:$bins"
echo "smoke: PASS"
