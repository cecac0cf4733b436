#!/usr/bin/env python3
"""Builds the dosd appliance image: target/appliance/dosd-appliance.img.

Usage: image/build [-o OUTPUT] [--no-cargo]
       image/build --uki-only [--slot a|b] [--image-version V] [--broken] [--hang] [-o OUTPUT] [--no-cargo]

A GPT disk built in files (no loop mounts) from Debian packages and the project's own
static build:
  partition 1, ESP (FAT, label DOSDESP): EFI/BOOT/BOOTX64.EFI = systemd-boot,
      loader/loader.conf, EFI/Linux/dosd-a.efi = slot A's UKI (systemd-boot's stub +
      .osrel + .cmdline + the Debian kernel + an initramfs with busybox, the modules,
      the static dosd and image/init);
  partition 2, DOSDCONF (FAT, label DOSDCONF): dosd.toml and init.conf, for the
      operator to edit with mtools.

Byte-reproducible: SOURCE_DATE_EPOCH (default: the last commit's time) for every
timestamp, a sorted cpio with fixed owners and times, the PE TimeDateStamp and CheckSum
of the UKI zeroed, fixed FAT serials and labels, fixed GPT GUIDs, FAT times in UTC.

--uki-only writes only a Unified Kernel Image (default
target/appliance/dosd-SLOT-VERSION.efi), the same recipe as the image's slot A but
with dosd.slot=SLOT on the command line and IMAGE_VERSION=VERSION: an update for
POST /v1/update (which installs into the slot that is not running: build it for that
slot). --broken adds dosd.broken=1, on which the init does not start dosd, so the
slot is never marked good and boot counting rolls it back (for tests).

The kernel fetch and the static build are the QEMU harness's (qemu/harness.py).
--no-cargo reuses the static binaries already in target/qemu-guest/ (no cargo run).
Only the Python standard library is used.
"""

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import time

IMAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(IMAGE_DIR)
sys.path.insert(0, os.path.join(ROOT, "qemu"))
import harness  # noqa: E402  (the kernel fetch, the static build, module closure)
from harness import HarnessError, output, run  # noqa: E402

OUT_DIR = os.path.join(ROOT, "target", "appliance")

PACKAGES = [
    ("systemd-boot-efi", "/usr/lib/systemd/boot/efi/linuxx64.efi.stub"),
    ("mtools", "mcopy"),
    ("dosfstools", "mkfs.vfat"),
    ("fdisk", "sfdisk"),
    ("binutils", "objcopy"),
    ("ovmf", "/usr/share/OVMF/OVMF_CODE_4M.fd"),
]
STUB = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub"
SDBOOT = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi"

# The harness's modules (nvme, the vfio stack with vfio_iommu_type1, virtio_net) plus
# what the appliance needs to find and mount its own disk.
MODULES = harness.MODULES + [
    "virtio_blk",
    "fat",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "efivarfs",
    "button",  # the ACPI power button (QMP system_powerdown) ...
    "evdev",  # ... as an input event for busybox acpid
    "i6300esb",  # QEMU's watchdog (qemu/node); the init arms /dev/watchdog
]

# no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can fail
# and panic ("timer doesn't work through Interrupt-remapped IO-APIC"); seen here once in
# five boots before this flag. panic=-1: a panic reboots (and uses up a boot try).
# init_on_alloc=0: Debian's kernel zeroes every page it hands out
# (CONFIG_INIT_ON_ALLOC_DEFAULT_ON), so the boot-time reservation of hugepages=128
# zeroed 256 MiB: 1.7 s of a boot under TCG. Hugepages are zeroed again when mapped
# into dosd anyway, and nothing but dosd and busybox runs on the appliance.
# cryptomgr.notests: no boot-time self-tests of the kernel's crypto algorithms (1.1 s
# of kernel boot under TCG; they check implementations, they protect nothing, and
# fips=1 would run them regardless).
CMDLINE_BASE = ("console=ttyS0 panic=-1 no_timer_check intel_iommu=on iommu=pt loglevel=4 hugepages=128"
                " init_on_alloc=0 cryptomgr.notests")
CMDLINE = f"{CMDLINE_BASE} dosd.slot=a"

# Layout, in 512-byte sectors. Room for two slots' UKIs on the ESP.
SECTOR = 512
ESP_START = 2048
ESP_MIB = 40
CONF_MIB = 2
ESP_SECTORS = ESP_MIB * 2048
CONF_START = ESP_START + ESP_SECTORS
CONF_SECTORS = CONF_MIB * 2048
DISK_SECTORS = CONF_START + CONF_SECTORS + 2048  # 1 MiB for the backup GPT
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
DATA_TYPE = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
# Fixed identities (reproducibility). Both partitions are also found by FAT label.
DISK_GUID = "D05D0000-0000-4000-8000-000000000000"
ESP_GUID = "D05D0000-0000-4000-8000-0000000000E5"
CONF_GUID = "D05D0000-0000-4000-8000-0000000000CF"
ESP_SERIAL = "D05DE5E5"
CONF_SERIAL = "D05DCFCF"


def log(msg):
    print(f"[image] {msg}", flush=True)


def ensure_packages():
    harness.ensure_packages()
    missing = [p for p, probe in PACKAGES if not (os.path.exists(probe) if probe.startswith("/") else shutil.which(probe))]
    if missing:
        log(f"installing {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "-y", "-qq", "install", "--no-install-recommends"] + missing, env=env, stdout=subprocess.DEVNULL)


def source_date_epoch():
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    return int(output(["git", "-C", ROOT, "log", "-1", "--format=%ct"]).strip())


def image_version(override=None):
    if override:
        return override
    if os.environ.get("DOSD_IMAGE_VERSION"):  # e.g. a test's deliberately newer image
        return os.environ["DOSD_IMAGE_VERSION"]
    with open(os.path.join(ROOT, "Cargo.toml")) as f:
        m = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
    base = m.group(1) if m else "0"
    # The commit count makes later builds sort newer (systemd-boot orders entries by
    # IMAGE_VERSION); the commit itself goes into PRETTY_NAME.
    count = output(["git", "-C", ROOT, "rev-list", "--count", "HEAD"]).strip()
    return f"{base}.{count}"


def image_commit():
    return output(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"]).strip()


def static_bins(use_cargo):
    """{name: path} of the static guest binaries: the harness's build (cargo, a no-op
    when up to date) or, with use_cargo False, what target/qemu-guest already holds."""
    if use_cargo:
        return harness.build_guest([])
    rel = os.path.join(harness.GUEST_TARGET_DIR, harness.RUST_TARGET, "release")
    path = os.path.join(rel, "dosd")
    if not os.path.exists(path) or not harness.is_static(path):
        raise HarnessError(f"--no-cargo: no static {path}; run image/build once without it")
    return {"dosd": path}


def stage_initramfs(stage, kroot, kver, dosd, version, osrel):
    shutil.rmtree(stage, ignore_errors=True)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run",
              "etc", "etc/acpi/PWRF", "root", "var", "conf", "boot/efi"):
        os.makedirs(os.path.join(stage, d), exist_ok=True)
    shutil.copyfile("/bin/busybox", os.path.join(stage, "bin/busybox"))
    os.chmod(os.path.join(stage, "bin/busybox"), 0o755)
    for applet in output(["/bin/busybox", "--list-full"]).split():
        dst = os.path.join(stage, applet)
        if os.path.lexists(dst):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(stage, "bin/busybox"), os.path.dirname(dst)), dst)
    modroot = os.path.join(stage, "lib/modules", kver)
    load = []
    for src in harness.module_closure(kroot, kver, MODULES):
        rel = src.split(f"/modules/{kver}/", 1)[1]
        dst = os.path.join(modroot, re.sub(r"\.(xz|zst|gz)$", "", rel))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if src.endswith(".xz"):
            with open(dst, "wb") as out:
                run(["xz", "-dc", src], stdout=out)
        elif src.endswith(".zst"):
            run(["zstd", "-q", "-d", "-f", src, "-o", dst])
        else:
            shutil.copyfile(src, dst)
        load.append("/" + os.path.relpath(dst, stage))
    for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        src = os.path.join(kroot, "lib/modules", kver, f)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(modroot, f))
    run(["depmod", "-b", stage, kver])
    files = {
        "etc/dosd-modules": "".join(m + "\n" for m in load),
        "etc/dosd-version": version + "\n",
        "etc/os-release": osrel,
    }
    for path, text in files.items():
        with open(os.path.join(stage, path), "w") as f:
            f.write(text)
    for src, dst, mode in (
        ("init", "init", 0o755),
        ("udhcpc.script", "etc/udhcpc.script", 0o755),
        ("dosd-shutdown", "bin/dosd-shutdown", 0o755),
        ("dosd.toml", "etc/dosd.toml", 0o644),
        ("acpi-power", "etc/acpi/PWRF/00000080", 0o755),
    ):
        shutil.copyfile(os.path.join(IMAGE_DIR, src), os.path.join(stage, dst))
        os.chmod(os.path.join(stage, dst), mode)
    # dosd without its debug info (symbols stay, as in the harness's initramfs).
    run(["objcopy", "--strip-debug", dosd, os.path.join(stage, "bin/dosd")])
    os.chmod(os.path.join(stage, "bin/dosd"), 0o755)
    os.mknod(os.path.join(stage, "dev/console"), 0o600 | 0o020000, os.makedev(5, 1))


def pack_initramfs(stage, out, epoch):
    """cpio newc, sorted, owner 0:0, every mtime = epoch, --reproducible; zstd."""
    files = sorted(output(["find", ".", "-mindepth", "1"], cwd=stage).splitlines())
    for p in files + ["."]:
        os.utime(os.path.join(stage, p), (epoch, epoch), follow_symlinks=False)
    listing = "".join(p + "\n" for p in files).encode()
    env = dict(os.environ, LC_ALL="C")
    with open(out, "wb") as f:
        cpio = subprocess.Popen(
            ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0", "--reproducible"],
            cwd=stage, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        zstd = subprocess.Popen(["zstd", "-q", "-19", "-T1"], stdin=cpio.stdout, stdout=f)
        cpio.stdout.close()
        cpio.stdin.write(listing)
        cpio.stdin.close()
        if cpio.wait() != 0 or zstd.wait() != 0:
            raise HarnessError("packing the initramfs failed (cpio | zstd)")


def pe_layout(path):
    """(ImageBase, end of the last section rounded up to 4 KiB) of a PE32+ file."""
    with open(path, "rb") as f:
        data = f.read(4096)
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if data[pe:pe + 4] != b"PE\0\0":
        raise HarnessError(f"{path} is not a PE file")
    nsect = struct.unpack_from("<H", data, pe + 6)[0]
    optsize = struct.unpack_from("<H", data, pe + 20)[0]
    opt = pe + 24
    if struct.unpack_from("<H", data, opt)[0] != 0x20B:
        raise HarnessError(f"{path} is not PE32+")
    base = struct.unpack_from("<Q", data, opt + 24)[0]
    end = 0
    for i in range(nsect):
        sh = opt + optsize + 40 * i
        vsize, vaddr = struct.unpack_from("<II", data, sh + 8)
        end = max(end, vaddr + vsize)
    return base, (end + 0xFFF) & ~0xFFF


def build_uki(out, kernel, initrd, cmdline_text, osrel_text, work):
    """systemd-boot's stub + .osrel, .cmdline, .linux, .initrd at 4 KiB-aligned
    addresses after the stub's last section; TimeDateStamp and CheckSum zeroed."""
    base, addr = pe_layout(STUB)
    osrel = os.path.join(work, "osrel")
    cmdline = os.path.join(work, "cmdline")
    with open(osrel, "w") as f:
        f.write(osrel_text)
    with open(cmdline, "w") as f:
        f.write(cmdline_text)
    args = ["objcopy"]
    for name, path in ((".osrel", osrel), (".cmdline", cmdline), (".linux", kernel), (".initrd", initrd)):
        args += ["--add-section", f"{name}={path}", "--change-section-vma", f"{name}={base + addr:#x}"]
        addr = (addr + os.path.getsize(path) + 0xFFF) & ~0xFFF
    run(args + [STUB, out])
    with open(out, "r+b") as f:
        f.seek(0x3C)
        pe = struct.unpack("<I", f.read(4))[0]
        f.seek(pe + 8)
        f.write(b"\0\0\0\0")  # COFF TimeDateStamp (objcopy sets it from the clock)
        f.seek(pe + 88)
        f.write(b"\0\0\0\0")  # optional header CheckSum


def make_fat(path, sectors, label, serial, files, dirs, env):
    """A FAT file system in a file: mkfs.vfat --invariant -i SERIAL, then mtools."""
    if os.path.exists(path):
        os.unlink(path)
    run(["mkfs.vfat", "-C", "--invariant", "-i", serial, "-n", label, path, str(sectors // 2)],
        stdout=subprocess.DEVNULL, env=env)
    for d in dirs:
        run(["mmd", "-i", path, "::/" + d], env=env)
    for src, dst in files:
        run(["mcopy", "-i", path, src, "::/" + dst], env=env)


def make_uki(work, use_cargo, slot="a", version=None, broken=False, hang=False):
    """Builds a UKI in WORK (emptied first) for SLOT; returns (path, epoch, version)."""
    ensure_packages()
    epoch = source_date_epoch()
    version = image_version(version)
    commit = image_commit()
    vmlinuz, kroot, kver = harness.ensure_kernel()
    t = time.monotonic()
    bins = static_bins(use_cargo)
    log(f"static dosd ({'cargo' if use_cargo else 'reused'}): {time.monotonic() - t:.1f} s")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    osrel = (
        'NAME="dosd appliance"\nID=dosd\n'
        f'PRETTY_NAME="dosd appliance {version} ({commit})"\n'
        f"IMAGE_ID=dosd\nIMAGE_VERSION={version}\n"
    )
    t = time.monotonic()
    stage = os.path.join(work, "initramfs")
    stage_initramfs(stage, kroot, kver, bins["dosd"], f"{version} ({commit})", osrel)
    initrd = os.path.join(work, "initramfs.cpio.zst")
    pack_initramfs(stage, initrd, epoch)
    log(f"initramfs {os.path.getsize(initrd)} bytes: {time.monotonic() - t:.1f} s")
    cmdline = (f"{CMDLINE_BASE} dosd.slot={slot}" + (" dosd.broken=1" if broken else "")
               + (" dosd.hang=1" if hang else ""))
    uki = os.path.join(work, f"dosd-{slot}.efi")
    build_uki(uki, vmlinuz, initrd, cmdline, osrel, work)
    log(f"UKI {os.path.getsize(uki)} bytes (kernel {kver}, version {version}, cmdline {cmdline!r})")
    return uki, epoch, version


def build(out, use_cargo, version=None):
    t0 = time.monotonic()
    work = os.path.join(OUT_DIR, "work")
    uki, epoch, version = make_uki(work, use_cargo, version=version)
    loader = os.path.join(work, "loader.conf")
    with open(loader, "w") as f:
        # No `default`: systemd-boot boots the newest IMAGE_VERSION with tries left, so a
        # counted slot that never turns good falls back to the other one. No menu.
        f.write("timeout 0\nconsole-mode keep\n")
    env = dict(os.environ, TZ="UTC", SOURCE_DATE_EPOCH=str(epoch), MTOOLS_SKIP_CHECK="1", LC_ALL="C")
    esp = os.path.join(work, "esp.part")
    make_fat(esp, ESP_SECTORS, "DOSDESP", ESP_SERIAL,
             [(SDBOOT, "EFI/BOOT/BOOTX64.EFI"), (loader, "loader/loader.conf"), (uki, "EFI/Linux/dosd-a.efi")],
             ["EFI", "EFI/BOOT", "EFI/Linux", "loader"], env)
    conf = os.path.join(work, "conf.part")
    make_fat(conf, CONF_SECTORS, "DOSDCONF", CONF_SERIAL,
             [(os.path.join(IMAGE_DIR, "dosd.toml"), "dosd.toml"), (os.path.join(IMAGE_DIR, "init.conf"), "init.conf")],
             [], env)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.truncate(DISK_SECTORS * SECTOR)
    table = (
        "label: gpt\n"
        f"label-id: {DISK_GUID}\n"
        "unit: sectors\n"
        "first-lba: 2048\n"
        f"start={ESP_START}, size={ESP_SECTORS}, type={ESP_TYPE}, uuid={ESP_GUID}, name=\"ESP\"\n"
        f"start={CONF_START}, size={CONF_SECTORS}, type={DATA_TYPE}, uuid={CONF_GUID}, name=\"DOSDCONF\"\n"
    )
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", tmp], input=table.encode(), env=env,
        stdout=subprocess.DEVNULL)
    for part, start in ((esp, ESP_START), (conf, CONF_START)):
        run(["dd", f"if={part}", f"of={tmp}", "bs=1M", f"seek={start * SECTOR // (1 << 20)}",
             "conv=notrunc,fsync", "status=none"])
    os.replace(tmp, out)
    size = os.path.getsize(out)
    log(f"{os.path.relpath(out, ROOT)}: {size} bytes ({size / (1 << 20):.0f} MiB), version {version}, "
        f"SOURCE_DATE_EPOCH={epoch}, in {time.monotonic() - t0:.0f} s")
    log(f"config partition: mtools -i {os.path.relpath(out, ROOT)}@@{CONF_START * SECTOR} "
        "(e.g. mcopy -o -i IMG@@OFFSET dosd.toml ::dosd.toml)")


def main():
    ap = argparse.ArgumentParser(description="Builds target/appliance/dosd-appliance.img")
    ap.add_argument("-o", "--output", help="the image (target/appliance/dosd-appliance.img) or the UKI")
    ap.add_argument("--no-cargo", action="store_true",
                    help="reuse the static binaries in target/qemu-guest/ (no cargo run)")
    ap.add_argument("--uki-only", action="store_true",
                    help="write only a UKI (an update for POST /v1/update), not the disk image")
    ap.add_argument("--slot", choices=("a", "b"), default="a",
                    help="with --uki-only: the slot it is for, dosd.slot= on its command line (a)")
    ap.add_argument("--image-version", help="IMAGE_VERSION (default: the crate version and the commit count)")
    ap.add_argument("--broken", action="store_true",
                    help="with --uki-only: dosd.broken=1, the init never starts dosd (a rollback test)")
    ap.add_argument("--hang", action="store_true",
                    help="with --uki-only: dosd.hang=1, the init stops petting the watchdog (a hang, by hand)")
    args = ap.parse_args()
    if (args.slot != "a" or args.broken or args.hang) and not args.uki_only:
        ap.error("--slot, --broken and --hang need --uki-only")
    os.makedirs(OUT_DIR, exist_ok=True)
    os.makedirs(harness.CACHE, exist_ok=True)
    try:
        if args.uki_only:
            t0 = time.monotonic()
            work = os.path.join(OUT_DIR, f"work-uki-{args.slot}")
            uki, _, version = make_uki(work, not args.no_cargo, args.slot, args.image_version, args.broken,
                                            args.hang)
            out = args.output or os.path.join(OUT_DIR, f"dosd-{args.slot}-{version}.efi")
            shutil.move(uki, out)
            shutil.rmtree(work, ignore_errors=True)
            log(f"{os.path.relpath(os.path.abspath(out), ROOT)}: slot {args.slot}, version {version}"
                f"{', broken' if args.broken else ''}, in {time.monotonic() - t0:.0f} s")
            return 0
        build(os.path.abspath(args.output or os.path.join(OUT_DIR, "dosd-appliance.img")),
              not args.no_cargo, args.image_version)
    except HarnessError as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
