#!/usr/bin/env python3
"""qemu/cluster: N appliance nodes whose data NICs share one L2 segment.

Usage: qemu/cluster [N] [--fresh] [--disks K] [--disk-size SIZE] [--mem MiB]
                    [--kernel-net LIST] [--keys FILE|new] [--rest-base P] [--dosp-base P]

Node I (1…N) is a qemu/node named clI (files in target/qemu/node-clI/, disks with
serials CLI-NVMEk), booted from its own copy of target/appliance/dosd-appliance.img,
console in target/qemu/cluster-clI.log. Its management NIC is QEMU user networking
with REST on 127.0.0.1:(REST_BASE+I) and DOSP on 127.0.0.1:(DOSP_BASE+I) of the host.
Its data NIC is a tap (dcl-I) that QEMU makes and the rig then moves onto the bridge
dcl-br in the network namespace dosd-cluster; the node's DOSDCONF partition gets an
init.conf (mtools) with data_if = the NIC's MAC and data_addr 10.77.0.(10+I)/24,
and a dosd.toml with node_id = "clI" (its heartbeats name it); data_net=dpdk (the init binds the NIC to vfio-pci and dosd drives it through DPDK)
or, for the nodes in --kernel-net, data_net=kernel.

With --keys FILE (a cluster key file, `ID HEXSECRET` lines; `--keys new` makes one
in target/qemu/cluster.keys) every node gets it as cluster.keys on DOSDCONF and
cluster_key_file in its dosd.toml, so DOSP is signed, and serves signed URLs on its
data NIC (http_listen on port 8080). Clients then need the key:
    ip netns exec dosd-cluster dosp --key-file FILE --node 10.77.0.11:7370 ping

The client endpoint is the bridge's address, 10.77.0.1/24, inside the namespace:
    ip netns exec dosd-cluster dosp --node 10.77.0.11:7370 ping
    ip netns exec dosd-cluster dosp locate MD5 --multicast-if 10.77.0.1
    ip netns exec dosd-cluster dosp watch --multicast-if 10.77.0.1
The namespace has no route anywhere else: nothing leaves the machine.

Ctrl-C or SIGTERM powers every node off (the power button) and removes the namespace.
The same class drives the tests (qemu/appliance_cluster.py): pull a disk (QMP
device_del), cut the power (kill QEMU) and boot again, partition a node (its tap down).
Standard library only.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

QEMU_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(QEMU_DIR)
sys.path.insert(0, QEMU_DIR)
import node as qnode  # noqa: E402

NETNS = "dosd-cluster"
BRIDGE = "dcl-br"
NET = "10.77.0"
CLIENT_IP = f"{NET}.1"
GROUP = "239.255.73.70:7371"
HTTP_PORT = 8080  # signed URLs, on the nodes with a key
IMAGE = os.path.join(ROOT, "target", "appliance", "dosd-appliance.img")
ANSI_RE = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|[()][A-Z0-9]|[A-Za-z])")


class ClusterError(Exception):
    pass


def log(msg):
    print(f"[cluster] {msg}", flush=True)


def sh(*cmd, check=True):
    """Runs a command (no shell); its failure is a ClusterError naming it."""
    r = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and r.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def http_get(port, path, timeout=5):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.status, r.read()


def qmp(sock_path, execute, arguments=None, timeout=10):
    """One QMP command; its reply ({"return": …} or {"error": …})."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        f = s.makefile("rwb")
        f.readline()  # greeting
        cmd = {"execute": execute}
        if arguments:
            cmd["arguments"] = arguments
        for c in ({"execute": "qmp_capabilities"}, cmd):
            f.write(json.dumps(c).encode() + b"\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "return" in msg or "error" in msg:
                    break
        return msg


class Console:
    """QEMU's serial console into a log file, each line remembered with the seconds
    since the node's QEMU started."""

    def __init__(self, proc, path, t0, echo=None):
        self.lines = []
        self.lock = threading.Lock()
        self.t0 = t0
        self.echo = echo
        self.logf = open(path, "a")
        self.thread = threading.Thread(target=self.pump, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def pump(self, stream):
        for raw in iter(stream.readline, b""):
            line = ANSI_RE.sub("", raw.decode("utf-8", "replace")).rstrip("\r\n")
            with self.lock:
                self.lines.append((time.monotonic() - self.t0, line))
            self.logf.write(line + "\n")
            self.logf.flush()
            if self.echo:
                self.echo(line)
        self.logf.close()

    def tail(self, n):
        """The last n lines, each with its seconds since QEMU started."""
        with self.lock:
            return list(self.lines[-n:])

    def grep(self, pattern):
        """The lines matching a regular expression."""
        rx = re.compile(pattern)
        with self.lock:
            return [line for _, line in self.lines if rx.search(line)]


class Node:
    """Node I of the cluster: its QEMU, console, ports and addresses."""

    def __init__(self, i, rest, dosp, kernel_net, disks, disk_size, mem, image, keys=None):
        self.i = i
        self.keys = keys
        self.name = f"cl{i}"
        self.addr = f"{NET}.{10 + i}"
        self.mac = f"52:54:00:d0:da:{i:02x}"
        self.tap = f"dcl-{i}"
        self.rest = rest
        self.dosp_port = dosp
        self.data_net = "kernel" if kernel_net else "dpdk"
        # Signed URLs, on the data NIC (DPDK or kernel), where the node has the key.
        self.http = f"{self.addr}:{HTTP_PORT}" if keys else None
        self.disks = disks
        self.disk_size = disk_size
        self.mem = mem
        self.image = image
        self.dir = qnode.node_dir(self.name)
        self.proc = None
        self.console = None
        self.boots = 0

    def serial(self, k):
        return qnode.serial(self.name, k)

    def qmp(self, execute, arguments=None):
        return qmp(os.path.join(self.dir, "qmp.sock"), execute, arguments)

    def configure(self):
        """This node's init.conf (the data NIC) and dosd.toml (its name as node id)
        onto its boot disk's DOSDCONF partition, as an operator would with mtools."""
        toml = f'# qemu/cluster node {self.i}\nnode_id = "{self.name}"\n'
        files = {}
        if self.keys:
            files = qnode.keyed(self.keys)
            toml += files["dosd.toml"]
        if self.http:
            toml += f'http_listen = "0.0.0.0:{HTTP_PORT}"\n'
        files["dosd.toml"] = toml
        files["init.conf"] = (f"# qemu/cluster node {self.i}: the data NIC on the cluster's segment\n"
                              f"data_if={self.mac}\ndata_addr={self.addr}/24\ndata_net={self.data_net}\n")
        try:
            qnode.configure(os.path.join(self.dir, "boot.img"), files)
        except OSError as e:
            raise ClusterError(str(e)) from e

    def start(self, fresh=False, echo=None):
        """Starts QEMU (a fresh copy of the image and blank disks with fresh) and puts
        its tap on the bridge."""
        args = ["--name", self.name, "--image", self.image, "--disks", str(self.disks),
                "--disk-size", self.disk_size, "--mem", str(self.mem),
                "--rest-port", str(self.rest), "--dosp-port", str(self.dosp_port),
                "--data-tap", self.tap, "--data-mac", self.mac]
        if fresh:
            args.append("--fresh")
        cmd = qnode.command(qnode.parser().parse_args(args))  # makes the node's files
        if fresh or not os.path.exists(os.path.join(self.dir, "init.conf")):
            self.configure()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.console = Console(self.proc, os.path.join(ROOT, "target", "qemu", f"cluster-{self.name}.log"),
                               self.t0, echo)
        self.boots += 1
        # QEMU makes the tap in our namespace at start-up; move it onto the bridge.
        deadline = time.monotonic() + 20
        while sh("ip", "link", "show", self.tap, check=False).returncode != 0:
            if self.proc.poll() is not None:
                self.console.thread.join(timeout=5)
                last = self.console.lines[-1][1] if self.console.lines else ""
                raise ClusterError(f"{self.name}: QEMU exited ({self.proc.returncode}) before it made "
                                   f"{self.tap}: {last}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.name}: QEMU made no tap {self.tap} in 20 s")
            time.sleep(0.05)
        sh("ip", "link", "set", self.tap, "netns", NETNS)
        sh("ip", "netns", "exec", NETNS, "sysctl", "-qw", f"net.ipv6.conf.{self.tap}.disable_ipv6=1")
        sh("ip", "-n", NETNS, "link", "set", self.tap, "master", BRIDGE, "up")

    def wait_serving(self, timeout=300):
        """Seconds from QEMU's start until GET /v1/disks answers."""
        while time.monotonic() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise ClusterError(f"{self.name}: QEMU exited ({self.proc.returncode}) before the node served")
            try:
                if http_get(self.rest, "/v1/disks", timeout=2)[0] == 200:
                    return time.monotonic() - self.t0
            except OSError:
                pass
            time.sleep(0.25)
        raise ClusterError(f"{self.name}: no answer on /v1/disks within {timeout} s of QEMU's start")

    def get(self, path):
        return json.loads(http_get(self.rest, path)[1])

    def pull_disk(self, k):
        """Surprise-removes NVMe controller k (QMP device_del; the guest's pciehp does
        the rest)."""
        reply = self.qmp("device_del", {"id": f"nvme{k}"})
        if "error" in reply:
            raise ClusterError(f"{self.name}: device_del nvme{k}: {reply['error']}")

    def power_cut(self):
        """Pulls the plug: QEMU killed, nothing flushed by the guest."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.console:
            self.console.thread.join(timeout=5)

    def set_link(self, up):
        """Partitions the node from the segment (its tap down) or heals it."""
        sh("ip", "-n", NETNS, "link", "set", self.tap, "up" if up else "down")

    def power_off(self, timeout=60):
        """The power button; True if the init powered off cleanly in time."""
        if not self.proc or self.proc.poll() is not None:
            return True
        try:
            self.qmp("system_powerdown")
            self.proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.power_cut()
            return False
        self.console.thread.join(timeout=5)
        return bool(self.console.grep(r"^dosd-init: \[[0-9.]+\] poweroff now"))


def netns_up():
    """The namespace with the bridge and the client endpoint (made afresh)."""
    if sh("ip", "netns", "pids", NETNS, check=False).stdout.strip():
        raise ClusterError(f"network namespace {NETNS} has processes in it: is another qemu/cluster running?")
    sh("ip", "netns", "del", NETNS, check=False)
    sh("ip", "netns", "add", NETNS)
    sh("ip", "-n", NETNS, "link", "set", "lo", "up")
    sh("ip", "-n", NETNS, "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0")
    sh("ip", "netns", "exec", NETNS, "sysctl", "-qw", f"net.ipv6.conf.{BRIDGE}.disable_ipv6=1")
    sh("ip", "-n", NETNS, "addr", "add", f"{CLIENT_IP}/24", "dev", BRIDGE)
    sh("ip", "-n", NETNS, "link", "set", BRIDGE, "up")
    # Multicast from the client leaves by the bridge (no default route here).
    sh("ip", "-n", NETNS, "route", "add", "224.0.0.0/4", "dev", BRIDGE)


def netns_down():
    sh("ip", "netns", "del", NETNS, check=False)


class Cluster:
    def __init__(self, n, disks=3, disk_size="1G", mem=1024, kernel_net=(), rest_base=7380,
                 dosp_base=17370, image=IMAGE, ports=None, keys=None):
        """ports, if given: a list of (rest, dosp) host ports per node; keys, if given: the
        path of the cluster key file every node gets."""
        if not 1 <= n <= 9:
            raise ClusterError("a cluster of 1 to 9 nodes")
        if not os.path.exists(image):
            raise ClusterError(f"no image {image} (run image/build)")
        self.nodes = []
        for i in range(1, n + 1):
            rest, dosp = ports[i - 1] if ports else (rest_base + i, dosp_base + i)
            self.nodes.append(Node(i, rest, dosp, i in kernel_net, disks, disk_size, mem, image, keys))

    def start(self, fresh=False, echo=None):
        netns_up()
        for node in self.nodes:
            node.start(fresh, echo)

    def wait_serving(self, timeout=300, report=None):
        """Seconds from each node's QEMU start until it served; report(node, t) is
        called as each one does."""
        times = []
        for node in self.nodes:
            times.append(node.wait_serving(timeout))
            if report:
                report(node, times[-1])
        return times

    def run(self, *cmd, timeout=120, **kw):
        """A command at the client endpoint (inside the namespace)."""
        return subprocess.run(["timeout", str(timeout), "ip", "netns", "exec", NETNS] + list(cmd),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)

    def popen(self, *cmd, **kw):
        return subprocess.Popen(["ip", "netns", "exec", NETNS] + list(cmd), **kw)

    def stop(self):
        """Every node powered off (in parallel), the namespace removed; the nodes that
        did not power off cleanly."""
        unclean = []
        threads = []
        for node in self.nodes:
            def off(node=node):
                if not node.power_off():
                    unclean.append(node.name)
            t = threading.Thread(target=off)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        netns_down()
        return unclean

    def kill(self):
        for node in self.nodes:
            node.power_cut()
        netns_down()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="qemu/cluster", description="Boots N dosd appliance nodes on one L2 segment.")
    ap.add_argument("n", nargs="?", type=int, default=3, help="nodes (3)")
    ap.add_argument("--fresh", action="store_true", help="new copies of the image and blank disks")
    ap.add_argument("--disks", type=int, default=2, help="NVMe disks per node (2)")
    ap.add_argument("--disk-size", default="512M", help="size of each disk (512M)")
    ap.add_argument("--mem", type=int, default=1024, help="guest memory per node in MiB (1024)")
    ap.add_argument("--kernel-net", default="", metavar="LIST",
                    help="nodes (e.g. 2,3) whose data NIC stays on the kernel's driver (default: all on DPDK)")
    ap.add_argument("--keys", metavar="FILE|new",
                    help="a cluster key file for every node (new: make one in target/qemu/cluster.keys)")
    ap.add_argument("--rest-base", type=int, default=7380, help="node I's REST on 127.0.0.1:REST_BASE+I (7380)")
    ap.add_argument("--dosp-base", type=int, default=17370,
                    help="node I's DOSP through its management NIC on 127.0.0.1:DOSP_BASE+I (17370)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("qemu/cluster: needs root (a network namespace, taps, a bridge)")
    try:
        kernel_net = {int(x) for x in args.kernel_net.split(",") if x.strip()}
    except ValueError:
        sys.exit(f"qemu/cluster: --kernel-net: node numbers separated by commas, not {args.kernel_net!r}")
    if not shutil.which("qemu-system-x86_64"):
        sys.exit("qemu/cluster: no qemu-system-x86_64 (apt-get install qemu-system-x86 ovmf mtools)")
    try:
        keys = args.keys
        if keys == "new":
            keys = qnode.new_key_file(os.path.join(ROOT, "target", "qemu", "cluster.keys"))
            log(f"cluster key file {keys}")
        cluster = Cluster(args.n, args.disks, args.disk_size, args.mem, kernel_net, args.rest_base, args.dosp_base,
                          keys=keys)
    except ClusterError as e:
        sys.exit(f"qemu/cluster: {e}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        cluster.start(args.fresh)
        for node, t in zip(cluster.nodes, cluster.wait_serving()):
            log(f"{node.name}: serving after {t:.1f} s; data {node.addr}:7370 ({node.data_net}), "
                f"REST 127.0.0.1:{node.rest}, console target/qemu/cluster-{node.name}.log")
        log(f"client endpoint {CLIENT_IP} in network namespace {NETNS}, e.g.:")
        kf = f"--key-file {keys} " if keys else ""
        log(f"  ip netns exec {NETNS} dosp {kf}--node {cluster.nodes[0].addr}:7370 ping")
        log(f"  ip netns exec {NETNS} dosp {kf}watch --multicast-if {CLIENT_IP}")
        log("Ctrl-C powers every node off")
        gone = set()
        while not stop.is_set() and len(gone) < len(cluster.nodes):
            for node in cluster.nodes:
                if node.name not in gone and node.proc.poll() is not None:
                    gone.add(node.name)
                    log(f"{node.name}: QEMU exited ({node.proc.returncode}); see target/qemu/cluster-{node.name}.log")
            stop.wait(1)
    except KeyboardInterrupt:
        pass
    except ClusterError as e:
        log(f"error: {e}")
        cluster.kill()
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log("powering every node off")
    unclean = cluster.stop()
    if unclean:
        log(f"did not power off cleanly: {', '.join(unclean)}")
    return 1 if unclean else 0


if __name__ == "__main__":
    sys.exit(main())
