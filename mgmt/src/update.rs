//! Safe updates on the A/B appliance: `POST /v1/update` writes a new Unified Kernel
//! Image into the slot that is not running, and the running slot is marked good once
//! the node's own health check passes.
//!
//! The boot side is systemd-boot's boot counting (ARCHITECTURE.md, "Updates"): the
//! ESP holds `EFI/Linux/dosd-a….efi` and `EFI/Linux/dosd-b….efi`. A file named
//! `dosd-<slot>+LEFT-DONE.efi` is on trial: systemd-boot renames it (`+3-0` → `+2-1` →
//! …) before each boot that tries it, and once no tries are left it falls back to the
//! other entry. A file without the counter (`dosd-<slot>.efi`) is *good*. dosd never
//! touches EFI variables; the whole state is in these two file names.
//!
//! # Crash safety of an update
//!
//! FAT has no atomic rename over an existing name, so the order is chosen such that the
//! **running slot's file is never touched**, and an update is refused (409) until the
//! running slot is good. Whatever point a crash or power cut hits, the running slot's
//! good file is there, and systemd-boot boots it (or a complete new file on trial):
//!
//! 1. the body streams into `EFI/Linux/dosd-<other>.part` (not `*.efi`: systemd-boot
//!    ignores it), hashed on the way; the file is fsynced;
//! 2. its SHA-256 is checked against the caller's, it must look like a UKI (a PE
//!    image with a `.linux` section), and its `.osrel` `IMAGE_VERSION`, when both it and
//!    the running slot's have one, must be newer (systemd-boot boots the highest first,
//!    so an older one would never be tried); otherwise it is removed and nothing else
//!    changes;
//! 3. it is renamed to `dosd-<other>+3-0.efi` and the directory is fsynced: only a
//!    complete, checked file ever carries an `.efi` name;
//! 4. only then are the other slot's older files removed (and the directory fsynced
//!    again). A crash between 3 and 4 leaves an old other-slot file behind too:
//!    harmless (systemd-boot prefers the newer image version, and falls back to the
//!    running slot's good file anyway); the next update or the next blessing tidies up.
//!
//! # Marking good
//!
//! Once per boot, when two consecutive health assessments (one second apart) find the
//! node not `failing` — `ok` or `degraded` — with at least one disk online and the
//! dataplane having published its disks, the running slot's `dosd-<slot>+N-M.efi` is
//! renamed `dosd-<slot>.efi` and the directory fsynced. `degraded` counts as good: a
//! disk that fails is not the image's fault, and rolling back would not mend it. A
//! dataplane loop that stalls or a DOSP listener that cannot accept makes the node
//! `failing`, and then it is never marked good.

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, HttpBody};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::Json;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ErrorBody};
use crate::health::{ReasonKind, Status};
use crate::{auth, Shared};

/// Tries systemd-boot gives a freshly written slot.
pub const TRIES: u32 = 3;
/// Largest UKI accepted.
pub const UPDATE_MAX: u64 = 256 << 20;
/// The request header carrying the image's SHA-256.
pub const SHA256_HEADER: &str = "x-update-sha256";
/// How much of the start of the image is kept for the PE check (headers and the
/// section table must lie within it).
const HEAD_MAX: usize = 64 << 10;
/// Bytes gathered before each write to the temp file.
const WRITE_CHUNK: usize = 1 << 20;
/// How often the health check is looked at before the boot is marked good.
const MARK_INTERVAL: Duration = Duration::from_secs(1);
/// Consecutive healthy assessments needed to mark the boot good.
const MARK_HEALTHY_TIMES: u32 = 2;
/// How long after answering an update the reboot command runs.
const REBOOT_DELAY: Duration = Duration::from_secs(1);

/// An A/B slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// `a` or `b` (either case).
    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "a" | "A" => Some(Slot::A),
            "b" | "B" => Some(Slot::B),
            _ => None,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The running slot as the kernel command line names it (`dosd.slot=a|b`; the last
/// one wins, as for the kernel's own parameters).
pub fn slot_from_cmdline(cmdline: &str) -> Option<Slot> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("dosd.slot="))
        .next_back()
        .and_then(Slot::parse)
}

/// systemd-boot's boot counter in a file name: `+LEFT` or `+LEFT-DONE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub left: u32,
    pub done: Option<u32>,
}

/// A UKI file name of ours: `dosd-<slot>[+LEFT[-DONE]].efi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub slot: Slot,
    /// `None`: the slot is good (systemd-boot does not count its boots).
    pub counter: Option<Counter>,
}

fn number(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl Entry {
    /// Parses a file name; anything that is not one of ours is `None`.
    pub fn parse(name: &str) -> Option<Entry> {
        let rest = name.strip_prefix("dosd-")?.strip_suffix(".efi")?;
        let (slot, counter) = match rest.split_once('+') {
            None => (rest, None),
            Some((slot, counter)) => {
                let counter = match counter.split_once('-') {
                    None => Counter {
                        left: number(counter)?,
                        done: None,
                    },
                    Some((left, done)) => Counter {
                        left: number(left)?,
                        done: Some(number(done)?),
                    },
                };
                (slot, Some(counter))
            }
        };
        Some(Entry {
            slot: Slot::parse(slot).filter(|_| slot.len() == 1)?,
            counter,
        })
    }

    pub fn file_name(&self) -> String {
        match self.counter {
            None => format!("dosd-{}.efi", self.slot),
            Some(Counter { left, done: None }) => format!("dosd-{}+{left}.efi", self.slot),
            Some(Counter {
                left,
                done: Some(done),
            }) => format!("dosd-{}+{left}-{done}.efi", self.slot),
        }
    }

    /// The good (uncounted) entry of `slot`.
    pub fn good(slot: Slot) -> Entry {
        Entry {
            slot,
            counter: None,
        }
    }

    /// A fresh entry on trial with [`TRIES`] tries.
    pub fn fresh(slot: Slot) -> Entry {
        Entry {
            slot,
            counter: Some(Counter {
                left: TRIES,
                done: Some(0),
            }),
        }
    }
}

/// One entry of a PE section table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    pub name: [u8; 8],
    /// Bytes of content (the raw data may be padded beyond it).
    pub size: u32,
    /// Where its raw data starts in the file.
    pub offset: u32,
}

/// The section table of a PE image whose headers lie within `head` (the start of the
/// file): "MZ", the PE signature where offset 0x3c points, the COFF header, the table.
pub fn pe_sections(head: &[u8]) -> Result<Vec<Section>, String> {
    let u16_at = |at: usize| -> Option<usize> {
        head.get(at..at + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let u32_at = |at: usize| -> Option<u32> {
        head.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if head.get(..2) != Some(b"MZ") {
        return Err("not a PE image: it does not start with \"MZ\"".into());
    }
    let pe = u32_at(0x3c)
        .and_then(|o| usize::try_from(o).ok())
        .ok_or("not a PE image: too short for a DOS header")?;
    if head.get(pe..pe.saturating_add(4)) != Some(b"PE\0\0") {
        return Err("not a PE image: no PE signature where offset 0x3c points".into());
    }
    let count = u16_at(pe + 6).ok_or("not a PE image: truncated COFF header")?;
    let optional = u16_at(pe + 20).ok_or("not a PE image: truncated COFF header")?;
    let table = pe + 24 + optional;
    let mut sections = Vec::with_capacity(count);
    for i in 0..count {
        let at = table + i * 40;
        let outside = || format!("the PE section table does not fit the first {HEAD_MAX} bytes");
        let name: [u8; 8] = head
            .get(at..at + 8)
            .and_then(|n| n.try_into().ok())
            .ok_or_else(outside)?;
        let virtual_size = u32_at(at + 8).ok_or_else(outside)?;
        let raw_size = u32_at(at + 16).ok_or_else(outside)?;
        let offset = u32_at(at + 20).ok_or_else(outside)?;
        let size = if virtual_size == 0 {
            raw_size
        } else {
            virtual_size.min(raw_size)
        };
        sections.push(Section { name, size, offset });
    }
    Ok(sections)
}

/// Checks that `head`, the start of a file, looks like a Unified Kernel Image: a PE
/// image (see [`pe_sections`]) with a `.linux` section.
pub fn check_uki(head: &[u8]) -> Result<(), String> {
    if pe_sections(head)?.iter().any(|s| &s.name == b".linux\0\0") {
        Ok(())
    } else {
        Err("a PE image without a .linux section: not a Unified Kernel Image".into())
    }
}

/// `IMAGE_VERSION=` of an os-release text (quotes removed), if any.
pub fn osrel_image_version(osrel: &str) -> Option<String> {
    osrel.lines().find_map(|l| {
        let v = l.trim().strip_prefix("IMAGE_VERSION=")?;
        let v = v.trim_matches(|c| c == '"' || c == '\'');
        (!v.is_empty()).then(|| v.to_string())
    })
}

/// The `IMAGE_VERSION` in a UKI's `.osrel` section (what systemd-boot orders entries
/// by), or `None` if the file is not a UKI or has none. Blocking.
pub fn image_version(path: &Path) -> io::Result<Option<String>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let mut head = Vec::new();
    (&mut f).take(HEAD_MAX as u64).read_to_end(&mut head)?;
    let Ok(sections) = pe_sections(&head) else {
        return Ok(None);
    };
    let Some(osrel) = sections.iter().find(|s| &s.name == b".osrel\0\0") else {
        return Ok(None);
    };
    f.seek(SeekFrom::Start(u64::from(osrel.offset)))?;
    let mut text = Vec::new();
    f.take(u64::from(osrel.size).min(HEAD_MAX as u64))
        .read_to_end(&mut text)?;
    Ok(osrel_image_version(&String::from_utf8_lossy(&text)))
}

/// Compares versions roughly as systemd-boot does: runs of digits numerically, runs
/// of letters as text, other characters only separate; a version that runs out first
/// is the older.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn runs(v: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut start: Option<usize> = None;
        let bytes = v.as_bytes();
        for i in 0..=bytes.len() {
            let kind = bytes.get(i).map(|c| {
                if c.is_ascii_digit() {
                    1
                } else if c.is_ascii_alphabetic() {
                    2
                } else {
                    0
                }
            });
            if let Some(s) = start {
                let prev = if bytes[s].is_ascii_digit() { 1 } else { 2 };
                if kind != Some(prev) {
                    out.push(&v[s..i]);
                    start = None;
                }
            }
            if start.is_none() && matches!(kind, Some(1 | 2)) {
                start = Some(i);
            }
        }
        out
    }
    let (ra, rb) = (runs(a), runs(b));
    for (x, y) in ra.iter().zip(&rb) {
        let numeric = x.as_bytes()[0].is_ascii_digit() && y.as_bytes()[0].is_ascii_digit();
        let o = if numeric {
            let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
            x.len().cmp(&y.len()).then_with(|| x.cmp(y))
        } else {
            x.cmp(y)
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    ra.len().cmp(&rb.len())
}

/// Our files in `dir` for `slot`, by name.
pub fn slot_files(dir: &Path, slot: Slot) -> io::Result<Vec<(String, Entry)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if let Some(e) = Entry::parse(&name).filter(|e| e.slot == slot) {
            found.push((name, e));
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

/// Makes a directory's entries (a rename, a removal) durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// What [`mark_good`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marked {
    /// The counted file was renamed to the good name.
    Renamed { from: String, to: String },
    /// The slot had no counter: it was good already.
    AlreadyGood { file: String },
}

/// Renames the running slot's counted file to its good name (and fsyncs `dir`).
pub fn mark_good(dir: &Path, slot: Slot) -> io::Result<Marked> {
    let files = slot_files(dir, slot)?;
    let good = Entry::good(slot).file_name();
    let counted: Vec<&String> = files
        .iter()
        .filter(|(_, e)| e.counter.is_some())
        .map(|(n, _)| n)
        .collect();
    match counted.as_slice() {
        [] if files.iter().any(|(n, _)| *n == good) => Ok(Marked::AlreadyGood { file: good }),
        [] => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no dosd-{slot}*.efi in {}", dir.display()),
        )),
        [from] => {
            // On vfat a rename over an existing name replaces it (a stale good file
            // of this slot from before an update that was never cleaned up).
            std::fs::rename(dir.join(from), dir.join(&good))?;
            fsync_dir(dir)?;
            Ok(Marked::Renamed {
                from: (*from).clone(),
                to: good,
            })
        }
        several => Err(io::Error::other(format!(
            "slot {slot} has several counted files ({}): cannot tell which one booted",
            several
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Where an update's bytes go before they are checked.
pub fn temp_path(dir: &Path, slot: Slot) -> PathBuf {
    dir.join(format!("dosd-{slot}.part"))
}

/// Steps 3 and 4 of an update (see the module's documentation): the checked temp file
/// becomes `dosd-<slot>+3-0.efi`, then the slot's older files go. Returns the new
/// file's name and the names removed.
pub fn commit(dir: &Path, slot: Slot, temp: &Path) -> io::Result<(String, Vec<String>)> {
    let name = Entry::fresh(slot).file_name();
    let old = slot_files(dir, slot)?;
    std::fs::rename(temp, dir.join(&name))?;
    fsync_dir(dir)?;
    let mut removed = Vec::new();
    for (n, _) in old {
        if n != name {
            std::fs::remove_file(dir.join(&n))?;
            removed.push(n);
        }
    }
    if !removed.is_empty() {
        fsync_dir(dir)?;
    }
    Ok((name, removed))
}

/// How the node updates itself (`--boot-esp`, `--boot-slot`, `--reboot-command`).
#[derive(Debug, Clone)]
pub struct BootConfig {
    /// Where the init mounted the EFI System Partition, read-write.
    pub esp: PathBuf,
    /// The slot this boot runs from.
    pub slot: Slot,
    /// Program and arguments that reboot the machine (`?reboot=true`); `None`: the
    /// operator reboots by other means.
    pub reboot_command: Option<Vec<String>>,
}

/// The boot as `/v1/node` reports it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BootView {
    /// The slot this boot runs from.
    pub slot: Slot,
    /// The running slot's file as found at start (e.g. `dosd-a+2-1.efi`), or null
    /// when none was found.
    #[schema(required = true)]
    pub booted_file: Option<String>,
    /// Whether the running slot is good (it was, or it was marked so this boot).
    pub marked_good: bool,
    /// Tries systemd-boot had left for the running slot at this boot; null when the
    /// slot was good already (not counted).
    #[schema(required = true)]
    pub tries_left: Option<u32>,
    /// The running image's `IMAGE_VERSION`, from the `.osrel` section of
    /// `booted_file` as read at start (e.g. `0.1.0.252`); null when that file has
    /// none or could not be read.
    #[schema(required = true)]
    pub image_version: Option<String>,
    /// Why the boot could not be marked good, or null.
    #[schema(required = true)]
    pub error: Option<String>,
    /// The file the last update of this run wrote into the other slot, or null.
    #[schema(required = true)]
    pub update_installed: Option<String>,
}

/// The boot slots of a running node.
#[derive(Debug)]
pub struct Boot {
    cfg: BootConfig,
    dir: PathBuf,
    view: Mutex<BootView>,
    /// One update at a time.
    updating: tokio::sync::Mutex<()>,
}

impl Boot {
    /// Looks at the ESP as this boot found it. `EFI/Linux` must be a directory.
    pub fn open(cfg: BootConfig) -> Result<Boot, String> {
        let dir = cfg.esp.join("EFI").join("Linux");
        if !dir.is_dir() {
            return Err(format!("{} is not a directory", dir.display()));
        }
        // What an update cut short by a crash left (never booted: not `*.efi`).
        for slot in [Slot::A, Slot::B] {
            let stale = temp_path(&dir, slot);
            if stale.exists() {
                match std::fs::remove_file(&stale) {
                    Ok(()) => {
                        tracing::warn!(file = %stale.display(), "removed an unfinished update")
                    }
                    Err(e) => {
                        tracing::warn!(file = %stale.display(), error = %e, "cannot remove an unfinished update")
                    }
                }
            }
        }
        let files = slot_files(&dir, cfg.slot)
            .map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let counted: Vec<_> = files.iter().filter(|(_, e)| e.counter.is_some()).collect();
        let (booted_file, tries_left, marked_good, error) = match counted.as_slice() {
            [] => match files.first() {
                Some((n, _)) => (Some(n.clone()), None, true, None),
                None => (
                    None,
                    None,
                    false,
                    Some(format!("no dosd-{}*.efi in {}", cfg.slot, dir.display())),
                ),
            },
            [(n, e)] => (Some(n.clone()), e.counter.map(|c| c.left), false, None),
            _ => (
                Some(counted[0].0.clone()),
                None,
                false,
                Some(format!("slot {} has several counted files", cfg.slot)),
            ),
        };
        // The running image's version: what systemd-boot orders by, and what an
        // update must exceed.
        let image_version = booted_file.as_ref().and_then(|n| {
            image_version(&dir.join(n)).unwrap_or_else(|e| {
                tracing::warn!(file = %n, error = %e, "cannot read the running image's version");
                None
            })
        });
        let view = BootView {
            slot: cfg.slot,
            booted_file,
            marked_good,
            tries_left,
            image_version,
            error,
            update_installed: None,
        };
        Ok(Boot {
            cfg,
            dir,
            view: Mutex::new(view),
            updating: tokio::sync::Mutex::new(()),
        })
    }

    pub fn view(&self) -> BootView {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BootView> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the running slot good (blocking file I/O), records and logs the outcome.
    pub fn mark(&self) {
        match mark_good(&self.dir, self.cfg.slot) {
            Ok(Marked::Renamed { from, to }) => {
                tracing::info!(slot = %self.cfg.slot, %from, %to, "boot marked good");
                let mut v = self.lock();
                v.marked_good = true;
                v.error = None;
            }
            Ok(Marked::AlreadyGood { file }) => {
                tracing::info!(slot = %self.cfg.slot, %file, "boot slot was good already");
                let mut v = self.lock();
                v.marked_good = true;
                v.error = None;
            }
            Err(e) => {
                tracing::error!(slot = %self.cfg.slot, error = %e, "cannot mark the boot good");
                self.lock().error = Some(format!("cannot mark the boot good: {e}"));
            }
        }
    }
}

/// Once per boot: waits for the health check to pass, then marks the running slot
/// good (see the module's documentation for what passing means).
pub(crate) async fn mark_when_healthy(shared: Arc<Shared>, boot: Arc<Boot>) {
    if boot.view().marked_good {
        return;
    }
    let mut healthy = 0;
    let mut tick = tokio::time::interval(MARK_INTERVAL);
    loop {
        tick.tick().await;
        let h = shared.monitor.assess(Instant::now());
        let passes = h.status != Status::Failing
            && h.disks_online > 0
            && !h
                .reasons
                .iter()
                .any(|r| r.kind == ReasonKind::NoDiskReports);
        healthy = if passes { healthy + 1 } else { 0 };
        if healthy >= MARK_HEALTHY_TIMES {
            tracing::info!(status = ?h.status, "health check passed: marking the boot good");
            let b = Arc::clone(&boot);
            if tokio::task::spawn_blocking(move || b.mark()).await.is_err() {
                tracing::error!("the task marking the boot good failed");
            }
            return;
        }
    }
}

/// What `POST /v1/update` wrote.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UpdateView {
    /// The slot written: the one not running.
    pub slot: Slot,
    /// The new file, relative to the ESP (e.g. `EFI/Linux/dosd-b+3-0.efi`).
    pub file: String,
    /// The image's SHA-256 (64 lowercase hex digits), as checked.
    pub sha256: String,
    pub bytes: u64,
    /// Boots systemd-boot tries the new slot before it falls back to the running one.
    pub tries: u32,
    /// `IMAGE_VERSION` from the image's `.osrel` section, or null if it has none.
    /// It must be newer than the running slot's (409 otherwise): systemd-boot boots
    /// the highest version first.
    #[schema(required = true)]
    pub image_version: Option<String>,
    /// Older files of that slot removed.
    pub removed: Vec<String>,
    /// Whether the node reboots now (`?reboot=true`).
    pub rebooting: bool,
}

/// The new image: raw bytes.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct UkiImage(Vec<u8>);

/// Query of `POST /v1/update`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UpdateParams {
    /// Reboot into the new slot after answering (needs a reboot command configured:
    /// `--reboot-command`). Default false.
    #[serde(default)]
    pub reboot: Option<bool>,
}

fn parse_sha256(headers: &HeaderMap) -> Result<[u8; 32], ApiError> {
    let v = headers.get(SHA256_HEADER).ok_or_else(|| {
        ApiError::BadRequest(
            "missing X-Update-Sha256 header: send the image's SHA-256 in hex".into(),
        )
    })?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(v.as_bytes().trim_ascii(), &mut out).map_err(|_| {
        ApiError::BadRequest("X-Update-Sha256 is not 64 hex digits (a SHA-256)".into())
    })?;
    Ok(out)
}

/// Removes the update's temp file when dropped (after a commit it is gone already).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.0) {
            Ok(()) => tracing::info!(file = %self.0.display(), "removed an update's temp file"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %self.0.display(), error = %e, "cannot remove an update's temp file")
            }
        }
    }
}

/// The temp file being written and the hash of what went into it.
struct Sink {
    file: std::fs::File,
    hasher: Sha256,
}

/// Hashes and writes `buf` on the blocking pool (the REST runtime has one thread).
async fn write_out(mut sink: Sink, mut buf: Vec<u8>) -> io::Result<(Sink, Vec<u8>)> {
    tokio::task::spawn_blocking(move || {
        sink.hasher.update(&buf);
        sink.file.write_all(&buf)?;
        buf.clear();
        Ok((sink, buf))
    })
    .await
    .map_err(|_| io::Error::other("the writing task failed"))?
}

/// Installs a new Unified Kernel Image into the A/B slot that is not running.
///
/// systemd-boot tries it on the next boots (3 tries) and falls back to the running slot if it never
/// turns good. The body is streamed to the ESP and checked (SHA-256, PE with a `.linux`
/// section) before it gets a bootable name; a running slot still on trial must be
/// marked good first.
#[utoipa::path(
    post,
    path = "/v1/update",
    params(
        ("X-Update-Sha256" = String, Header, description = "SHA-256 of the body, 64 hex digits",
            pattern = r"^[0-9a-fA-F]{64}$"),
        UpdateParams,
    ),
    request_body(content = UkiImage, description = "The new UKI, at most 256 MiB", content_type = "application/octet-stream"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Written into the other slot", body = UpdateView),
        (status = 400, description = "Missing or bad X-Update-Sha256, a body that does not match it, not a UKI, or a body cut short", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 403, description = "No token configured: mutations disabled", body = ErrorBody),
        (status = 409, description = "Updates are not possible now: no --boot-esp configured, the running slot is not marked good yet, another update is running, reboot asked without --reboot-command, or the image's IMAGE_VERSION is not newer than the running slot's", body = ErrorBody),
        (status = 413, description = "The body is over 256 MiB", body = ErrorBody),
        (status = 500, description = "Writing to the ESP failed", body = ErrorBody),
    )
)]
pub(crate) async fn update_post(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(params): Query<UpdateParams>,
    body: Body,
) -> Result<Json<UpdateView>, ApiError> {
    auth::check(
        s.cfg.token.as_deref(),
        headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
    )?;
    let expected = parse_sha256(&headers)?;
    let too_large =
        || ApiError::PayloadTooLarge(format!("the image is over {} MiB", UPDATE_MAX >> 20));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > UPDATE_MAX) {
        return Err(too_large());
    }
    let Some(boot) = s.boot.clone() else {
        return Err(ApiError::Conflict(
            "updates are disabled on this node: it was started without --boot-esp \
             (boot_esp), i.e. not as the A/B appliance"
                .into(),
        ));
    };
    if !boot.view().marked_good {
        return Err(ApiError::Conflict(format!(
            "the running slot {} is not marked good yet: it must pass its health check \
             before another update (see boot in /v1/node)",
            boot.cfg.slot
        )));
    }
    let reboot = params.reboot.unwrap_or(false);
    if reboot && boot.cfg.reboot_command.is_none() {
        return Err(ApiError::Conflict(
            "reboot=true, but no --reboot-command (reboot_command) is configured".into(),
        ));
    }
    let Ok(_guard) = boot.updating.try_lock() else {
        return Err(ApiError::Conflict("another update is running".into()));
    };
    let slot = boot.cfg.slot.other();
    let temp = TempFile(temp_path(&boot.dir, slot));
    // On any refusal or failure, and when the client goes away mid-body (the request's
    // future is dropped), `temp` removes what was written.
    let (bytes, sha256) = receive(slot, &temp.0, body, expected).await?;
    // systemd-boot boots the highest IMAGE_VERSION first: an image that is not newer
    // than the running one would never be tried.
    let (new_version, running_version) = {
        let dir = boot.dir.clone();
        let running = boot.cfg.slot;
        let t = temp.0.clone();
        tokio::task::spawn_blocking(move || {
            let new = image_version(&t).ok().flatten();
            let old = slot_files(&dir, running)
                .ok()
                .and_then(|f| f.into_iter().next())
                .and_then(|(n, _)| image_version(&dir.join(n)).ok().flatten());
            (new, old)
        })
        .await
        .map_err(|_| ApiError::Internal("the version check failed".into()))?
    };
    if let (Some(new), Some(old)) = (&new_version, &running_version) {
        if compare_versions(new, old) != std::cmp::Ordering::Greater {
            return Err(ApiError::Conflict(format!(
                "the image's IMAGE_VERSION {new:?} is not newer than the running slot's \
                 {old:?}: systemd-boot would keep booting the running slot; nothing was installed"
            )));
        }
    }
    let dir = boot.dir.clone();
    let t = temp.0.clone();
    let committed = tokio::task::spawn_blocking(move || commit(&dir, slot, &t))
        .await
        .map_err(|_| ApiError::Internal("the commit task failed".into()))?;
    let (name, removed) = committed.map_err(|e| {
        ApiError::Internal(format!("cannot install the image into slot {slot}: {e}"))
    })?;
    tracing::info!(%slot, file = %name, bytes, %sha256, ?removed, reboot, "update installed");
    boot.lock().update_installed = Some(name.clone());
    if reboot {
        if let Some(cmd) = boot.cfg.reboot_command.clone() {
            tokio::spawn(async move {
                tokio::time::sleep(REBOOT_DELAY).await;
                tracing::warn!(command = ?cmd, "rebooting into the updated slot");
                let run = tokio::task::spawn_blocking(move || {
                    let (program, args) = cmd.split_first()?;
                    Some(std::process::Command::new(program).args(args).status())
                });
                match run.await {
                    Ok(Some(Ok(status))) if status.success() => {}
                    other => tracing::error!(outcome = ?other, "the reboot command failed"),
                }
            });
        }
    }
    Ok(Json(UpdateView {
        slot,
        file: format!("EFI/Linux/{name}"),
        sha256,
        bytes,
        tries: TRIES,
        image_version: new_version,
        removed,
        rebooting: reboot,
    }))
}

/// Steps 1 and 2: streams the body into `temp`, then checks it. Returns its length
/// and SHA-256 (hex).
async fn receive(
    slot: Slot,
    temp: &Path,
    mut body: Body,
    expected: [u8; 32],
) -> Result<(u64, String), ApiError> {
    let io_err = |e: io::Error| {
        ApiError::Internal(format!(
            "cannot write {} (slot {slot}): {e}",
            temp.display()
        ))
    };
    let file = std::fs::File::create(temp).map_err(io_err)?;
    let mut sink = Sink {
        file,
        hasher: Sha256::new(),
    };
    let mut head: Vec<u8> = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(WRITE_CHUNK);
    let mut total: u64 = 0;
    loop {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                return Err(ApiError::BadRequest(format!(
                    "cannot read the request body: {e}"
                )))
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
        };
        total += data.len() as u64;
        if total > UPDATE_MAX {
            return Err(ApiError::PayloadTooLarge(format!(
                "the image is over {} MiB",
                UPDATE_MAX >> 20
            )));
        }
        if head.len() < HEAD_MAX {
            let take = (HEAD_MAX - head.len()).min(data.len());
            head.extend_from_slice(&data[..take]);
        }
        buf.extend_from_slice(&data);
        if buf.len() >= WRITE_CHUNK {
            (sink, buf) = write_out(sink, buf).await.map_err(io_err)?;
        }
    }
    let (sink, _) = write_out(sink, buf).await.map_err(io_err)?;
    let digest: [u8; 32] = sink.hasher.finalize().into();
    if digest != expected {
        return Err(ApiError::BadRequest(format!(
            "SHA-256 mismatch: the body ({total} bytes) hashes to {}, X-Update-Sha256 says {}; nothing was installed",
            hex::encode(digest),
            hex::encode(expected)
        )));
    }
    check_uki(&head)
        .map_err(|why| ApiError::BadRequest(format!("{why}; nothing was installed")))?;
    let file = sink.file;
    tokio::task::spawn_blocking(move || file.sync_all())
        .await
        .map_err(|_| io_err(io::Error::other("the fsync task failed")))?
        .map_err(io_err)?;
    Ok((total, hex::encode(digest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small PE image with the given section names (enough for [`check_uki`]).
    pub fn fake_pe(sections: &[&[u8]]) -> Vec<u8> {
        let mut f = vec![0u8; 0x80];
        f[..2].copy_from_slice(b"MZ");
        f[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        f.extend_from_slice(b"PE\0\0");
        let mut coff = [0u8; 20];
        coff[..2].copy_from_slice(&0x8664u16.to_le_bytes());
        coff[2..4].copy_from_slice(&(sections.len() as u16).to_le_bytes());
        coff[16..18].copy_from_slice(&0xf0u16.to_le_bytes());
        f.extend_from_slice(&coff);
        f.extend_from_slice(&[0u8; 0xf0]);
        for name in sections {
            let mut s = [0u8; 40];
            s[..name.len()].copy_from_slice(name);
            f.extend_from_slice(&s);
        }
        f.extend_from_slice(&[0x90; 512]);
        f
    }

    #[test]
    fn names_parse_and_print() {
        let cases = [
            ("dosd-a.efi", Slot::A, None),
            (
                "dosd-b+3-0.efi",
                Slot::B,
                Some(Counter {
                    left: 3,
                    done: Some(0),
                }),
            ),
            (
                "dosd-a+0-3.efi",
                Slot::A,
                Some(Counter {
                    left: 0,
                    done: Some(3),
                }),
            ),
            (
                "dosd-b+2.efi",
                Slot::B,
                Some(Counter {
                    left: 2,
                    done: None,
                }),
            ),
        ];
        for (name, slot, counter) in cases {
            let e = Entry::parse(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(e, Entry { slot, counter }, "{name}");
            assert_eq!(e.file_name(), name);
        }
        for bad in [
            "dosd-c.efi",
            "dosd-ab.efi",
            "dosd-a+.efi",
            "dosd-a+x-1.efi",
            "dosd-a+1-.efi",
            "dosd-a+-1-2.efi",
            "dosd-a.part",
            "dosd-a.efi.tmp",
            "linux.efi",
            "dosd-a+99999999999-0.efi",
        ] {
            assert_eq!(Entry::parse(bad), None, "{bad}");
        }
        assert_eq!(Entry::fresh(Slot::B).file_name(), "dosd-b+3-0.efi");
        assert_eq!(Entry::good(Slot::A).file_name(), "dosd-a.efi");
    }

    #[test]
    fn slot_from_the_kernel_command_line() {
        assert_eq!(
            slot_from_cmdline("console=ttyS0 quiet dosd.slot=b\n"),
            Some(Slot::B)
        );
        assert_eq!(slot_from_cmdline("dosd.slot=a dosd.slot=b"), Some(Slot::B));
        assert_eq!(slot_from_cmdline("console=ttyS0 slot=a"), None);
        assert_eq!(slot_from_cmdline("dosd.slot=c"), None);
        assert_eq!(Slot::A.other(), Slot::B);
    }

    #[test]
    fn versions_compare_like_systemd_boot() {
        use std::cmp::Ordering::*;
        for (a, b, o) in [
            ("2", "1", Greater),
            ("10", "9", Greater),
            ("1.10", "1.9", Greater),
            ("1.2", "1.2", Equal),
            ("1.2.1", "1.2", Greater),
            ("2026.11.30-2", "2026.11.30-1", Greater),
            ("007", "7", Equal),
            ("1b", "1a", Greater),
        ] {
            assert_eq!(compare_versions(a, b), o, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), o.reverse(), "{b} vs {a}");
        }
        assert_eq!(
            osrel_image_version("NAME=dosd\nIMAGE_ID=dosd\nIMAGE_VERSION=\"3\"\n"),
            Some("3".into())
        );
        assert_eq!(osrel_image_version("ID=dosd\n"), None);
    }

    /// A small PE image with an `.osrel` section holding `osrel`, and a `.linux` one.
    fn fake_uki(osrel: &[u8]) -> Vec<u8> {
        let mut pe = fake_pe(&[b".osrel", b".linux"]);
        let at = pe.len() as u32;
        // The .osrel header: size and file offset of its content.
        let sec = 0x80 + 24 + 0xf0;
        pe[sec + 8..sec + 12].copy_from_slice(&(osrel.len() as u32).to_le_bytes());
        pe[sec + 16..sec + 20].copy_from_slice(&512u32.to_le_bytes());
        pe[sec + 20..sec + 24].copy_from_slice(&at.to_le_bytes());
        pe.extend_from_slice(osrel);
        pe.extend_from_slice(&[0; 512]);
        pe
    }

    #[test]
    fn image_version_from_the_osrel_section() {
        let dir = tempfile::tempdir().unwrap();
        let pe = fake_uki(b"ID=dosd\nIMAGE_VERSION=7\n");
        let p = dir.path().join("x.efi");
        std::fs::write(&p, &pe).unwrap();
        assert_eq!(image_version(&p).unwrap(), Some("7".into()));
        std::fs::write(&p, fake_pe(&[b".linux"])).unwrap();
        assert_eq!(image_version(&p).unwrap(), None);
        std::fs::write(&p, b"not a PE").unwrap();
        assert_eq!(image_version(&p).unwrap(), None);
    }

    #[test]
    fn uki_check() {
        assert_eq!(check_uki(&fake_pe(&[b".osrel", b".linux"])), Ok(()));
        assert!(check_uki(&fake_pe(&[b".text"]))
            .unwrap_err()
            .contains(".linux"));
        assert!(check_uki(b"").is_err());
        assert!(check_uki(b"MZ").is_err());
        assert!(check_uki(&[0u8; 4096]).unwrap_err().contains("MZ"));
        let mut bad_offset = fake_pe(&[b".linux"]);
        bad_offset[0x3c..0x40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(check_uki(&bad_offset).is_err());
        // A section table running past what was kept.
        let mut many = fake_pe(&[b".linux"]);
        many[0x80 + 6..0x80 + 8].copy_from_slice(&u16::MAX.to_le_bytes());
        many[0x80 + 24 + 0xf0..0x80 + 24 + 0xf0 + 8].copy_from_slice(b".text\0\0\0");
        assert!(check_uki(&many).is_err());
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn marking_good_renames_the_counted_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("dosd-a+2-1.efi"), b"A").unwrap();
        std::fs::write(d.join("dosd-b.efi"), b"B").unwrap();
        assert_eq!(
            mark_good(d, Slot::A).unwrap(),
            Marked::Renamed {
                from: "dosd-a+2-1.efi".into(),
                to: "dosd-a.efi".into()
            }
        );
        assert_eq!(names(d), ["dosd-a.efi", "dosd-b.efi"]);
        assert_eq!(std::fs::read(d.join("dosd-a.efi")).unwrap(), b"A");
        assert_eq!(
            mark_good(d, Slot::A).unwrap(),
            Marked::AlreadyGood {
                file: "dosd-a.efi".into()
            }
        );
        assert_eq!(names(d), ["dosd-a.efi", "dosd-b.efi"]);
        // No file of the slot: an error, nothing changed.
        std::fs::remove_file(d.join("dosd-b.efi")).unwrap();
        assert!(mark_good(d, Slot::B).is_err());
        // Two counted files: which one booted is unknown; nothing is renamed.
        std::fs::write(d.join("dosd-b+1-2.efi"), b"x").unwrap();
        std::fs::write(d.join("dosd-b+3-0.efi"), b"y").unwrap();
        assert!(mark_good(d, Slot::B).is_err());
        assert_eq!(names(d), ["dosd-a.efi", "dosd-b+1-2.efi", "dosd-b+3-0.efi"]);
    }

    #[test]
    fn commit_renames_then_removes_the_old_files_of_that_slot_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("dosd-a.efi"), b"A").unwrap();
        std::fs::write(d.join("dosd-b.efi"), b"old B").unwrap();
        std::fs::write(d.join("dosd-b+0-3.efi"), b"failed B").unwrap();
        std::fs::write(d.join("unrelated.efi"), b"?").unwrap();
        let temp = temp_path(d, Slot::B);
        std::fs::write(&temp, b"new B").unwrap();
        let (name, removed) = commit(d, Slot::B, &temp).unwrap();
        assert_eq!(name, "dosd-b+3-0.efi");
        assert_eq!(removed, ["dosd-b+0-3.efi", "dosd-b.efi"]);
        assert_eq!(names(d), ["dosd-a.efi", "dosd-b+3-0.efi", "unrelated.efi"]);
        assert_eq!(std::fs::read(d.join("dosd-b+3-0.efi")).unwrap(), b"new B");
        // Again over a fresh file of the same name (an update never booted).
        std::fs::write(&temp, b"newer B").unwrap();
        let (name, removed) = commit(d, Slot::B, &temp).unwrap();
        assert_eq!(name, "dosd-b+3-0.efi");
        assert!(removed.is_empty());
        assert_eq!(std::fs::read(d.join("dosd-b+3-0.efi")).unwrap(), b"newer B");
        assert_eq!(names(d), ["dosd-a.efi", "dosd-b+3-0.efi", "unrelated.efi"]);
    }

    #[test]
    fn boot_open_reads_the_running_slot() {
        let esp = tempfile::tempdir().unwrap();
        let cfg = |slot| BootConfig {
            esp: esp.path().to_path_buf(),
            slot,
            reboot_command: None,
        };
        assert!(Boot::open(cfg(Slot::A)).is_err(), "no EFI/Linux");
        let d = esp.path().join("EFI/Linux");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("dosd-a+1-2.efi"),
            fake_uki(b"IMAGE_ID=dosd\nIMAGE_VERSION=0.1.0.252.1\n"),
        )
        .unwrap();
        std::fs::write(d.join("dosd-b.efi"), b"B").unwrap();
        std::fs::write(d.join("dosd-b.part"), b"half an update").unwrap();
        let a = Boot::open(cfg(Slot::A)).unwrap().view();
        assert!(
            !d.join("dosd-b.part").exists(),
            "an unfinished update is removed"
        );
        assert_eq!(a.booted_file.as_deref(), Some("dosd-a+1-2.efi"));
        assert_eq!(a.tries_left, Some(1));
        assert_eq!(a.image_version.as_deref(), Some("0.1.0.252.1"));
        assert!(!a.marked_good);
        // A file that is not a UKI: no version, and the boot is still reported.
        let b = Boot::open(cfg(Slot::B)).unwrap().view();
        assert!(b.marked_good);
        assert_eq!(b.tries_left, None);
        assert_eq!(b.image_version, None);
        let boot = Boot::open(cfg(Slot::A)).unwrap();
        boot.mark();
        let v = boot.view();
        assert!(v.marked_good && v.error.is_none());
        assert!(d.join("dosd-a.efi").exists());
    }
}
