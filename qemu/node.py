#!/usr/bin/env python3
"""qemu/node: boots the dosd appliance image under OVMF (TCG) as one node.

Usage: qemu/node [--name NAME] [--disks N] [--disk-size SIZE] [--rest-port P]
                 [--dosp-port P] [--mem MiB] [--smp N] [--fresh] [--no-iommu]
                 [--image IMG] [--data-tap TAP [--data-mac MAC]]

The node's files live in target/qemu/node-NAME/: its boot disk (a copy of the image,
made when missing or with --fresh; it is the node's own from then on: updates and boot
counting change it), its NVMe disks nvmeK.img (sparse; serial NAME-NVMEK, upper case),
its OVMF variables and a QMP socket qmp.sock. The boot disk is virtio-blk; each NVMe
controller sits behind its own pcie-root-port (hot-unpluggable), after an emulated
IOMMU (intel-iommu) unless --no-iommu. The management NIC is virtio-net on QEMU's user
networking (restrict=on: it reaches nothing outside), with the guest's REST (7380) and
DOSP (7370) ports forwarded from 127.0.0.1:REST_PORT and 127.0.0.1:DOSP_PORT only.
With --data-tap, a data NIC too: virtio-net (modern-only, with VIRTIO_F_ACCESS_PLATFORM,
alone behind its own pcie-root-port, so the init can hand it to DPDK through vfio-pci)
on a tap QEMU makes in the current network namespace (qemu/cluster moves it onto the
cluster's bridge); the guest finds it by --data-mac (init.conf data_if=).
The serial console is stdio (Ctrl-A X quits QEMU). Standard library only.
"""

import argparse
import os
import shutil
import subprocess
import sys

QEMU_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(QEMU_DIR)
sys.path.insert(0, QEMU_DIR)
sys.path.insert(0, os.path.join(ROOT, "image"))
import build as ibuild  # noqa: E402  (image/build.py: the partition layout)
from harness import parse_size  # noqa: E402

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
GUEST_IP = "10.0.2.15"  # QEMU user networking's first DHCP address
DATA_CHASSIS = 64  # the data NIC's root port (the NVMe disks' are 1..N)
DATA_MAC = "52:54:00:d0:da:01"


def node_dir(name):
    return os.path.join(ROOT, "target", "qemu", f"node-{name}")


def configure(boot, files):
    """Writes files onto the DOSDCONF partition of the boot disk `boot`, as an operator
    would with mtools while the node is off. files: {name: text}; the text of a file
    the image ships (image/dosd.toml, image/init.conf) is appended to the shipped one.
    Each file is also left, readable by its owner alone, beside the boot disk."""
    conf = f"{boot}@@{ibuild.CONF_START * ibuild.SECTOR}"
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    for name, text in files.items():
        shipped = os.path.join(ibuild.IMAGE_DIR, name)
        if os.path.exists(shipped):
            with open(shipped) as f:
                text = f.read() + text
        path = os.path.join(os.path.dirname(boot), name)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(text)
        r = subprocess.run(["mcopy", "-o", "-i", conf, path, "::" + name], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise OSError(f"mcopy {name} onto {boot}: {r.stdout.strip()}")


def new_key_file(path, key_id="cluster1"):
    """A fresh cluster key file (one 32-byte key), readable by its owner alone."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(f"# a qemu test's key\n{key_id} {os.urandom(32).hex()}\n")
    os.chmod(path, 0o600)
    return path


def keyed(keys):
    """DOSDCONF files that give a node the cluster key file `keys`: {name: text} for
    configure()."""
    with open(keys) as f:
        return {"cluster.keys": f.read(), "dosd.toml": 'cluster_key_file = "/conf/cluster.keys"\n'}


def serial(name, k):
    return f"{name.upper()}-NVME{k}"[-20:]


def command(args):
    d = node_dir(args.name)
    boot = os.path.join(d, "boot.img")
    if args.fresh:
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d, exist_ok=True)
    if not os.path.exists(boot):
        if not os.path.exists(args.image):
            sys.exit(f"qemu/node: no image {args.image} (run image/build)")
        shutil.copyfile(args.image, boot)
    vars_ = os.path.join(d, "OVMF_VARS.fd")
    if not os.path.exists(vars_):
        shutil.copyfile(OVMF_VARS, vars_)
    cmd = [
        "qemu-system-x86_64",
        "-name", f"dosd-{args.name}",
        "-machine", "q35,kernel-irqchip=split",
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", str(args.smp),
        "-m", str(args.mem),
        "-nographic",
        "-nodefaults",
        "-serial", "mon:stdio",  # Ctrl-A X quits, Ctrl-A C the monitor
        "-qmp", f"unix:{os.path.join(d, 'qmp.sock')},server=on,wait=off",
        # A hardware watchdog (the init arms it; a hung guest is reset).
        "-device", "i6300esb",
        "-action", "watchdog=reset",
    ]
    if not args.no_iommu:
        cmd += ["-device", "intel-iommu,intremap=on,caching-mode=on"]
    cmd += [
        "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,file={vars_}",
        "-drive", f"file={boot},if=none,id=boot,format=raw",
    ]
    if args.boot_nvme:
        # The boot disk on an NVMe controller of its own (serial NAME-BOOT): the init
        # must leave it out of dosd's disks.
        cmd += ["-device", f"nvme,id=bootnvme,serial={args.name.upper()}-BOOT,"
                "drive=boot,bootindex=0"]
    else:
        cmd += ["-device", "virtio-blk-pci,drive=boot,bootindex=0"]
    cmd += [
        "-netdev", f"user,id=mgmt,restrict=on"
        f",hostfwd=tcp:127.0.0.1:{args.rest_port}-{GUEST_IP}:7380"
        f",hostfwd=tcp:127.0.0.1:{args.dosp_port}-{GUEST_IP}:7370",
        "-device", "virtio-net-pci,id=mgmt,netdev=mgmt,mac=52:54:00:d0:5d:01",
    ]
    if args.data_tap:
        cmd += [
            "-device", f"pcie-root-port,id=rp-data,chassis={DATA_CHASSIS},slot={DATA_CHASSIS}",
            "-netdev", f"tap,id=data,ifname={args.data_tap},script=no,downscript=no,vhost=off",
            "-device", f"virtio-net-pci,id=data,netdev=data,mac={args.data_mac},bus=rp-data,"
            "iommu_platform=on,disable-legacy=on,romfile=",
        ]
    size = parse_size(args.disk_size)
    for k in range(1, args.disks + 1):
        img = os.path.join(d, f"nvme{k}.img")
        if not os.path.exists(img):
            with open(img, "wb") as f:
                f.truncate(size)
        cmd += [
            "-device", f"pcie-root-port,id=rp-nvme{k},chassis={k},slot={k}",
            "-drive", f"file={img},if=none,id=drv-nvme{k},format=raw,discard=unmap",
            "-device", f"nvme,id=nvme{k},serial={serial(args.name, k)},drive=drv-nvme{k},bus=rp-nvme{k}",
        ]
    return cmd


def parser():
    ap = argparse.ArgumentParser(prog="qemu/node", description="Boots the dosd appliance image in QEMU.")
    ap.add_argument("--name", default="node1", help="node name: its directory and disk serials (node1)")
    ap.add_argument("--image", default=os.path.join(ROOT, "target", "appliance", "dosd-appliance.img"))
    ap.add_argument("--disks", type=int, default=3, help="emulated NVMe controllers (3)")
    ap.add_argument("--disk-size", default="1G", help="size of each NVMe disk (1G)")
    ap.add_argument("--rest-port", type=int, default=7380, help="host port of the REST API on 127.0.0.1 (7380)")
    ap.add_argument("--dosp-port", type=int, default=7370, help="host port of DOSP on 127.0.0.1 (7370)")
    ap.add_argument("--mem", type=int, default=1024, help="guest memory in MiB (1024)")
    ap.add_argument("--smp", type=int, default=2, help="vCPUs (2)")
    ap.add_argument("--fresh", action="store_true", help="start over: a new copy of the image, blank disks")
    ap.add_argument("--no-iommu", action="store_true", help="no emulated IOMMU: the kernel nvme driver serves")
    ap.add_argument("--boot-nvme", action="store_true",
                    help="the boot disk on an NVMe controller (serial NAME-BOOT) instead of virtio-blk")
    ap.add_argument("--data-tap", metavar="TAP", help="a data NIC on a new tap device TAP (at most 15 characters)")
    ap.add_argument("--data-mac", default=DATA_MAC, help=f"the data NIC's MAC address ({DATA_MAC})")
    ap.add_argument("--print", action="store_true", help="print the QEMU command instead of running it")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    if not 0 < len(args.name) <= 12 or not args.name.replace("-", "").isalnum():
        sys.exit("qemu/node: --name: 1-12 letters, digits or '-'")
    if args.data_tap and not 0 < len(args.data_tap) <= 15:
        sys.exit("qemu/node: --data-tap: 1-15 characters (a network interface name)")
    if args.disks >= DATA_CHASSIS:
        sys.exit(f"qemu/node: --disks: at most {DATA_CHASSIS - 1}")
    cmd = command(args)
    if args.print:
        print(" ".join(cmd))
        return 0
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
