#!/usr/bin/env python3
"""QEMU test harness for dosd: boots a suite script in a throw-away TCG VM.

Usage: qemu/test SUITE          (runs qemu/suites/SUITE.sh)

Steps: install missing host packages, fetch the Debian kernel once into
target/qemu/cache/, build the guest binaries fully static into target/qemu-guest/,
pack an initramfs (busybox, kernel modules, binaries, /suite.sh, /init), boot it under
QEMU with the disks the suite declares, stream the console, serve the guest's host
requests (DOSD-HOST: ...) over QMP, and exit with the suite's status. See README.md.

Only the Python standard library is used.
"""

import json
import os
import re
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

QEMU_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(QEMU_DIR)
TARGET = os.path.join(ROOT, "target")
CACHE = os.path.join(TARGET, "qemu", "cache")
GUEST_TARGET_DIR = os.path.join(TARGET, "qemu-guest")
RUST_TARGET = "x86_64-unknown-linux-gnu"

# Host packages: (package, a command or file that proves it is installed).
PACKAGES = [
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("cpio", "cpio"),
    ("zstd", "zstd"),
    ("kmod", "depmod"),
    ("fio", "fio"),
    ("iproute2", "ip"),
    ("curl", "curl"),
    # DPDK's headers and static archives: the guest dosd is built with --features dpdk.
    ("pkg-config", "pkg-config"),
    ("libdpdk-dev", "/usr/include/dpdk/rte_eal.h"),
]

# Kernel modules put in every initramfs and loaded by /init, in this order (each with
# its dependency closure). Missing ones are skipped with a note (vfio_virqfd is folded
# into vfio in later kernels).
MODULES = [
    "nvme",
    "vfio",
    "vfio_iommu_type1",  # a soft dependency of vfio: busybox modprobe would skip it
    "vfio_virqfd",
    "irqbypass",
    "vfio_pci_core",
    "vfio_pci",
    "virtio_pci",
    "virtio_net",
]

DEFAULTS = {"mem": 1024, "smp": 2, "hugepages": 128, "timeout": 900}


def log(msg):
    print(f"[host] {msg}", flush=True)


class HarnessError(Exception):
    pass


def run(cmd, **kw):
    """Runs a command, raising HarnessError with its output on failure."""
    kw.setdefault("check", False)
    res = subprocess.run(cmd, **kw)
    if res.returncode != 0:
        raise HarnessError(f"command failed (exit {res.returncode}): {shlex.join(cmd)}")
    return res


def output(cmd, **kw):
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, **kw)
    if res.returncode != 0:
        raise HarnessError(f"command failed (exit {res.returncode}): {shlex.join(cmd)}")
    return res.stdout


# ---------------------------------------------------------------------------- suite


def parse_size(text):
    m = re.fullmatch(r"(\d+)([KMGT]?)i?B?", text.strip(), re.I)
    if not m:
        raise HarnessError(f"bad size {text!r} (want e.g. 512M, 2G)")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(m.group(1)) * mult[m.group(2).upper()]


# The guest's address on QEMU's user networking (its built-in DHCP/DNS range).
USER_NET_GUEST = "10.0.2.15"


def parse_nic(val, where, nics):
    """One `# qemu-nic:` directive: a virtio-net NIC, either on QEMU's user networking
    (kind=user: driven by the guest kernel, guest ports forwarded to the same ports on
    127.0.0.1 in the harness's network namespace) or on a tap in that namespace
    (kind=tap: modern-only virtio behind its own pcie-root-port with iommu_platform=on,
    as DPDK's virtio PMD needs it; host=ADDR/PREFIX addresses the host's end)."""
    nic = {}
    for item in val.split():
        k, sep, v = item.partition("=")
        if not sep or k in nic:
            raise HarnessError(f"{where}: qemu-nic wants distinct key=value items, got {item!r}")
        nic[k] = v
    allowed = {"user": {"id", "kind", "mac", "fwd"}, "tap": {"id", "kind", "mac", "host"}}
    kind = nic.get("kind")
    if kind not in allowed:
        raise HarnessError(f"{where}: qemu-nic needs kind=user or kind=tap")
    extra = set(nic) - allowed[kind]
    if extra:
        raise HarnessError(f"{where}: qemu-nic kind={kind} takes no {', '.join(sorted(extra))}")
    nid = nic.get("id", "")
    # The tap is named dq-ID: at most 15 characters for the kernel.
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,11}", nid):
        raise HarnessError(f"{where}: qemu-nic needs id= (a letter, then up to 11 of [A-Za-z0-9_-])")
    if any(n["id"] == nid for n in nics):
        raise HarnessError(f"{where}: duplicate nic id {nid}")
    if "mac" not in nic:
        nic["mac"] = f"52:54:00:d0:5d:{len(nics) + 1:02x}"
    if not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", nic["mac"]):
        raise HarnessError(f"{where}: bad mac {nic['mac']!r} (lowercase aa:bb:cc:dd:ee:ff)")
    if any(n["mac"] == nic["mac"] for n in nics):
        raise HarnessError(f"{where}: duplicate mac {nic['mac']}")
    ports = []
    for p in filter(None, nic.get("fwd", "").split(",")):
        if not p.isdigit() or not 0 < int(p) < 65536:
            raise HarnessError(f"{where}: bad fwd port {p!r}")
        ports.append(int(p))
    nic["fwd"] = ports
    if "host" in nic and not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}/\d{1,2}", nic["host"]):
        raise HarnessError(f"{where}: bad host address {nic['host']!r} (want ADDR/PREFIX)")
    if kind == "user" and any(n["kind"] == "user" for n in nics):
        raise HarnessError(f"{where}: one kind=user NIC at most")
    nic["tap"] = f"dq-{nid}"
    return nic


def parse_suite(path):
    """Reads the `# qemu-KEY: VALUE` directives of a suite script's header (the
    comment block at its top: parsing stops at the first line of code)."""
    suite = dict(DEFAULTS)
    suite.update(disks=[], nics=[], tests=[], host_bins=[], cluster_key=False)
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                break
            m = re.match(r"#\s*qemu-([a-z-]+):\s*(.*?)\s*$", line)
            if not m:
                continue
            key, val = m.group(1), m.group(2)
            where = f"{path}:{lineno}"
            if key == "disk":
                disk = {}
                for item in val.split():
                    k, sep, v = item.partition("=")
                    if not sep:
                        raise HarnessError(f"{where}: qemu-disk wants key=value, got {item!r}")
                    disk[k] = v
                for k in ("id", "serial", "size"):
                    if k not in disk:
                        raise HarnessError(f"{where}: qemu-disk needs {k}=")
                if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", disk["id"]):
                    raise HarnessError(f"{where}: bad disk id {disk['id']!r}")
                if not re.fullmatch(r"[A-Za-z0-9_.-]{1,20}", disk["serial"]):
                    raise HarnessError(f"{where}: bad serial {disk['serial']!r} (1-20 chars)")
                if any(d["id"] == disk["id"] for d in suite["disks"]):
                    raise HarnessError(f"{where}: duplicate disk id {disk['id']}")
                disk["bytes"] = parse_size(disk["size"])
                suite["disks"].append(disk)
            elif key == "nic":
                suite["nics"].append(parse_nic(val, where, suite["nics"]))
            elif key in ("mem", "smp", "hugepages", "timeout"):
                if not val.isdigit():
                    raise HarnessError(f"{where}: qemu-{key} wants a number, got {val!r}")
                suite[key] = int(val)
            elif key == "tests":
                suite["tests"] += val.split()
            elif key == "host-bin":
                suite["host_bins"] += val.split()
            elif key == "cluster-key":
                if val not in ("yes", "no"):
                    raise HarnessError(f"{where}: qemu-cluster-key wants yes or no, got {val!r}")
                suite["cluster_key"] = val == "yes"
            else:
                raise HarnessError(f"{where}: unknown directive qemu-{key}")
    return suite


# ------------------------------------------------------------------------- packages


def installed(pkg):
    res = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", pkg],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return res.returncode == 0 and res.stdout.strip() == "install ok installed"


def ensure_packages():
    missing = []
    for pkg, probe in PACKAGES:
        present = os.path.exists(probe) if probe.startswith("/") else shutil.which(probe)
        if not present or not installed(pkg):
            missing.append(pkg)
    if not missing:
        return
    log(f"installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get", "-y", "-qq", "-o", "Dpkg::Use-Pty=0"]
    run(["apt-get", "update", "-qq"], env=env)
    run(apt + ["install", "--no-install-recommends"] + missing, env=env, stdout=subprocess.DEVNULL)


# --------------------------------------------------------------------------- kernel


def apt_download(pkg, dest):
    """apt-get download PKG into dest; returns the .deb path. Updates lists once if needed."""
    os.makedirs(dest, exist_ok=True)
    os.chmod(dest, 0o755)
    for attempt in (1, 2):
        before = set(os.listdir(dest))
        res = subprocess.run(
            ["apt-get", "download", "-qq", pkg],
            cwd=dest,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        debs = sorted(set(os.listdir(dest)) - before)
        if res.returncode == 0:
            debs = debs or [d for d in os.listdir(dest) if d.startswith(pkg + "_")]
            if debs:
                return os.path.join(dest, debs[-1])
        if attempt == 1:
            log(f"apt-get download {pkg} failed; updating package lists and retrying")
            run(["apt-get", "update", "-qq"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    raise HarnessError(f"apt-get download {pkg} failed: {res.stderr.strip()}")


def ensure_kernel():
    """Returns (vmlinuz, modules root, kernel version), fetching them once into CACHE."""
    stamp = os.path.join(CACHE, "kernel-version")
    root = os.path.join(CACHE, "kernel")
    if os.path.exists(stamp):
        with open(stamp) as f:
            version = f.read().strip()
        vmlinuz = os.path.join(root, "boot", f"vmlinuz-{version}")
        if os.path.exists(vmlinuz) and os.path.exists(
            os.path.join(root, "lib/modules", version, "modules.dep")
        ):
            return vmlinuz, root, version
    t0 = time.monotonic()
    debs = os.path.join(CACHE, "debs")
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(debs, ignore_errors=True)
    meta = apt_download("linux-image-amd64", debs)
    depends = output(["dpkg-deb", "-f", meta, "Depends"])
    m = re.search(r"(linux-image-[0-9][^\s,(|]*-amd64)", depends)
    if not m:
        raise HarnessError(f"linux-image-amd64 depends on no versioned image: {depends!r}")
    image_pkg = m.group(1)
    log(f"fetching kernel {image_pkg}")
    image = apt_download(image_pkg, debs)
    run(["dpkg-deb", "-x", image, root])
    version = image_pkg[len("linux-image-"):]
    vmlinuz = os.path.join(root, "boot", f"vmlinuz-{version}")
    moddir = None
    for cand in ("lib/modules", "usr/lib/modules"):
        if os.path.isdir(os.path.join(root, cand, version)):
            moddir = os.path.join(root, cand, version)
    if not os.path.exists(vmlinuz) or moddir is None:
        raise HarnessError(f"{image} has no boot/vmlinuz-{version} or modules dir")
    if moddir.startswith(os.path.join(root, "usr")):
        # depmod -b wants BASE/lib/modules/VERSION.
        os.makedirs(os.path.join(root, "lib"), exist_ok=True)
        os.symlink("../usr/lib/modules", os.path.join(root, "lib", "modules"))
    run(["depmod", "-b", root, version])
    shutil.rmtree(debs, ignore_errors=True)
    with open(stamp, "w") as f:
        f.write(version + "\n")
    log(f"kernel {version} cached in {os.path.relpath(root, ROOT)} ({time.monotonic() - t0:.0f} s)")
    return vmlinuz, root, version


def module_closure(kroot, version, modules=None):
    """Module files to load, dependencies first, for MODULES or the given list (as
    modprobe resolves them)."""
    order = []
    for mod in MODULES if modules is None else modules:
        res = subprocess.run(
            ["modprobe", "-d", kroot, "-S", version, "--show-depends", mod],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if res.returncode != 0:
            log(f"note: module {mod} not found in kernel {version}, skipped")
            continue
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod" and parts[1] not in order:
                order.append(parts[1])
    return order


# ---------------------------------------------------------------------------- build


def cargo(args):
    """Runs a static guest cargo build; returns the JSON messages it printed."""
    env = dict(
        os.environ,
        CARGO_TARGET_DIR=GUEST_TARGET_DIR,
        RUSTFLAGS="-C target-feature=+crt-static",
    )
    env.pop("CARGO_BUILD_RUSTFLAGS", None)
    cmd = ["cargo"] + args + [
        "--release",
        "--locked",
        "--target",
        RUST_TARGET,
        "--message-format=json-render-diagnostics",
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    if res.returncode != 0:
        raise HarnessError(f"guest build failed: {shlex.join(cmd)}")
    msgs = []
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            msgs.append(json.loads(line))
    return msgs


def is_static(path):
    """True when the ELF file has no PT_INTERP (no dynamic loader needed)."""
    with open(path, "rb") as f:
        hdr = f.read(64)
        if hdr[:4] != b"\x7fELF" or hdr[4] != 2:
            return False
        phoff = int.from_bytes(hdr[32:40], "little")
        phentsize = int.from_bytes(hdr[54:56], "little")
        phnum = int.from_bytes(hdr[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        if int.from_bytes(table[i * phentsize : i * phentsize + 4], "little") == 3:
            return False
    return True


# The guest's dosd is built with DPDK (statically linked: dpdk/build.rs), for every
# suite alike, so that the suites share one build.
GUEST_FEATURES = ["--features", "dosd/dpdk"]


def build_guest(tests):
    """Returns {name in /bin: host path} of the static guest binaries."""
    bins = {}
    for msg in cargo(["build", "--workspace", "--bins"] + GUEST_FEATURES):
        if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
            if "bin" in msg["target"]["kind"]:
                bins[msg["target"]["name"]] = msg["executable"]
    for pkg in tests:
        exes = [
            m["executable"]
            for m in cargo(["test", "--no-run", "--lib", "-p", pkg])
            if m.get("reason") == "compiler-artifact"
            and m.get("executable")
            and m.get("profile", {}).get("test")
        ]
        if len(exes) != 1:
            raise HarnessError(f"expected one lib test executable for {pkg}, got {exes}")
        bins[f"test-{pkg}"] = exes[0]
    for name, path in bins.items():
        if not is_static(path):
            raise HarnessError(f"guest binary {name} ({path}) is not statically linked")
    return bins


def build_host_tools():
    """The host's own (dynamic, debug) dosp client for the host-side checks: exactly
    scripts/test.sh's `cargo build --workspace --bins --locked` (building dosp alone
    would unify features differently and rebuild its dependencies), so in CI it is
    already built. Returns the directory holding it."""
    cmd = ["cargo", "build", "--workspace", "--bins", "--locked"]
    res = subprocess.run(
        cmd + ["--message-format=json-render-diagnostics"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    if res.returncode != 0:
        raise HarnessError(f"host build of dosp failed: {shlex.join(cmd)}")
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            msg = json.loads(line)
            if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
                if msg["target"]["name"] == "dosp":
                    return os.path.dirname(msg["executable"])
    raise HarnessError(f"{shlex.join(cmd)} named no dosp executable")


# ------------------------------------------------------------------------ initramfs

INIT = r"""#!/bin/sh
# /init of the dosd QEMU harness (generated by qemu/harness.py).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root DOSD_QEMU=1 DOSD_QEMU_SUITE=@SUITE@
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm /dev/hugepages /root
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo @HUGEPAGES@ > /proc/sys/vm/nr_hugepages
mount -t hugetlbfs hugetlbfs /dev/hugepages
[ "$(cat /proc/sys/vm/nr_hugepages)" -ge @HUGEPAGES@ ] ||
    echo "dosd-init: WARNING: only $(cat /proc/sys/vm/nr_hugepages) of @HUGEPAGES@ hugepages (qemu-mem too small?)"
hostname dosd-guest
ip link set lo up
# Modules, dependencies first, as the host resolved them (busybox modprobe ignores
# soft dependencies, so vfio_iommu_type1 is listed explicitly).
while read -r m; do
    insmod "$m" || echo "dosd-init: insmod $m failed"
done < /etc/dosd-modules
# Wait (bounded) for the declared NVMe controllers to show up.
want=@NDISKS@
i=0
while [ "$(ls /sys/class/nvme 2>/dev/null | wc -l)" -lt "$want" ] && [ $i -lt 300 ]; do
    sleep 0.1
    i=$((i + 1))
done
[ "$(ls /sys/class/nvme 2>/dev/null | wc -l)" -ge "$want" ] ||
    echo "dosd-init: only $(ls /sys/class/nvme 2>/dev/null | wc -l) of $want NVMe controllers appeared"
# The declared NICs (/etc/dosd-nics: ID KIND MAC), found by MAC (bounded wait); the
# kind=user one gets QEMU's user-networking address. DPDK wants /var/run.
mkdir -p /var/run
while read -r id kind mac; do
    i=0
    while ! grep -qx "$mac" /sys/class/net/*/address 2>/dev/null && [ $i -lt 300 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    dev=$(dosd-nic "$id" 2>/dev/null) || { echo "dosd-init: NIC $id ($mac) did not appear"; continue; }
    dosd-nic --pci "$id" >/dev/null  # remembered for when the suite unbinds it
    if [ "$kind" = user ]; then
        ip addr add @USERNET@/24 dev "$dev" && ip link set "$dev" up &&
            ip route add default via @USERGW@ dev "$dev" ||
            echo "dosd-init: cannot configure NIC $id ($dev)"
    fi
done < /etc/dosd-nics
echo
echo "dosd-init: up in $(cut -d' ' -f1 /proc/uptime) s, hugepages $(cat /proc/sys/vm/nr_hugepages), running /suite.sh"
cd /
sh /suite.sh
rc=$?
echo "DOSD-SUITE-EXIT $rc"
sync
poweroff -f
sleep 5
echo o > /proc/sysrq-trigger
"""

DOSD_HOST = r"""#!/bin/sh
# Asks the QEMU harness on the host to do something: dosd-host device_del ID
echo "DOSD-HOST: $*" > /dev/console
"""

# Runs a host-side check and waits for its result, which the harness types on the
# console: `DOSD-HOST-DONE TOKEN RC`. Exit status: the check's, 124 on timeout.
DOSD_HOST_CHECK = r"""#!/bin/sh
# dosd-host-check [-t SECONDS] NAME [ARG...]: runs qemu/suites/SUITE.host NAME ARG...
# on the host (in the harness's network namespace) and waits (default 600 s) for it.
wait=600
if [ "${1:-}" = -t ]; then wait=$2; shift 2; fi
[ $# -ge 1 ] || { echo "usage: dosd-host-check [-t SECONDS] NAME [ARG...]" >&2; exit 2; }
# What the harness accepts (else it would not hear the request and this would wait).
case $1 in '' | *[!A-Za-z0-9_-]*) echo "dosd-host-check: bad check name '$1'" >&2; exit 2 ;; esac
for a in "$@"; do
    case $a in '' | *[!A-Za-z0-9_.:=,/-]*) echo "dosd-host-check: bad argument '$a'" >&2; exit 2 ;; esac
done
token="c$$x$(cut -d' ' -f1 /proc/uptime | tr -d .)"
result=/tmp/.dosd-host-check.$token
rm -f "$result" "$result.tmp"
# No echo of what the harness types (its reply would be printed twice).
stty -echo </dev/console 2>/dev/null
# The reader: whole lines, without a timeout (busybox's timed read goes byte by byte
# and can stop mid-line, losing the answer), until this check's answer comes.
(
    while read -r word tok rc; do
        if [ "$word" = DOSD-HOST-DONE ] && [ "$tok" = "$token" ]; then
            echo "$rc" >"$result.tmp" && mv "$result.tmp" "$result"
            exit 0
        fi
    done
) </dev/console &
reader=$!
echo "DOSD-HOST: host-check $token $*" > /dev/console
end=$(($(date +%s) + wait))
while [ ! -e "$result" ] && [ "$(date +%s)" -lt "$end" ]; do
    sleep 0.2
done
if [ ! -e "$result" ]; then
    kill "$reader" 2>/dev/null
    echo "dosd-host-check $1: no result from the host in $wait s"
    exit 124
fi
wait "$reader"
rc=$(cat "$result")
rm -f "$result"
# The harness types the answer again until it hears this.
echo "DOSD-HOST-ACK $token" > /dev/console
echo "dosd-host-check $1: host check exited with $rc"
case $rc in '' | *[!0-9]*) exit 1 ;; esac
exit "$rc"
"""

# Prints the interface name of a declared NIC (by its MAC in /etc/dosd-nics); with
# --pci, the PCI address of its function instead (which stays when the interface goes,
# e.g. after binding the device to vfio-pci).
DOSD_NIC = r"""#!/bin/sh
# dosd-nic [--pci] ID
pci=
if [ "${1:-}" = --pci ]; then pci=1; shift; fi
mac=$(awk -v id="${1:-}" '$1 == id { print $3 }' /etc/dosd-nics)
[ -n "$mac" ] || { echo "dosd-nic: no NIC ${1:-} declared" >&2; exit 1; }
if [ -n "$pci" ] && [ -e "/etc/dosd-nic-$1.pci" ]; then cat "/etc/dosd-nic-$1.pci"; exit 0; fi
for a in /sys/class/net/*/address; do
    [ "$(cat "$a")" = "$mac" ] || continue
    dev=$(basename "$(dirname "$a")")
    if [ -n "$pci" ]; then
        # /sys/class/net/DEV/device is the virtio device; its parent the PCI function.
        addr=$(basename "$(dirname "$(readlink -f "/sys/class/net/$dev/device")")")
        echo "$addr" > "/etc/dosd-nic-$1.pci"
        echo "$addr"
    else
        echo "$dev"
    fi
    exit 0
done
echo "dosd-nic: NIC $1 ($mac) not found (bound to another driver? use --pci first)" >&2
exit 1
"""


def copy_file(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst)
    shutil.copymode(src, dst)


def host_bin_files(name):
    """A host binary plus every shared object ldd lists: [(host path, guest path)]."""
    path = shutil.which(name)
    if not path:
        raise HarnessError(f"qemu-host-bin {name}: not found on the host")
    path = os.path.realpath(path)
    files = [(path, f"/bin/{name}")]
    res = subprocess.run(["ldd", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        if "not a dynamic executable" in res.stdout:
            return files
        raise HarnessError(f"ldd {path} failed: {res.stdout.strip()}")
    for line in res.stdout.splitlines():
        line = line.strip()
        if "not found" in line:
            raise HarnessError(f"qemu-host-bin {name}: missing library: {line}")
        m = re.match(r"(\S+) => (/\S+) \(0x", line) or re.match(r"(/\S+) \(0x", line)
        if not m:
            continue  # linux-vdso.so.1
        lib = m.group(m.lastindex)
        files.append((os.path.realpath(lib), lib))
        if m.lastindex == 2 and not m.group(1).startswith("/"):
            # Also under the soname in the same directory, as the loader looks it up.
            files.append((os.path.realpath(lib), os.path.join(os.path.dirname(lib), m.group(1))))
    return files


def cluster_key_file(rundir):
    """The run's cluster key file (one fresh 32-byte key), made on first use."""
    path = os.path.join(rundir, "cluster.keys")
    if not os.path.exists(path):
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(f"# qemu/test's key for this run\nqemu {os.urandom(32).hex()}\n")
    return path


def build_initramfs(name, suite, script, kroot, version, bins, rundir):
    stage = os.path.join(rundir, "initramfs")
    shutil.rmtree(stage, ignore_errors=True)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "etc", "root"):
        os.makedirs(os.path.join(stage, d), exist_ok=True)
    # busybox and its applets.
    copy_file("/bin/busybox", os.path.join(stage, "bin/busybox"))
    for applet in output(["/bin/busybox", "--list-full"]).split():
        dst = os.path.join(stage, applet)
        if os.path.lexists(dst):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(stage, "bin/busybox"), os.path.dirname(dst)), dst)
    # Kernel modules, decompressed (busybox insmod need not know .xz), in load order.
    modroot = os.path.join(stage, "lib/modules", version)
    load = []
    for src in module_closure(kroot, version):
        rel = src.split(f"/modules/{version}/", 1)[1]
        dst = os.path.join(modroot, re.sub(r"\.(xz|zst|gz)$", "", rel))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if src.endswith(".xz"):
            with open(dst, "wb") as out:
                run(["xz", "-dc", src], stdout=out)
        elif src.endswith(".zst"):
            run(["zstd", "-q", "-d", "-f", src, "-o", dst])
        elif src.endswith(".gz"):
            with open(dst, "wb") as out:
                run(["gzip", "-dc", src], stdout=out)
        else:
            shutil.copyfile(src, dst)
        load.append("/" + os.path.relpath(dst, stage))
    for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        src = os.path.join(kroot, "lib/modules", version, f)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(modroot, f))
    run(["depmod", "-b", stage, version])
    with open(os.path.join(stage, "etc/dosd-modules"), "w") as f:
        f.write("".join(m + "\n" for m in load))
    # Guest binaries, without their debug info (a quarter of the size) unless
    # DOSD_QEMU_DEBUGINFO=1: symbols stay, so backtraces still name functions.
    strip = shutil.which("objcopy") if os.environ.get("DOSD_QEMU_DEBUGINFO") != "1" else None
    for bname, path in sorted(bins.items()):
        dst = os.path.join(stage, "bin", bname)
        if strip:
            run([strip, "--strip-debug", path, dst])
        else:
            copy_file(path, dst)
    for hb in suite["host_bins"]:
        for src, dst in host_bin_files(hb):
            copy_file(src, stage + dst)
    # Scripts.
    init = (
        INIT.replace("@SUITE@", name)
        .replace("@HUGEPAGES@", str(suite["hugepages"]))
        .replace("@NDISKS@", str(len(suite["disks"])))
        .replace("@USERNET@", USER_NET_GUEST)
        .replace("@USERGW@", "10.0.2.2")
    )
    if suite["cluster_key"]:
        # A fresh cluster key for this run: /etc/dosd/cluster.keys in the guest, and
        # the host checks' $DOSP_KEY_FILE (HostChecks), so every DOSP request is signed.
        keys = cluster_key_file(rundir)
        os.makedirs(os.path.join(stage, "etc/dosd"), exist_ok=True)
        shutil.copyfile(keys, os.path.join(stage, "etc/dosd/cluster.keys"))
        os.chmod(os.path.join(stage, "etc/dosd/cluster.keys"), 0o600)
    with open(os.path.join(stage, "etc/dosd-nics"), "w") as f:
        f.write("".join(f"{n['id']} {n['kind']} {n['mac']}\n" for n in suite["nics"]))
    scripts = (
        ("init", init),
        ("bin/dosd-host", DOSD_HOST),
        ("bin/dosd-host-check", DOSD_HOST_CHECK),
        ("bin/dosd-nic", DOSD_NIC),
    )
    for path, text in scripts:
        with open(os.path.join(stage, path), "w") as f:
            f.write(text)
        os.chmod(os.path.join(stage, path), 0o755)
    copy_file(script, os.path.join(stage, "suite.sh"))
    os.chmod(os.path.join(stage, "suite.sh"), 0o755)
    if os.geteuid() == 0:
        os.mknod(os.path.join(stage, "dev/console"), 0o600 | 0o020000, os.makedev(5, 1))
    # cpio newc | zstd.
    image = os.path.join(rundir, "initramfs.cpio.zst")
    files = output(["find", ".", "-mindepth", "1"], cwd=stage).splitlines()
    listing = "".join(p + "\n" for p in sorted(files))
    with open(image, "wb") as out:
        cpio = subprocess.Popen(
            ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            cwd=stage,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        zstd = subprocess.Popen(["zstd", "-q", "-3", "-T0"], stdin=cpio.stdout, stdout=out)
        cpio.stdout.close()
        cpio.stdin.write(listing.encode())
        cpio.stdin.close()
        if cpio.wait() != 0 or zstd.wait() != 0:
            raise HarnessError("building the initramfs failed (cpio | zstd)")
    return image


# ----------------------------------------------------------------------------- QMP


class Qmp:
    """A QMP client on a unix socket: commands, and a reader that logs events."""

    def __init__(self, path, out):
        self.out = out
        deadline = time.monotonic() + 15
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise HarnessError(f"cannot connect to QMP socket {path}")
                time.sleep(0.1)
        self.sock.settimeout(15)
        self.file = self.sock.makefile("rb")
        self.lock = threading.Lock()
        self.replies = {}
        self.cond = threading.Condition()
        self.next_id = 0
        try:
            greeting = self._read()
        except (OSError, ValueError) as e:
            raise HarnessError(f"no QMP greeting: {e}")
        if greeting is None or "QMP" not in greeting:
            raise HarnessError(f"unexpected QMP greeting: {greeting}")
        self.sock.settimeout(None)
        threading.Thread(target=self._reader, daemon=True).start()
        self.command("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        return json.loads(line) if line else None

    def _reader(self):
        try:
            while True:
                msg = self._read()
                if msg is None:
                    break
                if "event" in msg:
                    self.out(f"[qmp] event {msg['event']} {json.dumps(msg.get('data', {}))}")
                elif "id" in msg:
                    with self.cond:
                        self.replies[msg["id"]] = msg
                        self.cond.notify_all()
        except (OSError, ValueError):
            pass
        with self.cond:
            self.replies[None] = {"error": {"desc": "QMP connection closed"}}
            self.cond.notify_all()

    def command(self, execute, arguments=None, timeout=30):
        with self.lock:
            self.next_id += 1
            cid = self.next_id
        msg = {"execute": execute, "id": cid}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout
        with self.cond:
            while cid not in self.replies and None not in self.replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    return {"error": {"desc": f"no QMP reply in {timeout} s"}}
                self.cond.wait(left)
            return self.replies.pop(cid, None) or self.replies[None]

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# The guest's requests: `DOSD-HOST: VERB ARGS...` on the console -> handler(qmp, args).
def host_device_del(qmp, args, out):
    if len(args) != 1:
        return out(f"[host] device_del wants one device id, got {args}")
    reply = qmp.command("device_del", {"id": args[0]})
    out(f"[qmp] device_del {args[0]} -> {json.dumps(reply)}")


def host_qom_set(qmp, args, out):
    # qom-set ID PROPERTY VALUE: sets a property of a device (e.g. an NVMe
    # controller's smart_critical_warning, to raise a SMART critical warning).
    if len(args) != 3 or not args[2].isdigit():
        return out(f"[host] qom-set wants ID PROPERTY INTEGER, got {args}")
    path = f"/machine/peripheral/{args[0]}"
    reply = qmp.command("qom-set", {"path": path, "property": args[1], "value": int(args[2])})
    out(f"[qmp] qom-set {path} {args[1]}={args[2]} -> {json.dumps(reply)}")


HOST_ACTIONS = {"device_del": host_device_del, "qom-set": host_qom_set}

# A host check may run this long at most (less when the suite's time runs out first).
HOST_CHECK_TIMEOUT = 600
# Its answer is typed again this often until the guest acknowledges it, so many times
# (the guest reads it at once: a minute without its ACK means it gave up waiting).
REPLY_RESEND_SECS = 3
REPLY_TRIES = 20


class HostChecks:
    """The `host-check TOKEN NAME ARGS...` verb: runs `qemu/suites/SUITE.host NAME
    ARGS...` on the host, in the suite's network namespace (where the tap's host end
    and the forwarded ports are), with the host's dosp first on PATH; streams its
    output as `[host-check NAME] `, and when it ends types `DOSD-HOST-DONE TOKEN RC` on
    the guest's console (QEMU's stdin: the serial port), which `dosd-host-check` in the
    guest waits for. RC 124: it timed out and was killed."""

    def __init__(self, name, suite, netns, bindir, rundir, stdin, deadline, out):
        self.script = os.path.join(QEMU_DIR, "suites", f"{name}.host")
        self.netns = netns
        self.stdin = stdin
        self.deadline = deadline
        self.out = out
        self.lock = threading.Lock()
        self.results = []
        self.procs = set()
        self.unacked = {}
        self.closed = False
        path = os.environ.get("PATH", "/usr/bin:/bin")
        self.env = dict(
            os.environ,
            PATH=f"{bindir}:{path}" if bindir else path,
            DOSDQ_SUITE=name,
            DOSDQ_NETNS=netns or "",
            DOSDQ_WORK=os.path.join(rundir, "host"),
        )
        if suite["cluster_key"]:
            self.env["DOSP_KEY_FILE"] = cluster_key_file(rundir)
        for nic in suite["nics"]:
            key = "DOSDQ_NIC_" + re.sub(r"[^A-Za-z0-9]", "_", nic["id"]).upper()
            self.env[f"{key}_MAC"] = nic["mac"]
            if nic["kind"] == "tap":
                self.env[f"{key}_TAP"] = nic["tap"]
                self.env[f"{key}_HOST"] = nic.get("host", "")
            else:
                self.env[f"{key}_FWD"] = " ".join(str(p) for p in nic["fwd"])

    def start(self, args):
        if len(args) < 2 or not re.fullmatch(r"[A-Za-z0-9]+", args[0]):
            return self.out(f"[host] host-check wants TOKEN NAME [ARG...], got {args}")
        token, check = args[0], args[1]
        if not re.fullmatch(r"[A-Za-z0-9_-]+", check):
            return self.reply(token, 2, f"bad host check name {check!r}")
        if not os.access(self.script, os.X_OK):
            return self.reply(token, 2, f"no executable {os.path.relpath(self.script, ROOT)}")
        threading.Thread(target=self.run, args=(token, check, args[2:]), daemon=True).start()

    def run(self, token, check, args):
        cmd = [self.script, check] + args
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        timeout = max(1, min(HOST_CHECK_TIMEOUT, self.deadline - time.monotonic()))
        self.out(f"[host] host check {check}: {shlex.join(cmd)} (timeout {timeout:.0f} s)")
        t0 = time.monotonic()
        try:
            os.makedirs(self.env["DOSDQ_WORK"], exist_ok=True)
            proc = subprocess.Popen(
                cmd,
                cwd=self.env["DOSDQ_WORK"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            return self.reply(token, 2, f"cannot run host check {check}: {e}")
        with self.lock:
            self.procs.add(proc)

        def stream():
            for raw in proc.stdout:
                self.out(f"[host-check {check}] {raw.decode('utf-8', 'replace').rstrip()}")

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            rc = 124
            self.out(f"[host] host check {check} timed out after {timeout:.0f} s; killed")
        reader.join(5)
        with self.lock:
            self.procs.discard(proc)
            self.results.append((check, rc))
        self.reply(token, rc, f"host check {check}: exit {rc} in {time.monotonic() - t0:.1f} s")

    def reply(self, token, rc, note):
        """Types the answer on the guest's console, and again every few seconds until
        the guest acknowledges it (`DOSD-HOST-ACK TOKEN`, see `ack`) or the VM ends: a
        line on a serial console has no delivery guarantee."""
        self.out(f"[host] {note}")
        line = f"DOSD-HOST-DONE {token} {rc}\n".encode()
        with self.lock:
            self.unacked[token] = line
        threading.Thread(target=self._deliver, args=(token, line), daemon=True).start()

    def _deliver(self, token, line):
        for attempt in range(REPLY_TRIES):
            with self.lock:
                if token not in self.unacked or self.closed:
                    return
                if attempt:
                    self.out(f"[host] no DOSD-HOST-ACK {token} yet: typing the answer again")
                try:
                    self.stdin.write(line)
                    self.stdin.flush()
                except (OSError, ValueError) as e:
                    self.out(f"[host] cannot tell the guest ({e})")
                    return
            time.sleep(REPLY_RESEND_SECS)
        self.out(f"[host] the guest never acknowledged host check {token}")

    def ack(self, token):
        with self.lock:
            self.unacked.pop(token, None)

    @staticmethod
    def kill(proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()

    def close(self):
        """Kills the checks still running (the VM is gone); returns the results."""
        with self.lock:
            running = list(self.procs)
            self.closed = True
        for proc in running:
            self.kill(proc)
        return self.results


# ------------------------------------------------------------------- network namespace

NETNS_PREFIX = "dosdq-"


def netns_create():
    """A network namespace of this run, `dosdq-PID`, with lo up; first deletes those
    left by runs whose harness is gone (killed before it could clean up): no process
    PID, and no process inside (a harness seen from another PID namespace still has
    its QEMU there)."""
    res = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE, text=True)
    for line in res.stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        pid = ns[len(NETNS_PREFIX):]
        if not (ns.startswith(NETNS_PREFIX) and pid.isdigit()) or os.path.exists(f"/proc/{pid}"):
            continue
        inside = subprocess.run(["ip", "netns", "pids", ns], stdout=subprocess.PIPE, text=True)
        if inside.returncode == 0 and not inside.stdout.strip():
            log(f"deleting stale network namespace {ns}")
            subprocess.run(["ip", "netns", "del", ns])
    ns = f"{NETNS_PREFIX}{os.getpid()}"
    subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
    run(["ip", "netns", "add", ns])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    return ns


def netns_delete(ns):
    subprocess.run(["ip", "netns", "del", ns])


def configure_taps(ns, suite, out):
    """Once QEMU made them: each tap NIC's host end up, addressed, without IPv6 (no
    neighbour discovery chatter on the segment)."""
    for nic in suite["nics"]:
        if nic["kind"] != "tap":
            continue
        tap = nic["tap"]
        deadline = time.monotonic() + 15
        while subprocess.run(
            ["ip", "-n", ns, "link", "show", tap], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ).returncode:
            if time.monotonic() > deadline:
                raise HarnessError(f"QEMU made no tap {tap} in {ns}")
            time.sleep(0.1)
        run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{tap}.disable_ipv6=1"])
        if nic.get("host"):
            run(["ip", "-n", ns, "addr", "add", nic["host"], "dev", tap])
        run(["ip", "-n", ns, "link", "set", tap, "up"])
        out(f"[host] tap {tap} in {ns}: {nic.get('host', 'no address')}, up")

ANSI_RE = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|[()][A-Z0-9]|[A-Za-z])")
HOST_RE = re.compile(r"(?:^|[^'\"\w])DOSD-HOST: ([a-z_-]+)((?: +[A-Za-z0-9_.:=,/-]+)*) *$")
EXIT_RE = re.compile(r"(?:^|[^'\"\w])DOSD-SUITE-EXIT (\d+) *$")
ACK_RE = re.compile(r"(?:^|[^'\"\w])DOSD-HOST-ACK ([A-Za-z0-9]+) *$")


# ------------------------------------------------------------------------------ run


def qemu_command(suite, vmlinuz, initrd, rundir, qmp_path, netns=None):
    cmd = ["ip", "netns", "exec", netns] if netns else []
    cmd += [
        "qemu-system-x86_64",
        "-machine", "q35,kernel-irqchip=split",
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", str(suite["smp"]),
        "-m", str(suite["mem"]),
        "-nographic",
        "-no-reboot",
        "-nic", "none",
        "-device", "intel-iommu,intremap=on,caching-mode=on",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
        "-kernel", vmlinuz,
        "-initrd", initrd,
        # no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check
        # can fail and panic the boot (seen once in five appliance boots).
        "-append", "console=ttyS0 panic=-1 no_timer_check intel_iommu=on iommu=pt loglevel=4 "
        + os.environ.get("DOSD_QEMU_APPEND", ""),
    ]
    for k, disk in enumerate(suite["disks"], 1):
        img = os.path.join(rundir, f"{disk['id']}.img")
        with open(img, "wb") as f:
            f.truncate(disk["bytes"])
        did = disk["id"]
        cmd += [
            "-device", f"pcie-root-port,id=rp-{did},chassis={k},slot={k}",
            "-drive", f"file={img},if=none,id=drv-{did},format=raw,discard=unmap",
            "-device", f"nvme,id={did},serial={disk['serial']},drive=drv-{did},bus=rp-{did}",
        ]
    for k, nic in enumerate(suite["nics"], len(suite["disks"]) + 1):
        nid = nic["id"]
        if nic["kind"] == "user":
            # restrict=on: the guest reaches nothing beyond QEMU's own slirp (and the
            # namespace has no route out anyway); forwarded ports on 127.0.0.1 there.
            fwd = "".join(f",hostfwd=tcp:127.0.0.1:{p}-{USER_NET_GUEST}:{p}" for p in nic["fwd"])
            cmd += [
                "-netdev", f"user,id=net-{nid},restrict=on{fwd}",
                "-device", f"virtio-net-pci,id={nid},netdev=net-{nid},mac={nic['mac']}",
            ]
        else:
            # Modern-only virtio with VIRTIO_F_ACCESS_PLATFORM, alone behind its own root
            # port: DPDK's virtio PMD in IOVA-as-VA mode hangs silently without it.
            cmd += [
                "-device", f"pcie-root-port,id=rp-{nid},chassis={k},slot={k}",
                "-netdev", f"tap,id=net-{nid},ifname={nic['tap']},script=no,downscript=no,vhost=off",
                "-device", f"virtio-net-pci,id={nid},netdev=net-{nid},mac={nic['mac']},bus=rp-{nid},"
                "iommu_platform=on,disable-legacy=on",
            ]
    return cmd


def boot(name, suite, cmd, rundir, qmp_path, logfile, netns=None, bindir=None):
    """Runs QEMU, streams the console; returns (rc or None, reason)."""
    lock = threading.Lock()

    def out(line):
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            logfile.write(line + "\n")
            logfile.flush()

    out(f"[host] {shlex.join(cmd)}")
    # stdin is the guest's serial console input (host checks' results go there).
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    qmp = None
    rc = None
    reason = None
    panic = None
    deadline = time.monotonic() + suite["timeout"]
    checks = HostChecks(name, suite, netns, bindir, rundir, proc.stdin, deadline, out)
    try:
        try:
            qmp = Qmp(qmp_path, out)
        except HarnessError as e:
            if proc.poll() is None:
                raise
            qmp = None
            out(f"[host] {e}")
        if netns and proc.poll() is None:
            configure_taps(netns, suite, out)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "guest")
        sel.register(proc.stderr, selectors.EVENT_READ, "qemu")
        bufs = {"guest": b"", "qemu": b""}
        exit_deadline = None
        open_streams = 2
        while open_streams:
            now = time.monotonic()
            if exit_deadline is not None and now > exit_deadline:
                out("[host] the guest printed its exit status but QEMU did not stop; killed")
                break
            if now > deadline:
                reason = f"timeout: the suite did not finish in {suite['timeout']} s (qemu-timeout)"
                break
            for key, _ in sel.select(timeout=0.5):
                data = os.read(key.fileobj.fileno(), 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    data = b"\n" if bufs[key.data] else b""
                bufs[key.data] += data
                *lines, bufs[key.data] = bufs[key.data].split(b"\n")
                for raw in lines:
                    line = ANSI_RE.sub("", raw.decode("utf-8", "replace")).rstrip("\r")
                    if key.data == "qemu":
                        out(f"[qemu] {line}")
                        continue
                    out(f"[guest] {line}")
                    if panic is None and "Kernel panic" in line:
                        panic = line.strip()
                    m = EXIT_RE.search(line)
                    if m and rc is None:
                        rc = int(m.group(1))
                        exit_deadline = time.monotonic() + 30
                    m = ACK_RE.search(line)
                    if m:
                        checks.ack(m.group(1))
                    m = HOST_RE.search(line)
                    if m:
                        verb, args = m.group(1), m.group(2).split()
                        action = HOST_ACTIONS.get(verb)
                        if verb == "host-check":
                            checks.start(args)
                        elif action is None:
                            out(f"[host] unknown guest request {verb!r} ignored")
                        elif qmp is None:
                            out(f"[host] no QMP connection: cannot {verb}")
                        else:
                            threading.Thread(
                                target=action, args=(qmp, args, out), daemon=True
                            ).start()
        if rc is None and reason is None:
            try:
                status = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                status = "unknown: closed its output but did not exit"
            if panic:
                reason = f"guest kernel panic: {panic}"
            else:
                reason = f"QEMU exited (status {status}) before the suite printed DOSD-SUITE-EXIT"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if qmp:
            qmp.close()
        results = checks.close()
        try:
            proc.stdin.close()
        except OSError:
            pass
    if results:
        failed = [f"{c} (exit {r})" for c, r in results if r != 0]
        out(f"[host] host checks: {len(results)} run, {len(failed)} failed{': ' if failed else ''}"
            + ", ".join(failed))
    return rc, reason


def on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv):
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    if len(argv) != 2 or argv[1].startswith("-"):
        print("usage: qemu/test SUITE   (runs qemu/suites/SUITE.sh in a QEMU VM)", file=sys.stderr)
        suites = sorted(f[:-3] for f in os.listdir(os.path.join(QEMU_DIR, "suites")) if f.endswith(".sh"))
        print(f"suites: {' '.join(suites)} appliance appliance-update appliance-cluster", file=sys.stderr)
        return 2
    name = argv[1]
    if name == "appliance":
        # Not a suite in the harness's VM: the appliance image booted by qemu/node.
        import appliance

        return appliance.main()
    if name == "appliance-update":
        # The A/B update and rollback test on the appliance image (qemu/appliance_update.py).
        import appliance_update

        return appliance_update.main()
    if name == "appliance-cluster":
        # Three appliance nodes on one L2 segment (qemu/cluster.py, qemu/appliance_cluster.py).
        import appliance_cluster

        return appliance_cluster.main()
    script = os.path.join(QEMU_DIR, "suites", f"{name}.sh")
    t_start = time.monotonic()
    verdict = "FAIL"
    rc = None
    netns = None
    try:
        if not os.path.isfile(script):
            raise HarnessError(f"no suite {script}")
        suite = parse_suite(script)
        if "DOSD_QEMU_TIMEOUT" in os.environ:
            suite["timeout"] = int(os.environ["DOSD_QEMU_TIMEOUT"])
        rundir = os.path.join(TARGET, "qemu", f"run-{name}")
        shutil.rmtree(rundir, ignore_errors=True)
        os.makedirs(rundir)
        os.makedirs(CACHE, exist_ok=True)

        t = time.monotonic()
        ensure_packages()
        vmlinuz, kroot, version = ensure_kernel()
        log(f"packages and kernel {version}: {time.monotonic() - t:.1f} s")
        t = time.monotonic()
        bins = build_guest(suite["tests"])
        log(f"guest build ({' '.join(sorted(bins))}): {time.monotonic() - t:.1f} s")
        t = time.monotonic()
        initrd = build_initramfs(name, suite, script, kroot, version, bins, rundir)
        size = os.path.getsize(initrd) / (1 << 20)
        log(f"initramfs {os.path.relpath(initrd, ROOT)} ({size:.1f} MiB): {time.monotonic() - t:.1f} s")

        bindir = None
        if os.path.exists(os.path.join(QEMU_DIR, "suites", f"{name}.host")):
            t = time.monotonic()
            bindir = build_host_tools()
            log(f"host build (dosp for the host checks): {time.monotonic() - t:.1f} s")
        if suite["nics"]:
            netns = netns_create()
            log(f"network namespace {netns} (the NICs' host side)")
        qmp_path = os.path.join(rundir, "qmp.sock")
        cmd = qemu_command(suite, vmlinuz, initrd, rundir, qmp_path, netns)
        logpath = os.path.join(TARGET, "qemu", f"{name}.log")
        t = time.monotonic()
        with open(logpath, "w") as logfile:
            rc, reason = boot(name, suite, cmd, rundir, qmp_path, logfile, netns, bindir)
        log(f"VM: {time.monotonic() - t:.1f} s; console log in {os.path.relpath(logpath, ROOT)}")
        if rc is None:
            raise HarnessError(reason)
        verdict = "PASS" if rc == 0 else "FAIL"
    except HarnessError as e:
        log(f"error: {e}")
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        if netns:
            netns_delete(netns)
    secs = time.monotonic() - t_start
    what = f"rc {rc}" if rc is not None else "no exit status"
    print(f"qemu/test {name}: {verdict} ({what}) in {secs:.0f} s", flush=True)
    if rc is None:
        return 1
    return rc if 0 < rc < 256 else (0 if rc == 0 else 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
