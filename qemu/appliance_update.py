#!/usr/bin/env python3
"""qemu/test appliance-update: A/B updates on the appliance image, with rollback.

1. image/build (the base image, slot A), then two update UKIs with
   `image/build --uki-only --no-cargo` (the same static binaries): a good one for
   slot B with IMAGE_VERSION = the image's + ".1", and a broken one (`--broken`: the
   init never starts dosd) for slot A with the image's + ".2".
2. A fresh qemu/node (1 NVMe disk) whose DOSDCONF gets a dosd.toml with a random
   mgmt_token (the shipped one has none) and an init.conf with a short trial_timeout,
   written with mtools before QEMU starts. QEMU runs without -no-reboot, so every
   reboot below happens inside the one QEMU process.
3. Slot A serves and is good; one object is stored (md5sum checked).
4. POST /v1/update?reboot=true with the good slot-B UKI: the node reboots into slot
   B, dosd marks it good (`dosd-b+2-1.efi` renamed `dosd-b.efi`), /v1/node says slot
   b, marked_good, the update's image_version and slot A's node id (the init keeps it
   on the ESP); the object is fetched.
5. POST /v1/update?reboot=true with the broken slot-A UKI: systemd-boot tries it 3
   times (each time the init reboots after trial_timeout, the slot never being marked
   good), then boots slot B by itself; the node serves on slot B with the same node
   id and the object from step 3 is fetched again, md5-checked.
6. Clean poweroff; the ESP (mdir) holds exactly `dosd-b.efi` and `dosd-a+0-3.efi`.

Each boot's slot, image version and times (since QEMU started) are printed. Every wait
is bounded. Console in target/qemu/appliance-update.log. Standard library only.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

QEMU_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(QEMU_DIR)
sys.path.insert(0, QEMU_DIR)
sys.path.insert(0, os.path.join(ROOT, "image"))
import appliance  # noqa: E402
import build as ibuild  # noqa: E402  (image/build.py: the partition layout, the version)
import harness  # noqa: E402
import node as qnode  # noqa: E402
from appliance import Fail, dosp, http_get, log, md5sum  # noqa: E402

NAME = "upd"
TRIAL_TIMEOUT = 30  # the test's init.conf trial_timeout (the shipped default is 240)
BOOT_TIMEOUT = 300  # one boot, from the reboot until serving
OUT_DIR = os.path.join(ROOT, "target", "appliance")
BOOT_RE = re.compile(r"^dosd-init: \[[0-9.]+\] dosd appliance (\S+) \(\S+\) slot ([a-z?]+)")


def build_ukis(version):
    ukis = {}
    for key, slot, ver, extra in (("good", "b", version + ".1", []), ("broken", "a", version + ".2", ["--broken"])):
        out = os.path.join(OUT_DIR, f"update-{key}-{slot}.efi")
        subprocess.run([os.path.join(ROOT, "image", "build"), "--uki-only", "--no-cargo", "--slot", slot,
                        "--image-version", ver, "-o", out] + extra, check=True)
        ukis[key] = (out, slot, ver)
    return ukis


def configure(token):
    """The prepare hook: our dosd.toml (with the token and the cluster key), the key
    file and init.conf onto DOSDCONF."""

    def prepare(boot):
        files = qnode.keyed(appliance.keys())
        files["dosd.toml"] += f'mgmt_token = "{token}"\n'
        files["init.conf"] = f"trial_timeout={TRIAL_TIMEOUT}\n"
        qnode.configure(boot, files)

    return prepare


def node_view(port):
    try:
        status, body = http_get(port, "/v1/node", timeout=3)
    except (OSError, ValueError):
        return None
    return json.loads(body) if status == 200 else None


def boots(console, since=0.0):
    """[(t_init, slot, version)] of every boot whose init spoke after `since`."""
    out = []
    with console.lock:
        for t, line in console.lines:
            m = BOOT_RE.search(line)
            if m and t >= since:
                out.append((t, m.group(2), m.group(1)))
    return out


def wait_good(node, slot, timeout, since, want_boots=None):
    """Waits until /v1/node says `slot`, marked good, with the given number of boots
    (init lines) since `since`; returns the view."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise Fail(f"QEMU exited ({node.proc.returncode})")
        seen = boots(node.console, since)
        if want_boots is not None and len(seen) > want_boots:
            raise Fail(f"more boots than expected: {[(round(t, 1), s) for t, s, _ in seen]}")
        v = node_view(node.rest)
        boot = (v or {}).get("boot") or {}
        if boot.get("slot") == slot and boot.get("marked_good") and (want_boots is None or len(seen) == want_boots):
            return v
        time.sleep(1)
    raise Fail(f"not serving on slot {slot}, marked good, within {timeout} s "
               f"(boots since: {[(round(t, 1), s) for t, s, _ in boots(node.console, since)]})")


def post_update(port, token, uki):
    with open(uki, "rb") as f:
        data = f.read()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/update?reboot=true", data=data, method="POST",
        headers={"Authorization": f"Bearer {token}", "X-Update-Sha256": hashlib.sha256(data).hexdigest(),
                 "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=180) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise Fail(f"POST /v1/update: {e.code} {e.read().decode(errors='replace').strip()}")


def fetch_check(bindir, node, fp, what):
    back = os.path.join(node.work, "obj.back")
    if os.path.exists(back):
        os.unlink(back)
    r = dosp(bindir, node.dosp, "fetch", fp, "-o", back)
    if r.returncode != 0 or md5sum(back) != fp:
        raise Fail(f"{what}: fetch of {fp} failed: {r.stderr.strip()}")
    log(f"{what}: the object stored on slot a fetched, md5 {fp}")


def main():
    results = {}
    t_start = time.monotonic()
    node = None
    ok = False
    try:
        harness.ensure_packages()
        t = time.monotonic()
        version = ibuild.image_version()  # the base image's, given to every build below
        subprocess.run([os.path.join(ROOT, "image", "build"), "--image-version", version], check=True)
        ukis = build_ukis(version)
        results["builds_s"] = time.monotonic() - t
        bindir = harness.build_host_tools()
        token = os.urandom(16).hex()

        node = appliance.Node(NAME, ["--disks", "1", "--disk-size", "256M"], "appliance-update.log",
                              prepare=configure(token))
        v = wait_good(node, "a", BOOT_TIMEOUT, 0.0, want_boots=1)
        results["a_serving_s"] = time.monotonic() - node.t0
        log(f"slot a serving and good at {results['a_serving_s']:.1f} s: {v['boot']}")
        node_id = v["node_id"]
        path = os.path.join(node.work, "obj")
        with open(path, "wb") as f:
            f.write(os.urandom((1 << 20) + 5))
        fp = md5sum(path)
        r = dosp(bindir, node.dosp, "store", path)
        if r.returncode != 0 or r.stdout.strip() != fp:
            raise Fail(f"store: {r.stdout.strip()!r} (md5sum {fp}) {r.stderr.strip()}")
        log(f"stored a 1 MiB + 5 object on slot a, md5 {fp}")

        # The good update: slot b, kept.
        uki, slot, ver = ukis["good"]
        t_post = time.monotonic() - node.t0
        ans = post_update(node.rest, token, uki)
        log(f"POST /v1/update (good, slot {slot}, version {ver}): {ans}")
        if ans.get("slot") != "b" or not ans.get("rebooting") or ans.get("tries") != 3:
            raise Fail(f"unexpected answer {ans}")
        v = wait_good(node, "b", BOOT_TIMEOUT, t_post, want_boots=1)
        results["b_serving_s"] = time.monotonic() - node.t0 - t_post
        log(f"slot b serving and good {results['b_serving_s']:.1f} s after the POST: {v['boot']}")
        if not re.fullmatch(r"dosd-b\+2-1\.efi", v["boot"].get("booted_file") or ""):
            raise Fail(f"slot b booted from {v['boot'].get('booted_file')}, want its first try dosd-b+2-1.efi")
        if node.console.first(r"boot marked good.*dosd-b\+2-1\.efi.*dosd-b\.efi") is None:
            raise Fail("dosd did not log renaming dosd-b+2-1.efi to dosd-b.efi")
        if v["boot"].get("image_version") != ukis["good"][2]:
            raise Fail(f"slot b reports image_version {v['boot'].get('image_version')!r}, want {ukis['good'][2]}")
        if v["node_id"] != node_id:
            raise Fail(f"the node id changed with the reboot into slot b: {node_id} -> {v['node_id']}")
        fetch_check(bindir, node, fp, "on slot b")

        # The broken update: slot a, tried 3 times, rolled back to b.
        uki, slot, ver = ukis["broken"]
        t_post2 = time.monotonic() - node.t0
        ans = post_update(node.rest, token, uki)
        log(f"POST /v1/update (broken, slot {slot}, version {ver}): {ans}")
        if ans.get("slot") != "a" or not ans.get("rebooting"):
            raise Fail(f"unexpected answer {ans}")
        v = wait_good(node, "b", 3 * (TRIAL_TIMEOUT + BOOT_TIMEOUT // 2) + BOOT_TIMEOUT, t_post2, want_boots=4)
        results["rollback_s"] = time.monotonic() - node.t0 - t_post2
        seen = [s for _, s, _ in boots(node.console, t_post2)]
        if seen != ["a", "a", "a", "b"]:
            raise Fail(f"boots after the broken update: {seen}, want a, a, a, b")
        if (v["boot"].get("booted_file") or "") != "dosd-b.efi":
            raise Fail(f"after the rollback slot b booted from {v['boot'].get('booted_file')}, want dosd-b.efi")
        log(f"rolled back to slot b {results['rollback_s']:.1f} s after the POST: {v['boot']}")
        if v["node_id"] != node_id:
            raise Fail(f"the node id changed across the rollback: {node_id} -> {v['node_id']}")
        fetch_check(bindir, node, fp, "after the rollback")
        node.power_off()

        esp = f"{os.path.join(os.path.dirname(node.work), 'boot.img')}@@{ibuild.ESP_START * ibuild.SECTOR}"
        listing = subprocess.run(["mdir", "-b", "-i", esp, "::EFI/Linux"], stdout=subprocess.PIPE, text=True,
                                 check=True, env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout
        files = sorted(os.path.basename(p.strip()) for p in listing.splitlines() if p.strip())
        log(f"ESP EFI/Linux after the poweroff: {files}")
        if files != ["dosd-a+0-3.efi", "dosd-b.efi"]:
            raise Fail(f"the ESP holds {files}, want dosd-a+0-3.efi (tries used up) and dosd-b.efi (good)")
        ok = True
    except (Fail, harness.HarnessError, subprocess.CalledProcessError) as e:
        log(f"FAIL: {e}")
    finally:
        if node is not None:
            node.kill()
            bds = [t for t, line in node.console.lines if "BdsDxe: starting" in line]
            for i, (t, slot, ver) in enumerate(boots(node.console)):
                log(f"boot {i + 1}: slot {slot}, version {ver}, /init at {t:.1f} s since QEMU started")
            log(f"{len(bds)} firmware boots (BdsDxe) at {', '.join(f'{t:.1f}' for t in bds)} s")
    total = time.monotonic() - t_start
    summary = ", ".join(f"{k}={v:.1f}" for k, v in results.items())
    log(f"{'PASS' if ok else 'FAIL'} in {total:.0f} s ({summary})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
