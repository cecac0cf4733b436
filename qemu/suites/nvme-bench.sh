#!/bin/sh
# Benchmark, not a test: 4 KiB random reads and writes at queue depth 1 and 32 on one
# core, on one emulated NVMe controller, through dosd's user-space driver and through
# the kernel's nvme driver with fio's io_uring engine (polled completions when the
# kernel gives the nvme driver poll queues). Prints IOPS and CPU time per I/O for both
# and their ratio. Under TCG both sides are bound by the emulation; the ratio is the
# number to read. Run: qemu/test nvme-bench
#
# qemu-disk: id=nvme0 serial=DOSDBENCH0 size=1G
# qemu-mem: 1024
# qemu-smp: 2
# qemu-hugepages: 128
# qemu-timeout: 1800
# qemu-host-bin: fio
set -u
SECS=10
SPAN_MIB=256

ns_of_serial() {
    for c in /sys/class/nvme/nvme*; do
        if [ "$(sed 's/ *$//' "$c/serial" 2>/dev/null)" = "$1" ]; then
            for n in "$c"/nvme*n*; do
                [ -e "$n/dev" ] && { basename "$n"; return 0; }
            done
        fi
    done
    return 1
}

# Give the kernel driver a poll queue so fio can use polled completions (hipri).
hipri=0
if rmmod nvme 2>/dev/null && modprobe nvme poll_queues=1 2>/dev/null; then
    sleep 2
fi
ns=""
n=0
while [ -z "$ns" ] && [ $n -lt 50 ]; do
    ns=$(ns_of_serial DOSDBENCH0) || ns=""
    n=$((n + 1))
    sleep 0.2
done
[ -n "$ns" ] || { echo "no namespace for DOSDBENCH0"; exit 1; }
dev=/dev/$ns
[ "$(cat /sys/block/$ns/queue/io_poll 2>/dev/null)" = "1" ] && hipri=1
echo "bench: kernel device $dev, polled completions for fio: $hipri"

# Write the span once so reads hit written blocks on both sides.
fio --name=fill --filename="$dev" --rw=write --bs=1M --size=${SPAN_MIB}M --direct=1 \
    --ioengine=io_uring --eta=never --output=/dev/null || exit 1

: >/tmp/results
for rw in randread randwrite; do
    for qd in 1 32; do
        fio --name=b --filename="$dev" --rw=$rw --bs=4k --size=${SPAN_MIB}M --direct=1 \
            --ioengine=io_uring --hipri=$hipri --iodepth=$qd --runtime=$SECS --time_based \
            --randrepeat=1 --norandommap --eta=never --output-format=terse --terse-version=3 \
            --output=/tmp/fio.out || exit 1
        # terse v3: 8 read IOPS, 49 write IOPS, 88 usr %, 89 sys % (of one CPU)
        awk -F';' -v rw=$rw -v qd=$qd '{
            iops = (rw == "randread") ? $8 : $49; usr = $88; sys = $89;
            sub("%", "", usr); sub("%", "", sys);
            cpu = (iops > 0) ? (usr + sys) / 100 / iops * 1e6 : 0;
            printf "fio %s %d %.0f %.1f\n", rw, qd, iops, cpu }' /tmp/fio.out | tee -a /tmp/results
    done
done

for rw in read write; do
    for qd in 1 32; do
        nvme-guest bench DOSDBENCH0 --rw $rw --qd $qd --seconds $SECS --span-mib $SPAN_MIB \
            >/tmp/dosd.out || { cat /tmp/dosd.out; exit 1; }
        cat /tmp/dosd.out
        sed -n 's/.*rw=\([a-z]*\) qd=\([0-9]*\).* iops=\([0-9]*\) cpu_us_per_io=\([0-9.]*\).*/dosd rand\1 \2 \3 \4/p' \
            /tmp/dosd.out | tee -a /tmp/results
    done
done

echo
echo "4 KiB random I/O, one core, ${SECS} s each, same emulated controller (TCG):"
echo "| workload | QD | dosd IOPS | fio io_uring IOPS | ratio | dosd CPU us/IO | fio CPU us/IO |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for rw in randread randwrite; do
    for qd in 1 32; do
        d=$(awk -v rw=$rw -v qd=$qd '$1=="dosd" && $2==rw && $3==qd {print $4, $5}' /tmp/results)
        f=$(awk -v rw=$rw -v qd=$qd '$1=="fio" && $2==rw && $3==qd {print $4, $5}' /tmp/results)
        echo "$d $f" | awk -v rw=$rw -v qd=$qd '{
            r = ($3 > 0) ? $1 / $3 : 0;
            printf "| %s | %d | %d | %d | %.2fx | %.1f | %.1f |\n", rw, qd, $1, $3, r, $2, $4 }'
    done
done
