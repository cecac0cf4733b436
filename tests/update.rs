//! A/B updates of a real `dosd` process with a temp directory as its ESP
//! (`--boot-esp`, `--boot-slot`): the running slot is marked good once the node is
//! healthy, and `POST /v1/update` writes a checked image into the other slot.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TOKEN: &str = "update-token-0123456789";

/// A minimal HTTP/1.1 exchange (Connection: close): status and body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    exchange(addr, head.as_bytes(), body)
}

fn exchange(addr: SocketAddr, head: &[u8], body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(head).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    (status, body.to_string())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

fn node_view(node: &Node) -> Value {
    let (status, body) = http(node.mgmt, "GET", "/v1/node", &[], b"");
    assert_eq!(status, 200, "{body}");
    json(&body)
}

fn update(
    node: &Node,
    query: &str,
    token: Option<&str>,
    sha: Option<&str>,
    body: &[u8],
) -> (u16, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/octet-stream")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    if let Some(s) = sha {
        headers.push(("X-Update-Sha256", s));
    }
    let (status, body) = http(
        node.mgmt,
        "POST",
        &format!("/v1/update{query}"),
        &headers,
        body,
    );
    (status, json(&body))
}

/// A small image that passes for a UKI: "MZ", the PE signature at the offset 0x3c
/// gives, a COFF header and a section table with `.osrel` (holding `IMAGE_VERSION`
/// when given) and `.linux`, then `filler` bytes.
fn fake_uki(seed: u8, filler: u32, version: Option<&str>) -> Vec<u8> {
    let osrel = match version {
        Some(v) => format!("ID=dosd\nIMAGE_ID=dosd\nIMAGE_VERSION={v}\n"),
        None => "ID=dosd\n".to_string(),
    };
    let mut f = vec![0u8; 0x80];
    f[..2].copy_from_slice(b"MZ");
    f[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
    f.extend_from_slice(b"PE\0\0");
    let mut coff = [0u8; 20];
    coff[..2].copy_from_slice(&0x8664u16.to_le_bytes()); // x86-64
    coff[2..4].copy_from_slice(&2u16.to_le_bytes()); // sections
    coff[16..18].copy_from_slice(&0xf0u16.to_le_bytes()); // optional header size
    f.extend_from_slice(&coff);
    f.extend_from_slice(&[0u8; 0xf0]);
    // .osrel's content goes right after the table (0x80 + 24 + 0xf0 + 2 * 40).
    let osrel_at = 0x80u32 + 24 + 0xf0 + 80;
    for name in [&b".osrel"[..], b".linux"] {
        let mut s = [0u8; 40];
        s[..name.len()].copy_from_slice(name);
        if name == b".osrel" {
            s[8..12].copy_from_slice(&(osrel.len() as u32).to_le_bytes());
            s[16..20].copy_from_slice(&(osrel.len() as u32).to_le_bytes());
            s[20..24].copy_from_slice(&osrel_at.to_le_bytes());
        }
        f.extend_from_slice(&s);
    }
    assert_eq!(f.len() as u32, osrel_at);
    f.extend_from_slice(osrel.as_bytes());
    f.extend((0..filler).map(|i: u32| (i as u8) ^ seed));
    f
}

/// SHA-256 in hex, by coreutils (an independent implementation).
fn sha256(dir: &Path, bytes: &[u8]) -> String {
    let path = dir.join("sha-input");
    std::fs::write(&path, bytes).unwrap();
    let out = std::process::Command::new("sha256sum")
        .arg(&path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Polls `/v1/node` until its boot says marked good (the deadline only bounds the
/// wait; nothing is asserted on how long it took).
fn wait_marked_good(node: &Node) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = node_view(node);
        if v["boot"]["marked_good"] == Value::Bool(true) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "never marked good: {v}\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn boot_is_marked_good_and_an_update_goes_into_the_other_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let esp = tmp.path().join("esp");
    let linux = esp.join("EFI/Linux");
    std::fs::create_dir_all(&linux).unwrap();
    std::fs::write(linux.join("dosd-a+2-1.efi"), b"slot A on trial").unwrap();
    std::fs::write(linux.join("dosd-b.efi"), b"the old slot B").unwrap();
    let reboot_mark = tmp.path().join("rebooted");
    let reboot_cmd = format!("touch {}", reboot_mark.display());
    let node = Node::start(
        &tmp.path().join("data"),
        &unique_group(),
        &[
            "--mgmt-token",
            TOKEN,
            "--boot-esp",
            esp.to_str().unwrap(),
            "--boot-slot",
            "a",
            "--reboot-command",
            &reboot_cmd,
        ],
    );

    // Marked good once healthy: the counter is gone from the running slot's name.
    let v = wait_marked_good(&node);
    let boot = &v["boot"];
    assert_eq!(boot["slot"], "a", "{v}");
    assert_eq!(boot["booted_file"], "dosd-a+2-1.efi", "{v}");
    assert_eq!(boot["tries_left"], 2, "{v}");
    assert_eq!(boot["error"], Value::Null, "{v}");
    assert_eq!(boot["image_version"], Value::Null, "not a UKI: {v}");
    assert_eq!(listing(&linux), ["dosd-a.efi", "dosd-b.efi"]);
    assert_eq!(
        std::fs::read(linux.join("dosd-a.efi")).unwrap(),
        b"slot A on trial"
    );
    assert!(node.log().contains("boot marked good"), "{}", node.log());

    // Past one write chunk (1 MiB), so the body is streamed in several pieces.
    let image = fake_uki(7, (1 << 20) + 12345, None);
    // For refusals before the body is read: small, so the client is never cut off
    // mid-write.
    let small = fake_uki(7, 100, None);
    let sha = sha256(tmp.path(), &image);
    let before = listing(&linux);

    // Refusals change nothing on the ESP.
    let (status, _) = update(&node, "", None, Some(&sha), &small);
    assert_eq!(status, 401);
    let (status, _) = update(&node, "", Some("wrong"), Some(&sha), &small);
    assert_eq!(status, 401);
    let (status, e) = update(&node, "", Some(TOKEN), None, &small);
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("X-Update-Sha256"),
        "{e}"
    );
    let (status, e) = update(&node, "", Some(TOKEN), Some("abc"), &small);
    assert_eq!(status, 400, "{e}");
    let wrong = sha256(tmp.path(), b"something else");
    let (status, e) = update(&node, "", Some(TOKEN), Some(&wrong), &image);
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("SHA-256 mismatch"),
        "{e}"
    );
    let not_pe = vec![0x42u8; 5000];
    let (status, e) = update(
        &node,
        "",
        Some(TOKEN),
        Some(&sha256(tmp.path(), &not_pe)),
        &not_pe,
    );
    assert_eq!(status, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("MZ"), "{e}");
    let (status, e) = update(&node, "", Some(TOKEN), Some(&sha256(tmp.path(), b"")), b"");
    assert_eq!(status, 400, "{e}");
    let (status, e) = update(&node, "?reboot=maybe", Some(TOKEN), Some(&sha), &small);
    assert_eq!(status, 400, "{e}");
    // A body declared over 256 MiB is refused before it is read.
    let head = format!(
        "POST /v1/update HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
         Authorization: Bearer {TOKEN}\r\nX-Update-Sha256: {sha}\r\n\
         Content-Length: {}\r\n\r\n",
        (256u64 << 20) + 1
    );
    let (status, body) = exchange(node.mgmt, head.as_bytes(), b"");
    assert_eq!(status, 413, "{body}");
    assert_eq!(
        listing(&linux),
        before,
        "a refused update left something behind"
    );

    // A client that goes away mid-body: the partial file is removed.
    {
        let mut s = TcpStream::connect(node.mgmt).unwrap();
        let head = format!(
            "POST /v1/update HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TOKEN}\r\n\
             X-Update-Sha256: {sha}\r\nContent-Length: {}\r\n\r\n",
            image.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&image[..200_000]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !linux.join("dosd-b.part").exists() {
            assert!(Instant::now() < deadline, "no temp file\n{}", node.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while listing(&linux) != before {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}\n{}",
            listing(&linux),
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The real thing: the other slot gets the image with 3 tries; its old file goes.
    let (status, r) = update(&node, "", Some(TOKEN), Some(&sha.to_uppercase()), &image);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["slot"], "b", "{r}");
    assert_eq!(r["file"], "EFI/Linux/dosd-b+3-0.efi", "{r}");
    assert_eq!(r["sha256"], sha.as_str(), "{r}");
    assert_eq!(r["bytes"], image.len() as u64, "{r}");
    assert_eq!(r["tries"], 3, "{r}");
    assert_eq!(r["removed"], serde_json::json!(["dosd-b.efi"]), "{r}");
    assert_eq!(r["rebooting"], false, "{r}");
    assert_eq!(r["image_version"], Value::Null, "{r}");
    assert_eq!(listing(&linux), ["dosd-a.efi", "dosd-b+3-0.efi"]);
    assert_eq!(std::fs::read(linux.join("dosd-b+3-0.efi")).unwrap(), image);
    assert_eq!(
        node_view(&node)["boot"]["update_installed"],
        "dosd-b+3-0.efi"
    );
    assert!(!reboot_mark.exists());

    // Again with a reboot: the configured command runs after the answer.
    let image2 = fake_uki(9, 3000, None);
    let sha2 = sha256(tmp.path(), &image2);
    let (status, r) = update(&node, "?reboot=true", Some(TOKEN), Some(&sha2), &image2);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["rebooting"], true, "{r}");
    assert_eq!(r["removed"], serde_json::json!([]), "{r}");
    assert_eq!(std::fs::read(linux.join("dosd-b+3-0.efi")).unwrap(), image2);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reboot_mark.exists() {
        assert!(
            Instant::now() < deadline,
            "the reboot command never ran\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The running slot was never touched.
    assert_eq!(
        std::fs::read(linux.join("dosd-a.efi")).unwrap(),
        b"slot A on trial"
    );
}

#[test]
fn updates_are_refused_without_an_esp_or_a_good_running_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let image = fake_uki(1, 100, None);
    let sha = sha256(tmp.path(), &image);

    // Not the appliance: no --boot-esp.
    let node = Node::start(
        &tmp.path().join("data"),
        &unique_group(),
        &["--mgmt-token", TOKEN],
    );
    assert_eq!(node_view(&node)["boot"], Value::Null);
    let (status, e) = update(&node, "", Some(TOKEN), Some(&sha), &image);
    assert_eq!(status, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("--boot-esp"), "{e}");
    let (status, _) = update(&node, "", None, Some(&sha), &image);
    assert_eq!(status, 401);
    drop(node);

    // The running slot b has no file: it cannot be marked good, so no update.
    let esp = tmp.path().join("esp");
    let linux = esp.join("EFI/Linux");
    std::fs::create_dir_all(&linux).unwrap();
    std::fs::write(linux.join("dosd-a.efi"), b"A").unwrap();
    let node = Node::start(
        &tmp.path().join("data2"),
        &unique_group(),
        &[
            "--mgmt-token",
            TOKEN,
            "--boot-esp",
            esp.to_str().unwrap(),
            "--boot-slot",
            "b",
        ],
    );
    let v = node_view(&node);
    assert_eq!(v["boot"]["marked_good"], false, "{v}");
    assert!(
        v["boot"]["error"].as_str().unwrap().contains("dosd-b"),
        "{v}"
    );
    let (status, e) = update(&node, "", Some(TOKEN), Some(&sha), &image);
    assert_eq!(status, 409, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("not marked good"),
        "{e}"
    );
    let (status, e) = update(&node, "?reboot=true", Some(TOKEN), Some(&sha), &image);
    assert_eq!(status, 409, "{e}");
    assert_eq!(listing(&linux), ["dosd-a.efi"]);
}

#[test]
fn an_image_must_be_newer_than_the_running_one() {
    let tmp = tempfile::tempdir().unwrap();
    let esp = tmp.path().join("esp");
    let linux = esp.join("EFI/Linux");
    std::fs::create_dir_all(&linux).unwrap();
    std::fs::write(linux.join("dosd-b.efi"), fake_uki(2, 100, Some("1.10"))).unwrap();
    let node = Node::start(
        &tmp.path().join("data"),
        &unique_group(),
        &[
            "--mgmt-token",
            TOKEN,
            "--boot-esp",
            esp.to_str().unwrap(),
            "--boot-slot",
            "b",
        ],
    );
    // /v1/node reports the running image's version (its .osrel's IMAGE_VERSION).
    let v = wait_marked_good(&node);
    assert_eq!(v["boot"]["image_version"], "1.10", "{v}");
    for old in ["1.10", "1.9", "1"] {
        let image = fake_uki(3, 100, Some(old));
        let (status, e) = update(
            &node,
            "",
            Some(TOKEN),
            Some(&sha256(tmp.path(), &image)),
            &image,
        );
        assert_eq!(status, 409, "{old}: {e}");
        assert!(
            e["error"].as_str().unwrap().contains("IMAGE_VERSION"),
            "{e}"
        );
        assert_eq!(listing(&linux), ["dosd-b.efi"], "{old}");
    }
    let image = fake_uki(3, 100, Some("1.11"));
    let (status, r) = update(
        &node,
        "",
        Some(TOKEN),
        Some(&sha256(tmp.path(), &image)),
        &image,
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["image_version"], "1.11", "{r}");
    assert_eq!(listing(&linux), ["dosd-a+3-0.efi", "dosd-b.efi"]);
}
