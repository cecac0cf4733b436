#!/usr/bin/env python3
"""qemu/test appliance: the appliance image, built and booted as an operator would.

1. image/build (the harness's static build: a no-op after the other QEMU suites);
   image size.
2. Reproducibility: a second build from the same inputs (--no-cargo: the same static
   binaries) into target/appliance/rebuild.img must be byte-identical (cmp).
3. qemu/node boots a copy of the image under OVMF (TCG) with 3 emulated NVMe disks;
   boot-to-serving time = QEMU start until GET /v1/disks answers over the forwarded
   port. /v1/disks must list the 3 controllers by serial, all online, on the nvme
   backend; /v1/health must answer.
   GET /v1/node: the node id is the one the init made and kept on the ESP, and
   boot.image_version is the image's IMAGE_VERSION (the init's first console line).
4. The host's dosp (scripts/test.sh's host build) stores, fetches, reads ranges of and
   deletes objects over the forwarded DOSP port; every byte is checked against md5sum.
   Every node has a cluster key on DOSDCONF (cluster.keys) and the client signs; an
   unsigned STORE is refused with AUTH_FAILED and stores nothing.
5. A power cut: 3 clients store objects (1000 B to 1 MiB + 7, random bytes) until at
   least 48 are acknowledged, and QEMU is killed (SIGKILL) with stores in flight.
   The same node (boot disk, NVMe disk files, OVMF variables) boots again: /v1/disks
   lists the 3 disks online, every acknowledged object fetches with its md5, GET
   /v1/node has the node id of before the cut and a higher epoch.
6. On that second boot, QMP system_powerdown: the init stops dosd and powers off
   within 60 s.
7. The fallback, booted the same way: no IOMMU and the boot disk on NVMe; the init
   leaves the boot controller out and serves the 2 other drives as file:/dev/nvmeXn1
   (the kernel's nvme driver and io_uring), saying so; one object stored and fetched;
   clean poweroff.

Every wait is bounded. Consoles in target/qemu/appliance.log (first boot),
appliance-after-cut.log and appliance-fallback.log. Standard library only.
"""

import hashlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

QEMU_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(QEMU_DIR)
sys.path.insert(0, QEMU_DIR)
import harness  # noqa: E402
import node as qnode  # noqa: E402

NAME = "appl"
DISKS = 3
IMAGE = os.path.join(ROOT, "target", "appliance", "dosd-appliance.img")
REBUILD = os.path.join(ROOT, "target", "appliance", "rebuild.img")
BOOT_TIMEOUT = 300
CUT_AFTER = 48  # acknowledged stores before the power cut
CUT_CLIENTS = 3
CUT_SIZES = (1000, 4096, 65537, (256 << 10) + 5, (1 << 20) + 7)
ANSI_RE = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|[()][A-Z0-9]|[A-Za-z])")


class Fail(Exception):
    pass


def log(msg):
    print(f"[appliance] {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def md5sum(path):
    out = subprocess.run(["md5sum", path], stdout=subprocess.PIPE, text=True, check=True).stdout
    return out.split()[0]


def http_get(port, path, timeout=5):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.status, r.read()


class Console:
    """Streams QEMU's stdout (the serial console) to our stdout and the log, and
    remembers when each line arrived (seconds since QEMU started)."""

    def __init__(self, proc, logpath, t0):
        self.lines = []
        self.t0 = t0
        self.lock = threading.Lock()
        self.logf = open(logpath, "w")
        self.thread = threading.Thread(target=self.pump, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def pump(self, stream):
        for raw in iter(stream.readline, b""):
            line = ANSI_RE.sub("", raw.decode(errors="replace")).rstrip("\r\n").replace("\r", "")
            t = time.monotonic() - self.t0
            with self.lock:
                self.lines.append((t, line))
            self.logf.write(f"{t:7.2f} {line}\n")
            self.logf.flush()
            if line.strip():
                print(f"[guest {t:6.1f}] {line}", flush=True)

    def first(self, pattern):
        m = self.match(pattern)
        return m[0] if m else None

    def match(self, pattern):
        """(seconds, re.Match) of the first line matching pattern, or None."""
        rx = re.compile(pattern)
        with self.lock:
            for t, line in self.lines:
                m = rx.search(line)
                if m:
                    return t, m
        return None


def qmp(sock_path, command, timeout=10):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        f = s.makefile("rwb")
        f.readline()  # greeting
        for cmd in ({"execute": "qmp_capabilities"}, {"execute": command}):
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "return" in msg or "error" in msg:
                    break
        return msg


def build_and_reproduce(results):
    t = time.monotonic()
    subprocess.run([os.path.join(ROOT, "image", "build")], check=True)
    results["build_s"] = time.monotonic() - t
    results["image_bytes"] = os.path.getsize(IMAGE)
    t = time.monotonic()
    subprocess.run([os.path.join(ROOT, "image", "build"), "--no-cargo", "-o", REBUILD], check=True)
    results["rebuild_s"] = time.monotonic() - t
    if subprocess.run(["cmp", IMAGE, REBUILD]).returncode != 0:
        raise Fail("the image rebuilt from the same inputs differs (cmp above)")
    os.unlink(REBUILD)
    log(f"reproducible: a second build is byte-identical ({results['image_bytes']} bytes)")


KEYS = os.path.join(ROOT, "target", "qemu", "appliance.keys")


def keys():
    """The appliance tests' cluster key file (made on first use): every node they boot
    has it on DOSDCONF, and their dosp signs with it."""
    if not os.path.exists(KEYS):
        qnode.new_key_file(KEYS, key_id="appliance")
    return KEYS


def keyed(boot):
    """A Node prepare hook: the cluster key onto the node's DOSDCONF."""
    qnode.configure(boot, qnode.keyed(keys()))


def dosp(bindir, port, *args, timeout=120, signed=True):
    env = dict(os.environ, DOSP_NODE=f"127.0.0.1:{port}")
    auth = ["--key-file", keys()] if signed else []
    return subprocess.run(
        ["timeout", str(timeout), os.path.join(bindir, "dosp"), "--timeout", "60"] + auth + list(args),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def check_disks(rest):
    status, body = http_get(rest, "/v1/disks")
    disks = json.loads(body)["disks"]
    want = sorted(qnode.serial(NAME, k) for k in range(1, DISKS + 1))
    got = sorted(d["location"].split(" serial ", 1)[-1].split("@")[0] for d in disks)
    for d in disks:
        log(f"disk {d['id']}: {d['backend']} at {d['location']}, {d['state']}")
    if got != want:
        raise Fail(f"/v1/disks lists serials {got}, the node has {want}")
    if not all(d["state"] == "online" for d in disks):
        raise Fail("not every disk is online")
    if not all(d["backend"] == "nvme" for d in disks):
        raise Fail("not every disk is on the nvme backend (vfio-pci)")
    status, body = http_get(rest, "/v1/health")
    log(f"/v1/health: {body.decode().strip()[:200]}")


def check_objects(bindir, port, work):
    r = dosp(bindir, port, "ping")
    if r.returncode != 0:
        raise Fail(f"dosp ping: {r.stderr.strip()}")
    # The node has the cluster key: unsigned, a STORE is refused and stores nothing.
    path = os.path.join(work, "unsigned")
    with open(path, "wb") as f:
        f.write(os.urandom(1000))
    r = dosp(bindir, port, "store", path, signed=False)
    if r.returncode == 0 or "AUTH_FAILED" not in r.stderr:
        raise Fail(f"an unsigned STORE was not refused: exit {r.returncode} {r.stderr.strip()}")
    if dosp(bindir, port, "fetch", md5sum(path), "-o", path + ".back").returncode == 0:
        raise Fail("an unsigned STORE stored its object")
    log(f"an unsigned STORE refused ({r.stderr.strip()[:90]}), nothing stored")
    fps = []
    for size in (0, 1024, 1 << 20, (4 << 20) + 1):
        path = os.path.join(work, f"obj.{size}")
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        want = md5sum(path)
        r = dosp(bindir, port, "store", path)
        if r.returncode != 0 or r.stdout.strip() != want:
            raise Fail(f"store of {size} bytes: {r.stdout.strip()!r} (md5sum {want}) {r.stderr.strip()}")
        back = path + ".back"
        r = dosp(bindir, port, "fetch", want, "-o", back)
        if r.returncode != 0 or md5sum(back) != want:
            raise Fail(f"fetch of {want} ({size} bytes) {r.stderr.strip()}")
        with open(path, "rb") as f:
            data = f.read()
        for off, length in ((0, 1), (size // 3, size // 2), (max(size - 7, 0), 7)):
            if off + length > size or length == 0:
                continue
            part = path + ".part"
            r = dosp(bindir, port, "range", want, str(off), str(length), "-o", part)
            if r.returncode != 0:
                raise Fail(f"range {off}+{length} of {want}: {r.stderr.strip()}")
            if md5sum(part) != hashlib.md5(data[off:off + length]).hexdigest():
                raise Fail(f"range {off}+{length} of {want}: wrong bytes")
        fps.append((want, size))
        log(f"{size} bytes: stored, fetched and ranges read, md5 {want}")
    r = dosp(bindir, port, "contents")
    held = set(line.split()[0] for line in r.stdout.splitlines() if line.strip())
    missing = [fp for fp, _ in fps if fp not in held]
    if r.returncode != 0 or missing:
        raise Fail(f"contents lacks {missing}")
    for fp, size in fps:
        r = dosp(bindir, port, "delete", fp)
        if r.returncode != 0 or r.stdout.strip() != "0":
            raise Fail(f"delete of {fp}: {r.stdout.strip()!r} {r.stderr.strip()}")
        r = dosp(bindir, port, "fetch", fp, "-o", os.path.join(work, "gone"))
        if r.returncode == 0:
            raise Fail(f"{fp} still fetched after its delete")
    log(f"{len(fps)} objects deleted, none fetched afterwards")


class Node:
    """One qemu/node run: QEMU with the console streamed, on free loopback ports."""

    def __init__(self, name, extra, logname, prepare=None, fresh=True):
        """prepare(boot_img), if given, runs on the node's fresh copy of the image
        before QEMU starts (e.g. to write its own dosd.toml onto DOSDCONF). fresh=False
        boots the node's files as the last run left them (boot disk, NVMe disks)."""
        self.name = name
        self.rest, self.dosp = free_port(), free_port()
        while self.dosp == self.rest:
            self.dosp = free_port()
        args = ["--name", name, "--rest-port", str(self.rest), "--dosp-port", str(self.dosp)] + extra
        if fresh:
            args.append("--fresh")
        cmd = qnode.command(qnode.parser().parse_args(args))
        self.work = os.path.join(qnode.node_dir(name), "objects")
        os.makedirs(self.work, exist_ok=True)
        if prepare is not None:
            prepare(os.path.join(qnode.node_dir(name), "boot.img"))
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.console = Console(self.proc, os.path.join(ROOT, "target", "qemu", logname), self.t0)

    def wait_serving(self):
        """Seconds from QEMU's start until GET /v1/disks answers."""
        while time.monotonic() - self.t0 < BOOT_TIMEOUT:
            if self.proc.poll() is not None:
                raise Fail(f"QEMU exited ({self.proc.returncode}) before the node served")
            try:
                if http_get(self.rest, "/v1/disks", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.25)
        else:
            raise Fail(f"no answer on /v1/disks within {BOOT_TIMEOUT} s of QEMU's start")
        serving = time.monotonic() - self.t0
        boots = sum(1 for _, line in self.console.lines if "BdsDxe: starting" in line)
        if boots != 1:
            raise Fail(f"the node booted {boots} times before it served (a panic? see the console)")
        return serving

    def power_off(self):
        log("QMP system_powerdown: a clean poweroff")
        qmp(os.path.join(qnode.node_dir(self.name), "qmp.sock"), "system_powerdown")
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise Fail("the node did not power off within 60 s of the power button")
        self.console.thread.join(timeout=5)
        if self.console.first(r"^dosd-init: \[[0-9.]+\] poweroff now") is None:
            raise Fail("QEMU exited without the init's clean poweroff")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def node_view(self):
        _, body = http_get(self.rest, "/v1/node")
        return json.loads(body)


def check_identity(node):
    """The first boot: the init made the node id and kept it on the ESP; /v1/node
    shows it, and the running image's version. Returns /v1/node."""
    v = node.node_view()
    made = node.console.match(r"^dosd-init: \[[0-9.]+\] new node id ([0-9a-f]{16}), kept in /boot/efi/dosd/node-id")
    if made is None:
        raise Fail("the init did not make and keep a node id on the first boot")
    if v["node_id"] != made[1].group(1):
        raise Fail(f"/v1/node says node id {v['node_id']}, the init made {made[1].group(1)}")
    first = node.console.match(r"^dosd-init: \[[0-9.]+\] dosd appliance (\S+) ")
    want = first[1].group(1) if first else None
    boot = v.get("boot") or {}
    if want is None or boot.get("image_version") != want:
        raise Fail(f"/v1/node boot.image_version is {boot.get('image_version')!r}, the image is {want!r}")
    log(f"node id {v['node_id']} (made by the init, kept on the ESP), epoch {v['epoch']}, "
        f"image version {boot['image_version']} from {boot.get('booted_file')}")
    return v


def power_cut(node, bindir, results):
    """CUT_CLIENTS clients store until CUT_AFTER stores are acknowledged (bounded), then QEMU
    is killed mid-workload. Returns [(fingerprint, size)] of the acknowledged ones."""
    acked, failed = [], []
    in_flight = [0]
    lock = threading.Lock()
    stop = threading.Event()
    rng = random.Random(os.urandom(8))

    def client(k):
        i = 0
        while not stop.is_set():
            size = rng.choice(CUT_SIZES)
            path = os.path.join(node.work, f"cut.{k}.{i}")
            with open(path, "wb") as f:
                f.write(os.urandom(size))
            want = md5sum(path)
            with lock:
                in_flight[0] += 1
            r = dosp(bindir, node.dosp, "store", path, timeout=60)
            with lock:
                in_flight[0] -= 1
                if r.returncode == 0 and r.stdout.strip() == want:
                    acked.append((want, size))
                elif not stop.is_set():
                    failed.append(f"{size} bytes: {r.stdout.strip()!r} {r.stderr.strip()}")
            i += 1

    t = time.monotonic()
    clients = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(CUT_CLIENTS)]
    for c in clients:
        c.start()
    deadline = t + 120
    while len(acked) < CUT_AFTER and not failed and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0, 0.3))
    with lock:
        stop.set()
        n_acked, n_flight = len(acked), in_flight[0]
    node.kill()  # SIGKILL: the guest gets no word of it
    results["cut_workload_s"] = time.monotonic() - t
    for c in clients:
        c.join(timeout=90)
    node.console.thread.join(timeout=5)
    if failed:
        raise Fail(f"a store failed before the power cut: {failed[0]}")
    if n_acked < CUT_AFTER:
        raise Fail(f"only {n_acked} stores acknowledged within 120 s")
    log(f"power cut (SIGKILL of QEMU) after {results['cut_workload_s']:.1f} s of stores: "
        f"{n_acked} acknowledged, {n_flight} in flight; {len(acked)} acknowledged in all")
    results["cut_acked"] = len(acked)
    return list(acked)


def check_after_cut(node, bindir, before, acked, results):
    """The reboot after the power cut: same node id, a higher epoch, every
    acknowledged object byte-exact."""
    t = time.monotonic()
    v = node.node_view()
    if v["node_id"] != before["node_id"]:
        raise Fail(f"the node id changed across the power cut: {before['node_id']} -> {v['node_id']}")
    if v["epoch"] <= before["epoch"]:
        raise Fail(f"the epoch went from {before['epoch']} to {v['epoch']} across the reboot")
    if node.console.first(r"new node id") is not None:
        raise Fail("the init made a new node id on the second boot")
    if (v.get("boot") or {}).get("image_version") != before["boot"]["image_version"]:
        raise Fail(f"boot.image_version {v.get('boot')} after the reboot")
    back = os.path.join(node.work, "cut.back")
    for fp, size in acked:
        r = dosp(bindir, node.dosp, "fetch", fp, "-o", back)
        if r.returncode != 0 or md5sum(back) != fp or os.path.getsize(back) != size:
            raise Fail(f"acknowledged object {fp} ({size} bytes) lost or damaged by the power cut: "
                       f"{r.stderr.strip()}")
    results["cut_check_s"] = time.monotonic() - t
    with node.console.lock:
        torn = sum(1 for _, line in node.console.lines if "torn tail: dropping" in line)
    log(f"after the power cut: node id {v['node_id']} kept, epoch {before['epoch']} -> {v['epoch']}, "
        f"all {len(acked)} acknowledged objects fetched byte-exact in {results['cut_check_s']:.1f} s "
        f"(dosd dropped a torn, unacknowledged tail on {torn} disk(s))")


def check_fallback(node, bindir):
    """No IOMMU, boot disk on NVMe: the other drives as file:/dev/nvmeXn1, the boot
    controller left out, the init saying so; one object through it."""
    _, body = http_get(node.rest, "/v1/disks")
    disks = json.loads(body)["disks"]
    for d in disks:
        log(f"disk {d['id']}: {d['backend']} at {d['location']}, {d['state']}")
    if len(disks) != 2 or not all(d["backend"] == "file" and d["location"].startswith("/dev/nvme")
                                  and d["state"] == "online" for d in disks):
        raise Fail("without an IOMMU, want the 2 data drives online as file:/dev/nvme*")
    if node.console.first(r"no IOMMU: NVMe drives are served through the kernel") is None:
        raise Fail("the init did not say that it serves the drives without an IOMMU")
    if node.console.first(r"nvme0 holds the boot drive: not a disk") is None:
        raise Fail("the init did not leave the boot drive's controller out")
    path = os.path.join(node.work, "obj")
    with open(path, "wb") as f:
        f.write(os.urandom((1 << 20) + 3))
    want = md5sum(path)
    r = dosp(bindir, node.dosp, "store", path)
    if r.returncode != 0 or r.stdout.strip() != want:
        raise Fail(f"store through the kernel nvme driver: {r.stdout.strip()!r} {r.stderr.strip()}")
    r = dosp(bindir, node.dosp, "fetch", want, "-o", path + ".back")
    if r.returncode != 0 or md5sum(path + ".back") != want:
        raise Fail(f"fetch through the kernel nvme driver {r.stderr.strip()}")
    log(f"no IOMMU, NVMe boot disk: 2 drives on io_uring, a 1 MiB + 3 object stored and fetched ({want})")


def main():
    results = {}
    t_start = time.monotonic()
    node = None
    ok = False
    try:
        harness.ensure_packages()
        build_and_reproduce(results)
        t = time.monotonic()
        bindir = harness.build_host_tools()
        log(f"host dosp ({bindir}): {time.monotonic() - t:.1f} s")

        node = Node(NAME, ["--disks", str(DISKS), "--disk-size", "512M"], "appliance.log", prepare=keyed)
        serving = node.wait_serving()
        results["serving_s"] = serving
        results["init_s"] = node.console.first(r"^dosd-init: \[[0-9.]+\] dosd appliance")
        results["kernel_s"] = node.console.first(r"EFI stub: Loaded initrd")
        log(f"serving {serving:.1f} s after QEMU started (kernel at {results['kernel_s']:.1f} s, "
            f"/init at {results['init_s']:.1f} s)")
        check_disks(node.rest)
        before = check_identity(node)
        check_objects(bindir, node.dosp, node.work)
        acked = power_cut(node, bindir, results)

        # The same node again after the cut: its boot disk and NVMe disk files.
        node = Node(NAME, ["--disks", str(DISKS), "--disk-size", "512M"], "appliance-after-cut.log", fresh=False)
        results["reboot_serving_s"] = node.wait_serving()
        log(f"serving {results['reboot_serving_s']:.1f} s after QEMU started, after the power cut")
        check_disks(node.rest)
        check_after_cut(node, bindir, before, acked, results)
        node.power_off()

        # The fallback: no IOMMU, the boot disk on NVMe.
        node = Node(NAME + "-f", ["--disks", "2", "--disk-size", "256M", "--no-iommu", "--boot-nvme", "--mem", "512"],
                    "appliance-fallback.log", prepare=keyed)
        results["fallback_serving_s"] = node.wait_serving()
        check_fallback(node, bindir)
        node.power_off()
        ok = True
    except (Fail, harness.HarnessError, subprocess.CalledProcessError) as e:
        log(f"FAIL: {e}")
    finally:
        if node is not None:
            node.kill()
    total = time.monotonic() - t_start
    summary = ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items())
    log(f"{'PASS' if ok else 'FAIL'} in {total:.0f} s ({summary})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
