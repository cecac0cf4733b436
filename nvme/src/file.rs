//! The file and block-device backend.
//!
//! This module owns [`FileDevice`]: opening a path (a regular file, created sparse if
//! missing, or a block device), sizing it, locking it against a second process, choosing
//! between O_DIRECT and the page cache, and moving blocks through one io_uring ring —
//! or through pread/pwrite when the kernel or a sandbox refuses io_uring.
//!
//! Operations are asynchronous: [`BlockDevice::submit`] queues one (the device owns its
//! buffer from then on), and [`BlockDevice::poll`] pushes what is queued into the
//! submission ring, enters the kernel at most once, and reaps what the kernel has
//! finished. A short transfer or an interrupted one is resubmitted for the rest. The
//! kernel only ever references buffers the device owns, and the device does not give
//! one back (or drop it) before the kernel's completion for it has been reaped.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

use crate::{
    check_transfer, AlignedBuf, BlockDevice, Completion, DevError, DeviceInfo, IoKind, IoOp, IoTag,
    BLOCK_SIZE,
};

/// Submission queue depth of the per-device ring: operations in the kernel at once.
/// More wait in the device's backlog and go in as earlier ones complete.
pub const RING_ENTRIES: u32 = 128;

/// How many times in a row an operation may be interrupted (EINTR/EAGAIN) before we
/// give up and report it, so that a signal storm cannot spin a call forever.
const MAX_RETRIES: u32 = 16;

/// How to open a [`FileDevice`]. The defaults are what production wants; turning a
/// feature off is for tests and for diagnosing a misbehaving kernel or filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileOptions {
    /// Try O_DIRECT (bypass the page cache). If the filesystem refuses it the device
    /// falls back to buffered I/O anyway; `false` skips the attempt.
    pub direct: bool,
    /// Try io_uring. If the ring cannot be created the device falls back to
    /// pread/pwrite anyway; `false` skips the attempt.
    pub io_uring: bool,
}

impl Default for FileOptions {
    fn default() -> FileOptions {
        FileOptions {
            direct: true,
            io_uring: true,
        }
    }
}

/// How bytes move between the device's buffers and the file.
enum Engine {
    Uring(Box<IoUring>),
    /// Plain positioned syscalls, carried out at submission: the fallback where
    /// io_uring is unavailable (old kernels, seccomp sandboxes,
    /// `kernel.io_uring_disabled`).
    Pread,
}

/// An operation the device owns, from submission to completion.
struct Slot {
    tag: IoTag,
    kind: IoKind,
    offset: u64,
    buf: AlignedBuf,
    /// Bytes transferred so far (short transfers are resubmitted for the rest).
    done: usize,
    retries: u32,
}

/// A regular file or a block device used as a [`BlockDevice`].
///
/// Holds an exclusive `flock` on the file for its whole life so that two processes
/// (two dosd instances, or dosd and a formatting tool) never write the same disk.
pub struct FileDevice {
    // Declared before `file` so the ring is torn down before the fd it refers to is
    // closed; `Drop` reaps everything in flight first.
    engine: Engine,
    file: File,
    /// An eventfd registered with the ring: readable once a completion is posted, so
    /// an idle loop can sleep in epoll ([`BlockDevice::notify_fd`]). `None` without
    /// io_uring or where the kernel refused it.
    notify: Option<File>,
    info: DeviceInfo,
    direct: bool,
    /// Operations owned by the device, indexed by the ring's `user_data`.
    slots: Vec<Option<Slot>>,
    free_slots: Vec<u32>,
    /// Slots waiting for room in the submission ring, oldest first.
    backlog: VecDeque<u32>,
    /// Slots the kernel holds (pushed to the ring, completion not yet reaped).
    in_kernel: usize,
    /// Finished operations not yet handed out by `poll`.
    ready: VecDeque<Completion>,
    /// Completion entries copied out of the ring, reused every poll.
    cqes: Vec<(u64, i32)>,
}

impl std::fmt::Debug for FileDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let engine = match self.engine {
            Engine::Uring(_) => "io_uring",
            Engine::Pread => "pread",
        };
        f.debug_struct("FileDevice")
            .field("info", &self.info)
            .field("direct", &self.direct)
            .field("engine", &engine)
            .field("in_kernel", &self.in_kernel)
            .finish()
    }
}

impl FileDevice {
    /// Opens `path` with the default [`FileOptions`].
    ///
    /// Sizing:
    /// - a missing regular file is created and made `size_bytes` long (sparse: no
    ///   blocks are allocated until written);
    /// - an existing regular file shorter than that is grown (sparse) to it;
    /// - an existing regular file longer than that keeps its length and the device
    ///   uses all of it: shrinking would destroy data the store may still own;
    /// - a block device uses its own size and ignores `size_bytes`.
    ///
    /// The usable size is then rounded down to [`BLOCK_SIZE`] (a trailing partial
    /// block cannot be transferred). A device smaller than one block is refused.
    ///
    /// Fails with [`DevError::Open`] if the path is neither a regular file nor a block
    /// device, or if another process holds it ("already in use by another process").
    pub fn open(path: &Path, size_bytes: u64) -> Result<FileDevice, DevError> {
        Self::open_with(path, size_bytes, FileOptions::default())
    }

    /// Opens `path` as [`FileDevice::open`] does, with explicit [`FileOptions`].
    pub fn open_with(
        path: &Path,
        size_bytes: u64,
        options: FileOptions,
    ) -> Result<FileDevice, DevError> {
        Self::open_inner(path, size_bytes, options, false)
    }

    /// `simulate_direct_refusal` makes the probe read behave as if the filesystem had
    /// refused O_DIRECT, so tests can drive the fallback on filesystems (such as tmpfs
    /// on Linux 6.6 and later) that accept it.
    fn open_inner(
        path: &Path,
        size_bytes: u64,
        options: FileOptions,
        simulate_direct_refusal: bool,
    ) -> Result<FileDevice, DevError> {
        let location = path.display().to_string();
        let open_err = |source: io::Error| DevError::Open {
            path: location.clone(),
            source,
        };

        let (file, direct) = open_file(path, options.direct).map_err(open_err)?;
        // Lock before looking at or changing the size: resizing a file another
        // process is using is exactly what the lock is there to prevent.
        lock_exclusive(&file).map_err(open_err)?;
        let size = usable_size(&file, size_bytes).map_err(open_err)?;
        if size == 0 {
            return Err(open_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("device is smaller than one {BLOCK_SIZE}-byte block"),
            )));
        }

        let engine = if options.io_uring {
            match IoUring::new(RING_ENTRIES) {
                Ok(ring) => Engine::Uring(Box::new(ring)),
                Err(e) => {
                    tracing::warn!(
                        path = %location,
                        error = %e,
                        "io_uring is unavailable; falling back to pread/pwrite",
                    );
                    Engine::Pread
                }
            }
        } else {
            Engine::Pread
        };

        let notify = match &engine {
            Engine::Uring(ring) => completion_eventfd(ring, &location),
            Engine::Pread => None,
        };
        let mut dev = FileDevice {
            engine,
            file,
            notify,
            info: DeviceInfo {
                size_bytes: size,
                backend: "file",
                location: location.clone(),
            },
            direct,
            slots: Vec::new(),
            free_slots: Vec::new(),
            backlog: VecDeque::new(),
            in_kernel: 0,
            ready: VecDeque::new(),
            cqes: Vec::with_capacity(2 * RING_ENTRIES as usize),
        };

        // Some filesystems (FUSE, some network filesystems, older tmpfs via open)
        // accept O_DIRECT at open time and only refuse it on the first transfer, so
        // prove a real aligned read works before trusting the mode.
        let mut probe = AlignedBuf::new(BLOCK_SIZE);
        let mut probed = if dev.direct && simulate_direct_refusal {
            Err(DevError::Io {
                offset: 0,
                source: io::Error::from_raw_os_error(libc::EINVAL),
            })
        } else {
            dev.read_at(0, &mut probe)
        };
        if dev.direct {
            if let Err(DevError::Io { source, .. }) = &probed {
                if source.raw_os_error() == Some(libc::EINVAL) {
                    // Clear O_DIRECT on the same open file description rather than
                    // reopening: a reopen would have to drop our flock first and
                    // another process could take the disk in between.
                    clear_direct(&dev.file).map_err(open_err)?;
                    dev.direct = false;
                    warn_buffered(&location);
                    probed = dev.read_at(0, &mut probe);
                }
            }
        }
        probed.map_err(|e| {
            open_err(io::Error::other(format!(
                "probe read of block 0 failed: {e}"
            )))
        })?;

        dev.info.backend = match (&dev.engine, dev.direct) {
            (Engine::Uring(_), true) => "file",
            (Engine::Uring(_), false) => "file-buffered",
            (_, true) => "file-pread",
            (_, false) => "file-pread-buffered",
        };
        Ok(dev)
    }

    /// Another handle on the same open file, with its own ring (and eventfd): for
    /// another dataplane loop, which must not share this one's submission queue. The
    /// descriptor is duplicated, so it shares the open file description — the flock
    /// that keeps other processes off the disk, and the O_DIRECT mode chosen at open.
    pub fn another(&self) -> Result<FileDevice, DevError> {
        let location = self.info.location.clone();
        let open_err = |source: io::Error| DevError::Open {
            path: location.clone(),
            source,
        };
        let file = self.file.try_clone().map_err(open_err)?;
        let engine = match &self.engine {
            Engine::Uring(_) => {
                Engine::Uring(Box::new(IoUring::new(RING_ENTRIES).map_err(open_err)?))
            }
            Engine::Pread => Engine::Pread,
        };
        let notify = match &engine {
            Engine::Uring(ring) => completion_eventfd(ring, &location),
            Engine::Pread => None,
        };
        Ok(FileDevice {
            engine,
            file,
            notify,
            info: self.info.clone(),
            direct: self.direct,
            slots: Vec::new(),
            free_slots: Vec::new(),
            backlog: VecDeque::new(),
            in_kernel: 0,
            ready: VecDeque::new(),
            cqes: Vec::with_capacity(2 * RING_ENTRIES as usize),
        })
    }

    /// The backend name also found in [`DeviceInfo::backend`]: `file` (io_uring,
    /// O_DIRECT), `file-buffered` (io_uring, page cache), `file-pread` (pread/pwrite,
    /// O_DIRECT) or `file-pread-buffered`.
    pub fn backend_kind(&self) -> &'static str {
        self.info.backend
    }

    /// Whether transfers bypass the page cache. When false, durability rests on
    /// fdatasync in [`BlockDevice::flush`] alone.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Takes a slot for an operation.
    fn slot_for(&mut self, slot: Slot) -> u32 {
        match self.free_slots.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Finishes a slot's operation with `result`.
    fn finish(&mut self, i: u32, result: Result<(), DevError>) {
        if let Some(s) = self.slots[i as usize].take() {
            self.free_slots.push(i);
            self.ready.push_back(Completion {
                tag: s.tag,
                kind: s.kind,
                offset: s.offset,
                buf: s.buf,
                result,
            });
        }
    }

    /// Carries out a slot's operation with positioned syscalls, now.
    fn run_pread(&mut self, i: u32) {
        let Some(s) = self.slots[i as usize].as_mut() else {
            return;
        };
        let result = match s.kind {
            IoKind::Read => self.file.read_exact_at(&mut s.buf[..], s.offset),
            IoKind::Write => self.file.write_all_at(&s.buf[..], s.offset),
            IoKind::Flush => self.file.sync_data(),
        };
        let offset = s.offset;
        self.finish(i, result.map_err(|source| DevError::Io { offset, source }));
    }

    /// The ring entry for what is left of a slot's operation.
    fn entry(&self, i: u32) -> Option<squeue::Entry> {
        let s = self.slots[i as usize].as_ref()?;
        let fd = types::Fd(self.file.as_raw_fd());
        let rest = s.buf.len() - s.done;
        let at = s.offset + s.done as u64;
        // `rest` fits a u32: one operation is at most a few MiB (the store's largest
        // record), checked at submission against MAX_OP_BYTES.
        let ptr = s.buf.as_ptr().wrapping_add(s.done).cast_mut();
        let e = match s.kind {
            IoKind::Read => opcode::Read::new(fd, ptr, rest as u32).offset(at).build(),
            IoKind::Write => opcode::Write::new(fd, ptr.cast_const(), rest as u32)
                .offset(at)
                .build(),
            IoKind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        Some(e.user_data(u64::from(i)))
    }

    /// Pushes backlog into the submission ring and enters the kernel once if anything
    /// was pushed. Returns whether the kernel was entered.
    fn push_backlog(&mut self) {
        let Engine::Uring(_) = &self.engine else {
            return;
        };
        let mut pushed = 0usize;
        while let Some(&i) = self.backlog.front() {
            let Some(entry) = self.entry(i) else {
                self.backlog.pop_front();
                continue;
            };
            let Engine::Uring(ring) = &mut self.engine else {
                return;
            };
            // SAFETY: the entry points into the buffer of slot `i`, which the device
            // owns and neither moves (an AlignedBuf's heap block stays put when the
            // struct moves) nor frees until the completion for `user_data = i` has
            // been reaped (`reap`; `Drop` reaps everything before freeing).
            let full = unsafe { ring.submission().push(&entry) }.is_err();
            if full {
                break;
            }
            self.backlog.pop_front();
            self.in_kernel += 1;
            pushed += 1;
        }
        if pushed == 0 {
            return;
        }
        let Engine::Uring(ring) = &mut self.engine else {
            return;
        };
        // One enter for the whole batch, without waiting. Entries the kernel did not
        // take stay in the ring and go in with the next enter; a failing enter is
        // retried next poll (the kernel owns nothing it did not consume).
        if let Err(e) = ring.submit() {
            if !is_transient(&e) {
                tracing::warn!(location = %self.info.location, error = %e, "io_uring enter failed; retrying next poll");
            }
        }
    }

    /// Moves the kernel's finished operations into `ready`, resubmitting the rest of
    /// short or interrupted transfers.
    fn reap(&mut self) {
        let Engine::Uring(ring) = &mut self.engine else {
            return;
        };
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        for cqe in ring.completion() {
            cqes.push((cqe.user_data(), cqe.result()));
        }
        for &(user_data, res) in &cqes {
            self.in_kernel = self.in_kernel.saturating_sub(1);
            let i = user_data as u32;
            let Some(s) = self.slots.get_mut(i as usize).and_then(|s| s.as_mut()) else {
                continue;
            };
            let offset = s.offset;
            if res < 0 {
                let err = io::Error::from_raw_os_error(-res);
                // Only interruptions are retried for a flush: after a real fdatasync
                // failure the kernel may have dropped the dirty pages, so a retry that
                // "succeeds" would lie about durability.
                let retry = if s.kind == IoKind::Flush {
                    err.kind() == io::ErrorKind::Interrupted
                } else {
                    is_transient(&err)
                };
                if retry && s.retries < MAX_RETRIES {
                    s.retries += 1;
                    self.backlog.push_back(i);
                } else {
                    self.finish(
                        i,
                        Err(DevError::Io {
                            offset,
                            source: err,
                        }),
                    );
                }
                continue;
            }
            if s.kind == IoKind::Flush {
                self.finish(i, Ok(()));
                continue;
            }
            let n = res as usize;
            let len = s.buf.len();
            if n == 0 {
                let done = s.done;
                self.finish(i, Err(DevError::Short { offset, done, len }));
                continue;
            }
            s.done = (s.done + n).min(len);
            s.retries = 0;
            if s.done < len {
                self.backlog.push_back(i);
            } else {
                self.finish(i, Ok(()));
            }
        }
        self.cqes = cqes;
    }
}

/// Largest single operation: io_uring lengths are `u32`.
const MAX_OP_BYTES: usize = 1 << 30;

impl BlockDevice for FileDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, tag: IoTag, op: IoOp) {
        let checked = match &op {
            IoOp::Read { offset, buf } | IoOp::Write { offset, buf } => {
                check_transfer(*offset, buf, self.info.size_bytes).and_then(|()| {
                    if buf.len() > MAX_OP_BYTES {
                        Err(DevError::OutOfRange {
                            offset: *offset,
                            len: buf.len(),
                            size: MAX_OP_BYTES as u64,
                        })
                    } else {
                        Ok(())
                    }
                })
            }
            IoOp::Flush => Ok(()),
        };
        if let Err(e) = checked {
            self.ready.push_back(op.complete(tag, Err(e)));
            return;
        }
        let (kind, offset, buf) = op.into_parts();
        let i = self.slot_for(Slot {
            tag,
            kind,
            offset,
            buf,
            done: 0,
            retries: 0,
        });
        match self.engine {
            Engine::Uring(_) => self.backlog.push_back(i),
            Engine::Pread => self.run_pread(i),
        }
    }

    fn poll(&mut self, max: usize, out: &mut Vec<Completion>) -> usize {
        self.reap();
        self.push_backlog();
        let n = self.ready.len().min(max);
        out.extend(self.ready.drain(..n));
        n
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len() + self.ready.len()
    }

    fn notify_fd(&self) -> Option<std::os::fd::RawFd> {
        self.notify.as_ref().map(|f| f.as_raw_fd())
    }

    fn quiescent(&self) -> bool {
        self.notify.is_some() && self.backlog.is_empty() && self.ready.is_empty()
    }

    fn drain_notify(&mut self) {
        if let Some(f) = self.notify.as_mut() {
            // Non-blocking: 8 bytes of counter, or EAGAIN if already empty.
            let mut count = [0u8; 8];
            let _ = io::Read::read(f, &mut count);
        }
    }

    fn wait(&mut self, _timeout: Duration) {
        if !self.ready.is_empty() {
            return;
        }
        self.push_backlog();
        if self.in_kernel == 0 {
            return;
        }
        if let Engine::Uring(ring) = &self.engine {
            // File I/O always completes, so waiting for one completion is bounded by
            // the device; the timeout only matters to backends that can hang.
            if let Err(e) = ring.submit_and_wait(1) {
                if !is_transient(&e) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}

impl Drop for FileDevice {
    /// Reaps every operation the kernel still holds before the buffers are freed.
    fn drop(&mut self) {
        self.backlog.clear();
        let mut rounds = 0u32;
        while self.in_kernel > 0 {
            if let Engine::Uring(ring) = &self.engine {
                let _ = ring.submit_and_wait(1);
            }
            self.reap();
            self.backlog.clear();
            rounds += 1;
            if rounds > 100_000 {
                // The kernel never answered: leaking the buffers is the only safe
                // thing left (it may still write into them).
                tracing::error!(location = %self.info.location, "io_uring operations never completed; leaking their buffers");
                for s in self.slots.drain(..) {
                    std::mem::forget(s);
                }
                break;
            }
        }
    }
}

/// An eventfd the ring signals on every completion, or `None` (logged) if the kernel
/// will not make or register one: the device is then polled, which is correct, only
/// busier.
fn completion_eventfd(ring: &IoUring, location: &str) -> Option<File> {
    // SAFETY: eventfd(2) takes no pointers; it returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        tracing::warn!(path = %location, error = %io::Error::last_os_error(), "no eventfd for io_uring completions; the device will be polled");
        return None;
    }
    // SAFETY: `fd` was just returned by eventfd(2) and nothing else owns it: the File
    // takes sole ownership and closes it once.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    match ring.submitter().register_eventfd(file.as_raw_fd()) {
        Ok(()) => Some(file),
        Err(e) => {
            tracing::warn!(path = %location, error = %e, "cannot register an eventfd with io_uring; the device will be polled");
            None
        }
    }
}

fn open_file(path: &Path, direct: bool) -> io::Result<(File, bool)> {
    let mut opts = OpenOptions::new();
    // No truncate: an existing file or disk holds the store's data.
    opts.read(true).write(true).create(true);
    if direct {
        let mut direct_opts = opts.clone();
        direct_opts.custom_flags(libc::O_DIRECT);
        match direct_opts.open(path) {
            Ok(file) => return Ok((file, true)),
            // EINVAL from open with O_DIRECT means the filesystem does not support it.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                warn_buffered(&path.display().to_string())
            }
            Err(e) => return Err(e),
        }
    }
    Ok((opts.open(path)?, false))
}

fn warn_buffered(location: &str) {
    tracing::warn!(
        path = %location,
        "O_DIRECT is unavailable on this filesystem; using the page cache, durability relies on fdatasync",
    );
}

/// Takes the exclusive, non-blocking flock that keeps other processes off this disk.
/// flock (not fcntl locks) because it belongs to the open file description: it is
/// released exactly when this device's fd closes, and a second open in the same
/// process conflicts too.
///
/// A holder that was just killed may keep the lock for a moment: the kernel tears down
/// a dead process's io_uring (and with it the ring's file references) asynchronously,
/// after the process has been reaped. So a held lock is retried for a bounded time
/// before the disk is declared in use.
fn lock_exclusive(file: &File) -> io::Result<()> {
    const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
    const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(20);
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(LOCK_RETRY);
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "already in use by another process (an exclusive flock is held on it)",
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// Works out (and for regular files, establishes) the usable size; see
/// [`FileDevice::open`] for the rules.
fn usable_size(file: &File, size_bytes: u64) -> io::Result<u64> {
    let round = |n: u64| n - n % BLOCK_SIZE as u64;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if kind.is_block_device() {
        // lseek(SEEK_END) on a Linux block device returns its size in bytes, the same
        // value as the BLKGETSIZE64 ioctl, without an unsafe ioctl whose request
        // number differs between architectures.
        let mut f = file;
        return Ok(round(f.seek(SeekFrom::End(0))?));
    }
    if !kind.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or a block device",
        ));
    }
    let want = round(size_bytes);
    let have = meta.len();
    if have < want {
        // set_len extends with a hole: sparse, nothing allocated until written.
        file.set_len(want)?;
        Ok(want)
    } else {
        Ok(round(have))
    }
}

/// Turns O_DIRECT off on an open fd (Linux lets F_SETFL change it).
fn clear_direct(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on an fd we own reads its status flags and touches no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on an fd we own with an integer argument touches no memory.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    ) || e.kind() == io::ErrorKind::Interrupted
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    fn pattern(len: usize, seed: u8) -> AlignedBuf {
        let mut buf = AlignedBuf::new(len);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        buf
    }

    fn round_trip(dev: &mut FileDevice) {
        let size = dev.info().size_bytes;
        let cases: [(u64, usize, u8); 5] = [
            (0, BLOCK_SIZE, 1),
            (BLOCK_SIZE as u64, 3 * BLOCK_SIZE, 2),
            (64 * 1024, 16 * BLOCK_SIZE, 3),
            (size / 2, BLOCK_SIZE, 4),
            (size - BLOCK_SIZE as u64, BLOCK_SIZE, 5),
        ];
        for &(offset, len, seed) in &cases {
            dev.write_at(offset, &pattern(len, seed)).unwrap();
        }
        dev.flush().unwrap();
        for &(offset, len, seed) in &cases {
            let mut got = AlignedBuf::new(len);
            dev.read_at(offset, &mut got).unwrap();
            assert_eq!(&got[..], &pattern(len, seed)[..], "offset {offset}");
        }
    }

    #[test]
    fn round_trip_at_several_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = FileDevice::open(&dir.path().join("disk"), 4 * MIB).unwrap();
        assert_eq!(dev.info().size_bytes, 4 * MIB);
        assert_eq!(
            dev.info().location,
            dir.path().join("disk").display().to_string()
        );
        round_trip(&mut dev);
    }

    #[test]
    fn round_trip_through_pread_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let opts = FileOptions {
            direct: true,
            io_uring: false,
        };
        let mut dev = FileDevice::open_with(&dir.path().join("disk"), MIB, opts).unwrap();
        assert!(
            dev.backend_kind().starts_with("file-pread"),
            "{}",
            dev.backend_kind()
        );
        round_trip(&mut dev);
    }

    #[test]
    fn round_trip_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let opts = FileOptions {
            direct: false,
            io_uring: true,
        };
        let mut dev = FileDevice::open_with(&dir.path().join("disk"), MIB, opts).unwrap();
        assert!(!dev.is_direct());
        assert!(
            dev.backend_kind().ends_with("buffered"),
            "{}",
            dev.backend_kind()
        );
        round_trip(&mut dev);
    }

    #[test]
    fn rejects_misaligned_and_out_of_range() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = FileDevice::open(&dir.path().join("disk"), MIB).unwrap();
        let mut buf = AlignedBuf::new(2 * BLOCK_SIZE);

        let misaligned = |r: Result<(), DevError>| matches!(r, Err(DevError::Misaligned { .. }));
        assert!(misaligned(dev.read_at(1, &mut buf[..BLOCK_SIZE])));
        assert!(misaligned(dev.read_at(0, &mut buf[..BLOCK_SIZE - 1])));
        assert!(misaligned(dev.read_at(0, &mut buf[1..BLOCK_SIZE + 1])));
        assert!(misaligned(dev.write_at(512, &buf[..BLOCK_SIZE])));
        assert!(misaligned(dev.write_at(0, &buf[..100])));
        assert!(misaligned(dev.write_at(0, &buf[8..BLOCK_SIZE + 8])));

        let out = |r: Result<(), DevError>| matches!(r, Err(DevError::OutOfRange { .. }));
        assert!(out(dev.read_at(MIB, &mut buf[..BLOCK_SIZE])));
        assert!(out(dev.read_at(MIB - BLOCK_SIZE as u64, &mut buf)));
        assert!(out(dev.write_at(MIB, &buf[..BLOCK_SIZE])));
        let near_max = u64::MAX - (u64::MAX % BLOCK_SIZE as u64);
        assert!(out(dev.write_at(near_max, &buf)));
    }

    #[test]
    fn creates_sparse_file_of_asked_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let dev = FileDevice::open(&path, 64 * MIB).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 * MIB);
        assert_eq!(dev.info().size_bytes, 64 * MIB);
        // st_blocks counts 512-byte units actually allocated.
        assert!(
            meta.blocks() * 512 < MIB,
            "allocated {} blocks",
            meta.blocks()
        );
    }

    #[test]
    fn sizes_round_down_grow_and_never_shrink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let dev = FileDevice::open(&path, MIB + 100).unwrap();
        assert_eq!(dev.info().size_bytes, MIB);
        drop(dev);
        // Asking for more grows the file.
        let dev = FileDevice::open(&path, 2 * MIB).unwrap();
        assert_eq!(dev.info().size_bytes, 2 * MIB);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * MIB);
        drop(dev);
        // Asking for less keeps the existing size.
        let dev = FileDevice::open(&path, MIB).unwrap();
        assert_eq!(dev.info().size_bytes, 2 * MIB);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * MIB);
        drop(dev);
        // A file whose length is not a whole number of blocks uses the whole blocks.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(2 * MIB + 10)
            .unwrap();
        let dev = FileDevice::open(&path, MIB).unwrap();
        assert_eq!(dev.info().size_bytes, 2 * MIB);
    }

    #[test]
    fn refuses_less_than_a_block() {
        let dir = tempfile::tempdir().unwrap();
        let err = FileDevice::open(&dir.path().join("disk"), 100).unwrap_err();
        assert!(matches!(err, DevError::Open { .. }), "{err}");
    }

    #[test]
    fn refuses_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = FileDevice::open(dir.path(), MIB).unwrap_err();
        assert!(matches!(err, DevError::Open { .. }), "{err}");
    }

    #[test]
    fn reopen_sees_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let data = pattern(2 * BLOCK_SIZE, 9);
        {
            let mut dev = FileDevice::open(&path, MIB).unwrap();
            dev.write_at(8 * BLOCK_SIZE as u64, &data).unwrap();
            dev.flush().unwrap();
        }
        let mut dev = FileDevice::open(&path, MIB).unwrap();
        let mut got = AlignedBuf::new(2 * BLOCK_SIZE);
        dev.read_at(8 * BLOCK_SIZE as u64, &mut got).unwrap();
        assert_eq!(&got[..], &data[..]);
        // Never-written blocks read as zeros.
        dev.read_at(0, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == 0));
    }

    #[test]
    fn second_open_is_refused_while_first_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let first = FileDevice::open(&path, MIB).unwrap();
        let err = FileDevice::open(&path, MIB).unwrap_err();
        let DevError::Open { path: p, source } = &err else {
            panic!("expected DevError::Open, got {err:?}");
        };
        assert_eq!(p, &path.display().to_string());
        assert_eq!(source.kind(), io::ErrorKind::WouldBlock);
        assert!(
            err.to_string()
                .contains("already in use by another process"),
            "{err}"
        );
        // The refused open must not have resized the file.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), MIB);
        drop(first);
        FileDevice::open(&path, MIB).unwrap();
    }

    /// Whether this kernel refuses O_DIRECT on files in `dir` at open time.
    fn refuses_direct(dir: &Path) -> bool {
        let probe = dir.join("direct-probe");
        let res = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe);
        let _ = std::fs::remove_file(&probe);
        matches!(res, Err(e) if e.raw_os_error() == Some(libc::EINVAL))
    }

    #[test]
    fn tmpfs_round_trips_with_or_without_direct() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            eprintln!("skipping: no /dev/shm");
            return;
        }
        let dir = tempfile::tempdir_in(shm).unwrap();
        let mut dev = FileDevice::open(&dir.path().join("disk"), MIB).unwrap();
        // tmpfs refused O_DIRECT until Linux 6.6; newer kernels accept it.
        let expected = if refuses_direct(dir.path()) {
            "file-buffered"
        } else {
            "file"
        };
        if dev.info().backend.starts_with("file-pread") {
            // io_uring unavailable in this sandbox: the engine changed, not the mode.
            assert_eq!(dev.is_direct(), expected == "file");
        } else {
            assert_eq!(dev.info().backend, expected);
        }
        round_trip(&mut dev);
    }

    #[test]
    fn direct_refused_by_probe_falls_back_to_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let mut dev = FileDevice::open_inner(&path, MIB, FileOptions::default(), true).unwrap();
        assert!(!dev.is_direct());
        assert!(
            dev.backend_kind().ends_with("buffered"),
            "{}",
            dev.backend_kind()
        );
        // O_DIRECT really is off on the fd.
        // SAFETY: F_GETFL on an fd owned by `dev` touches no memory.
        let flags = unsafe { libc::fcntl(dev.file.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_DIRECT, 0);
        round_trip(&mut dev);
        // The lock survived the switch: no reopen happened.
        assert!(FileDevice::open(&path, MIB).is_err());
    }

    /// Exercises a real block device when one is named (for example a loop device set
    /// up by hand): `DOSD_TEST_BLOCKDEV=/dev/loop0 cargo test -p nvme -- --ignored`.
    /// It overwrites the start and the end of that device.
    #[test]
    #[ignore]
    fn block_device_uses_its_own_size() {
        let Ok(path) = std::env::var("DOSD_TEST_BLOCKDEV") else {
            eprintln!("skipping: DOSD_TEST_BLOCKDEV not set");
            return;
        };
        let mut dev = FileDevice::open(Path::new(&path), 1).unwrap();
        assert!(dev.info().size_bytes >= 2 * BLOCK_SIZE as u64);
        assert_eq!(dev.info().size_bytes % BLOCK_SIZE as u64, 0);
        round_trip(&mut dev);
    }

    #[test]
    fn many_operations_in_flight_complete_with_their_own_data() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = FileDevice::open(&dir.path().join("d"), 16 * MIB).unwrap();
        // 300 writes: more than the ring holds, so some wait in the backlog.
        let n = 300u64;
        for i in 0..n {
            dev.submit(
                IoTag(i),
                IoOp::Write {
                    offset: i * BLOCK_SIZE as u64,
                    buf: pattern(BLOCK_SIZE, i as u8),
                },
            );
        }
        let mut done = Vec::new();
        for _ in 0..100_000 {
            dev.poll(64, &mut done);
            if dev.in_flight() == 0 {
                break;
            }
            dev.wait(Duration::from_millis(10));
        }
        assert_eq!(done.len(), n as usize);
        assert!(done
            .iter()
            .all(|c| c.result.is_ok() && c.kind == IoKind::Write));
        dev.submit(IoTag(n), IoOp::Flush);
        for i in 0..n {
            dev.submit(
                IoTag(i),
                IoOp::Read {
                    offset: i * BLOCK_SIZE as u64,
                    buf: AlignedBuf::new(BLOCK_SIZE),
                },
            );
        }
        let mut back = Vec::new();
        for _ in 0..100_000 {
            dev.poll(64, &mut back);
            if dev.in_flight() == 0 {
                break;
            }
            dev.wait(Duration::from_millis(10));
        }
        assert_eq!(back.len(), n as usize + 1);
        for c in back {
            c.result.unwrap();
            if c.kind == IoKind::Read {
                assert_eq!(c.buf[..], pattern(BLOCK_SIZE, c.tag.0 as u8)[..]);
            }
        }
    }

    #[test]
    fn a_bad_submission_completes_with_its_error_and_its_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = FileDevice::open(&dir.path().join("d"), MIB).unwrap();
        dev.submit(
            IoTag(1),
            IoOp::Read {
                offset: MIB,
                buf: AlignedBuf::new(BLOCK_SIZE),
            },
        );
        let mut out = Vec::new();
        dev.poll(8, &mut out);
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0].result, Err(DevError::OutOfRange { .. })));
        assert_eq!(out[0].buf.len(), BLOCK_SIZE);
    }

    #[test]
    fn completions_signal_the_eventfd_so_a_loop_can_sleep() {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = FileDevice::open(&dir.path().join("d"), MIB).unwrap();
        if !matches!(dev.engine, Engine::Uring(_)) {
            eprintln!("no io_uring here: nothing to signal");
            return;
        }
        assert!(dev.notify_fd().is_some());
        let mut fd = dev.notify.as_ref().unwrap().try_clone().unwrap();
        dev.drain_notify();
        dev.submit(
            IoTag(1),
            IoOp::Read {
                offset: 0,
                buf: AlignedBuf::new(BLOCK_SIZE),
            },
        );
        // Queued, not yet in the kernel: the owner must poll, not sleep.
        assert!(!dev.quiescent());
        let mut out = Vec::new();
        dev.poll(8, &mut out);
        while dev.in_flight() > 0 && out.is_empty() {
            dev.wait(Duration::from_millis(10));
            dev.poll(8, &mut out);
        }
        assert_eq!(out.len(), 1);
        let mut count = [0u8; 8];
        io::Read::read_exact(&mut fd, &mut count).unwrap();
        assert!(u64::from_ne_bytes(count) >= 1, "no completion signalled");
        assert!(dev.quiescent() || dev.in_flight() == 0);
    }
}
