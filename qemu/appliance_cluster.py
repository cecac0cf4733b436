#!/usr/bin/env python3
"""qemu/test appliance-cluster: three appliance nodes on one L2 segment (qemu/cluster).

Nodes cl1 and cl2 serve DOSP through DPDK on their data NIC (vfio-pci), cl3 through
the kernel's virtio-net driver; each has 2 NVMe disks on dosd's own driver. The client
is the host's dosp at the cluster's client endpoint (10.77.0.1, inside the rig's
network namespace), every object checked against hashlib's MD5.

Every node has the cluster's key (cluster.keys on DOSDCONF), so all DOSP is signed:
the client, `dosp locate` and `dosp watch` sign with it and drop what is not signed.

1. The cluster boots (all three QEMUs at once); time until each serves.
2. One object stored on each node and fetched back from it.
3. Multicast LOCATE from the client finds each object's holder, and only the holder
   answers; an object nobody holds gets no answer.
4. `dosp watch` (started before the stores) heard heartbeats from all three nodes,
   each with its data address and the node id its /v1/node reports.
5. A partition: cl1's link down, its heartbeats stop while the others' go on; the
   link up again, cl1 serves again.
6. A pulled disk under a workload: while a client stores and fetches on cl2, QMP
   device_del of cl2's second NVMe controller. That disk goes down in /v1/disks,
   /v1/health turns degraded (disk_down), the client's `dosp watch` hears cl2's
   disk-down announcement, objects on the other disk still fetch byte-exact, new
   stores succeed, and dosd was never restarted.
7. Keys: on every node an unsigned STORE and a STORE signed with a foreign key are
   refused (AUTH_FAILED), store nothing and are counted by reason in /metrics; an
   unsigned LOCATE to the group gets no answer. Every node serves signed URLs on its
   data NIC (cl1 and cl2 through DPDK): curl at the client endpoint fetches an object
   whole and a range (checked against MD5); a tampered URL gets 403.
8. Every node powers off cleanly (the power button).

Every wait is bounded. Consoles in target/qemu/cluster-clI.log. Standard library only.
"""

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time

QEMU_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(QEMU_DIR)
sys.path.insert(0, QEMU_DIR)
import cluster as qcluster  # noqa: E402
import harness  # noqa: E402
import node as qnode  # noqa: E402

BOOT_TIMEOUT = 420  # three TCG guests on a 2-core host at once
WORK = os.path.join(ROOT, "target", "qemu", "cluster-objects")


class Fail(Exception):
    pass


def log(msg):
    print(f"[appliance-cluster] {msg}", flush=True)


def free_port(taken):
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


class Client:
    """The host's dosp at the client endpoint."""

    def __init__(self, cluster, bindir, keys):
        self.cluster = cluster
        self.dosp_bin = os.path.join(bindir, "dosp")
        self.keys = keys

    def dosp(self, node, *args, timeout=60, keys=True):
        """dosp against one node; keys: sign with the cluster's key (True), with another
        key file (its path) or not at all (None)."""
        auth = ["--key-file", self.keys if keys is True else keys] if keys else []
        return self.cluster.run(self.dosp_bin, *auth, "--node", f"{node.addr}:7370", "--timeout", "20", *args,
                                timeout=timeout)

    def store(self, node, data, name):
        path = os.path.join(WORK, name)
        with open(path, "wb") as f:
            f.write(data)
        want = hashlib.md5(data).hexdigest()
        r = self.dosp(node, "store", path)
        if r.returncode != 0 or r.stdout.strip() != want:
            raise Fail(f"store of {len(data)} bytes on {node.name}: {r.stdout.strip()!r} (md5 {want}) "
                       f"{r.stderr.strip()}")
        return want

    def fetch_ok(self, node, fp):
        """True if the object fetches from the node with exactly its MD5."""
        out = os.path.join(WORK, f"back.{fp}")
        r = self.dosp(node, "fetch", fp, "-o", out)
        if r.returncode != 0:
            return False
        with open(out, "rb") as f:
            return hashlib.md5(f.read()).hexdigest() == fp

    def locate(self, fp, signed=True):
        """The holders' lines of `dosp locate`: (addr, line)."""
        auth = ["--key-file", self.keys] if signed else []
        r = self.cluster.run(self.dosp_bin, *auth, "locate", fp, "--multicast-if", qcluster.CLIENT_IP,
                             "--wait-ms", "2000", timeout=30)
        if r.returncode not in (0, 3):
            raise Fail(f"dosp locate {fp}: exit {r.returncode}: {r.stderr.strip()}")
        lines = [line for line in r.stdout.splitlines() if line.strip()]
        return [(re.search(r" addr (\S+):\d+ ", line).group(1), line) for line in lines]


class Watch:
    """`dosp watch` at the client endpoint, its lines kept with their arrival times."""

    def __init__(self, cluster, bindir, seconds, keys):
        self.proc = cluster.popen(os.path.join(bindir, "dosp"), "--key-file", keys, "watch",
                                  "--multicast-if", qcluster.CLIENT_IP,
                                  "--seconds", str(seconds), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True)
        self.lines = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.pump, daemon=True)
        self.thread.start()

    def pump(self):
        with open(os.path.join(ROOT, "target", "qemu", "cluster-watch.log"), "w") as logf:
            for line in self.proc.stdout:
                with self.lock:
                    self.lines.append((time.monotonic(), line.rstrip("\n")))
                logf.write(line)
                logf.flush()

    def since(self, t, pattern):
        rx = re.compile(pattern)
        with self.lock:
            return [line for at, line in self.lines if at >= t and rx.search(line)]

    def wait(self, t, pattern, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.since(t, pattern)
            if got:
                return got
            time.sleep(0.2)
        return []

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def check_placement(client, cluster, watch, t_watch):
    """Steps 2-4: an object per node, LOCATE finds only its holder, heartbeats from all."""
    ids = {}
    for node in cluster.nodes:
        view = node.get("/v1/node")
        ids[node.name] = view["node_id"]
    log(f"node ids: {ids}")
    placed = []
    for node, size in zip(cluster.nodes, (1024, (1 << 20) + 1, 100_000)):
        fp = client.store(node, os.urandom(size), f"placed.{node.name}")
        if not client.fetch_ok(node, fp):
            raise Fail(f"{fp} ({size} bytes) stored on {node.name} does not fetch back byte-exact")
        placed.append((node, fp))
        log(f"{node.name}: {size} bytes stored and fetched back, md5 {fp}")
    for node, fp in placed:
        holders = client.locate(fp)
        addrs = sorted(a for a, _ in holders)
        if addrs != [node.addr]:
            raise Fail(f"LOCATE {fp} (held by {node.name} at {node.addr}) was answered by {addrs}: {holders}")
        if ids[node.name] not in holders[0][1]:
            raise Fail(f"LOCATE {fp}: the answer names another node id than {node.name}'s {ids[node.name]}")
        log(f"LOCATE {fp}: only {node.name} ({node.addr}) answered")
    nobody = hashlib.md5(b"held by nobody " + os.urandom(8)).hexdigest()
    if client.locate(nobody):
        raise Fail(f"LOCATE of {nobody}, held by nobody, got answers")
    log(f"LOCATE {nobody} (held by nobody): no answer")
    for node in cluster.nodes:
        got = watch.wait(t_watch, rf"^heartbeat node {ids[node.name]} name {node.name} .* "
                                  rf"addr {re.escape(node.addr)}:7370 ", 15)
        if not got:
            raise Fail(f"dosp watch heard no heartbeat of {node.name} ({ids[node.name]} at {node.addr})")
    log("dosp watch: heartbeats from all three nodes, each with its id, name and data address")
    return ids


def auth_failed(node):
    """dosd_auth_failed_total by reason, from the node's /metrics."""
    text = qcluster.http_get(node.rest, "/metrics")[1].decode()
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r'^dosd_auth_failed_total\{reason="(\w+)"\} (\d+)$', text, re.M)}


def check_keys(client, cluster, ids):
    """Step 7: unsigned and foreign-signed requests refused and counted on every node
    (over DPDK and over the kernel), the group deaf to an unsigned LOCATE, and signed
    URLs on the node that serves HTTP."""
    foreign = qnode.new_key_file(os.path.join(WORK, "foreign.keys"), key_id="intruder")
    for node in cluster.nodes:
        before = auth_failed(node)
        data = os.urandom(3000)
        fp = hashlib.md5(data).hexdigest()
        path = os.path.join(WORK, f"unsigned.{node.name}")
        with open(path, "wb") as f:
            f.write(data)
        for keys, reason in ((None, "unsigned"), (foreign, "unknown_key")):
            r = client.dosp(node, "store", path, keys=keys)
            if r.returncode == 0 or "AUTH_FAILED" not in r.stderr:
                raise Fail(f"{node.name}: a {reason} STORE was not refused with AUTH_FAILED: "
                           f"exit {r.returncode} {r.stdout.strip()} {r.stderr.strip()}")
        if client.locate(fp):
            raise Fail(f"{node.name}: a refused STORE of {fp} left an object somebody holds")
        after = auth_failed(node)
        for reason in ("unsigned", "unknown_key"):
            if after.get(reason, 0) < before.get(reason, 0) + 1:
                raise Fail(f"{node.name}: dosd_auth_failed_total{{reason={reason!r}}} {before.get(reason)} -> "
                           f"{after.get(reason)} after a {reason} STORE")
        log(f"{node.name} ({node.data_net}): unsigned and foreign-key STOREs refused (AUTH_FAILED), "
            f"nothing stored, counted {after}")
    held = client.store(cluster.nodes[0], os.urandom(5000), "held.cl1")
    if client.locate(held, signed=False):
        raise Fail(f"an unsigned LOCATE of {held} (held by cl1) got an answer")
    if not client.locate(held):
        raise Fail(f"a signed LOCATE of {held} (held by cl1) got no answer")
    log("an unsigned LOCATE to the group: no answer; signed: cl1 answers")
    for node in cluster.nodes:
        if node.http:
            check_signed_urls(client, cluster, node)


def check_signed_urls(client, cluster, node):
    """Signed URLs from the client endpoint with curl: whole, a range, tampered, over
    the node's data NIC (through DPDK on cl1 and cl2)."""
    data = os.urandom((1 << 20) + 12345)
    fp = client.store(node, data, f"url.{node.name}")
    r = cluster.run(client.dosp_bin, "--key-file", client.keys, "url", fp, "--ttl", "120",
                    "--name", "photo.jpg", "--base", f"http://{node.http}", timeout=30)
    if r.returncode != 0:
        raise Fail(f"dosp url: {r.stderr.strip()}")
    url = r.stdout.strip()
    out = os.path.join(WORK, "url.whole")

    def curl(*args):
        return cluster.run("curl", "-sS", "--noproxy", "*", "--max-time", "30", "-o", out, "-w", "%{http_code}", *args, timeout=40)

    r = curl(url)
    with open(out, "rb") as f:
        got = f.read()
    if r.stdout != "200" or hashlib.md5(got).hexdigest() != fp:
        raise Fail(f"GET {url}: status {r.stdout} {r.stderr.strip()}, {len(got)} bytes, md5 "
                   f"{hashlib.md5(got).hexdigest()} (want 200, {fp})")
    r = curl("-r", "1000-70999", url)
    with open(out, "rb") as f:
        got = f.read()
    if r.stdout != "206" or got != data[1000:71000]:
        raise Fail(f"GET {url} bytes 1000-70999: status {r.stdout}, {len(got)} bytes (want 206, the 70000 bytes)")
    parts = url.split("/")
    sig = parts[-2]
    parts[-2] = ("A" if sig[0] != "A" else "B") + sig[1:]
    r = curl("/".join(parts))
    if r.stdout != "403":
        raise Fail(f"a tampered URL got {r.stdout} (want 403)")
    log(f"{node.name} ({node.data_net}): signed URL {url[:60]}… fetched whole (md5 {fp}) and a range "
        f"(206) with curl; tampered: 403")


def check_partition(client, cluster, watch, ids):
    """Step 5: cl1 cut off the segment and back."""
    node = cluster.nodes[0]
    others = cluster.nodes[1:]
    node.set_link(False)
    time.sleep(1.5)  # a heartbeat on its way when the link went down
    t = time.monotonic()
    time.sleep(6)
    heard = watch.since(t, rf"^heartbeat node {ids[node.name]} ")
    if heard:
        raise Fail(f"heartbeats of {node.name} heard while its link was down: {heard[:2]}")
    for other in others:
        if not watch.since(t, rf"^heartbeat node {ids[other.name]} "):
            raise Fail(f"no heartbeat of {other.name} while {node.name} was partitioned")
    if client.dosp(node, "ping", timeout=15).returncode == 0:
        raise Fail(f"{node.name} answered a ping while its link was down")
    node.set_link(True)
    t = time.monotonic()
    if not watch.wait(t, rf"^heartbeat node {ids[node.name]} ", 15):
        raise Fail(f"no heartbeat of {node.name} within 15 s of its link coming back")
    r = client.dosp(node, "ping")
    if r.returncode != 0:
        raise Fail(f"{node.name} does not answer after its link came back: {r.stderr.strip()}")
    log(f"partition: {node.name}'s heartbeats stopped for 6 s while the others' went on; back, it serves")


def check_pulled_disk(client, cluster, watch, ids):
    """Step 6: cl2's second NVMe controller pulled under a workload."""
    node = cluster.nodes[1]
    pulled = node.serial(2)
    before = {d["location"].split(" serial ", 1)[-1].split("@")[0]: d for d in node.get("/v1/disks")["disks"]}
    if sorted(before) != sorted(node.serial(k) for k in (1, 2)):
        raise Fail(f"{node.name} lists disks {sorted(before)}")
    pulled_id = before[pulled]["id"]
    kept_id = before[node.serial(1)]["id"]
    acked = []  # (fingerprint, monotonic time of the acknowledgement)
    errors = []
    stop = threading.Event()

    def workload():
        k = 0
        while not stop.is_set() and k < 400:
            data = os.urandom(4096 + 977 * (k % 50))
            try:
                fp = client.store(node, data, f"work.{k}")
                acked.append((fp, time.monotonic()))
            except Fail as e:
                errors.append((time.monotonic(), str(e)))
            if acked and not client.fetch_ok(node, acked[-1][0]):
                errors.append((time.monotonic(), f"fetch of just-stored {acked[-1][0]} failed"))
            k += 1

    worker = threading.Thread(target=workload)
    worker.start()
    deadline = time.monotonic() + 60
    while len(acked) < 10 and time.monotonic() < deadline and worker.is_alive():
        time.sleep(0.2)
    if len(acked) < 10:
        stop.set()
        worker.join()
        raise Fail(f"the workload on {node.name} got only {len(acked)} stores acknowledged in 60 s: {errors[:3]}")
    t_pull = time.monotonic()
    node.pull_disk(2)
    log(f"QMP device_del nvme2 ({pulled}, disk {pulled_id}) on {node.name} after {len(acked)} stores")
    announce = watch.wait(t_pull, rf"^announce node {ids[node.name]} .* disk-down disk {pulled_id} ", 30)
    time.sleep(3)
    t_after = time.monotonic()
    n_before = len(acked)
    deadline = time.monotonic() + 60
    while len(acked) < n_before + 10 and time.monotonic() < deadline and worker.is_alive():
        time.sleep(0.2)
    stop.set()
    worker.join()
    if not announce:
        raise Fail(f"dosp watch heard no disk-down announcement of {node.name} disk {pulled_id} within 30 s")
    log(f"dosp watch: {announce[0]}")
    disks = {d["id"]: d for d in node.get("/v1/disks")["disks"]}
    if disks[pulled_id]["state"] != "down" or disks[kept_id]["state"] != "online":
        raise Fail(f"after the pull: disk {pulled_id} {disks[pulled_id]['state']}, "
                   f"disk {kept_id} {disks[kept_id]['state']} (want down, online)")
    health = node.get("/v1/health")
    if health["status"] != "degraded" or not any(r.get("kind") == "disk_down" for r in health["reasons"]):
        raise Fail(f"/v1/health after the pull: {health}")
    late = [e for at, e in errors if at >= t_after]
    if late:
        raise Fail(f"{len(late)} workload errors from 3 s after the pull: {late[:3]}")
    stored_after = [fp for fp, at in acked if at >= t_after]
    if len(stored_after) < 10:
        raise Fail(f"only {len(stored_after)} stores acknowledged after the pull")
    # Objects on the disk that stayed must all fetch; list where each one is.
    r = client.dosp(node, "contents")
    if r.returncode != 0:
        raise Fail(f"dosp contents on {node.name}: {r.stderr.strip()}")
    where = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            where[parts[0]] = parts[1]
    kept = [fp for fp, _ in acked if where.get(fp) == str(kept_id)]
    bad = [fp for fp in kept if not client.fetch_ok(node, fp)]
    if bad:
        raise Fail(f"{len(bad)} of {len(kept)} objects on the remaining disk do not fetch: {bad[:3]}")
    restarts = node.console.grep(r"dosd exited with")
    if restarts or len(node.console.grep(r"starting dosd")) != 1:
        raise Fail(f"dosd on {node.name} was restarted: {restarts[:2]}")
    for at, e in errors:
        log(f"failed around the pull (+{at - t_pull:.1f} s; a store so failed was not acknowledged): {e[:160]}")
    log(f"pulled disk: {pulled} down, health degraded ({health['reasons'][0]['message']}); "
        f"{len(stored_after)} stores after the pull, all {len(kept)} objects on disk {kept_id} fetch byte-exact; "
        f"{len([e for at, e in errors if at < t_after])} requests failed around the pull; no restart")


def main():
    t_start = time.monotonic()
    results = {}
    cluster = None
    watch = None
    ok = False
    try:
        harness.ensure_packages()
        subprocess.run([os.path.join(ROOT, "image", "build")], check=True)
        bindir = harness.build_host_tools()
        os.makedirs(WORK, exist_ok=True)
        taken = set()
        ports = [(free_port(taken), free_port(taken)) for _ in range(3)]
        keys = qnode.new_key_file(os.path.join(WORK, "cluster.keys"))
        cluster = qcluster.Cluster(3, disks=2, disk_size="256M", mem=1024, kernel_net={3}, ports=ports, keys=keys)
        cluster.start(fresh=True)
        t_boot = time.monotonic()
        def served(node, t):
            log(f"{node.name}: serving {t:.1f} s after its QEMU started ({node.data_net} data NIC at {node.addr})")
            results[f"{node.name}_serving_s"] = t

        cluster.wait_serving(BOOT_TIMEOUT, served)
        for node in cluster.nodes:
            if node.data_net == "dpdk" and not node.console.grep(r"DOSP through DPDK at"):
                raise Fail(f"{node.name}'s init did not put the data NIC on DPDK")
        client = Client(cluster, bindir, keys)
        for node in cluster.nodes:
            deadline = time.monotonic() + 60
            while client.dosp(node, "ping", timeout=25).returncode != 0:
                if time.monotonic() > deadline:
                    raise Fail(f"{node.name} does not answer DOSP at {node.addr}:7370 from the client")
                time.sleep(1)
        results["all_serving_s"] = time.monotonic() - t_boot
        t_watch = time.monotonic()
        watch = Watch(cluster, bindir, 900, keys)
        ids = check_placement(client, cluster, watch, t_watch)
        check_keys(client, cluster, ids)
        check_partition(client, cluster, watch, ids)
        check_pulled_disk(client, cluster, watch, ids)
        watch.stop()
        watch = None
        unclean = cluster.stop()
        cluster = None
        if unclean:
            raise Fail(f"did not power off cleanly: {unclean}")
        log("every node powered off cleanly")
        ok = True
    except (Fail, qcluster.ClusterError, harness.HarnessError, subprocess.CalledProcessError, OSError) as e:
        log(f"FAIL: {e}")
        if cluster is not None:
            # CI keeps only this output: each node's last console lines say why.
            for node in cluster.nodes:
                if node.console is None:
                    continue
                log(f"{node.name}: the last lines of its console (all in target/qemu/cluster-{node.name}.log):")
                for t, line in node.console.tail(40):
                    print(f"[{node.name} {t:6.1f}] {line}", flush=True)
    finally:
        if watch is not None:
            watch.stop()
        if cluster is not None:
            cluster.kill()
    total = time.monotonic() - t_start
    summary = ", ".join(f"{k}={v:.1f}" for k, v in results.items())
    log(f"{'PASS' if ok else 'FAIL'} in {total:.0f} s ({summary})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
