//! A fault-injecting wrapper around any block device, for tests of whole nodes.
//!
//! [`crate::mem::MemDevice`] injects faults into a simulated medium, which suits the
//! store's unit tests. Integration tests run real `dosd` processes on real file disks,
//! so they need faults on top of a real backend instead: [`FaultyDevice`] wraps any
//! `Box<dyn BlockDevice>` and, when its shared [`FaultSwitch`] says so, fails reads,
//! writes and flushes with [`DevError::Injected`] without passing them to the device.
//! The switch is shared (an `Arc`) so another thread — a signal handler thread in
//! `dosd`, a test — can fail the disk while the dataplane is using it.
//!
//! What it must never do: change the bytes of an I/O it lets through, or fail one it
//! was not told to. A wrapper whose switch is never thrown behaves exactly like the
//! device inside it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::{BlockDevice, Completion, DevError, DeviceInfo, IoOp, IoTag};

/// `writes_left` when no countdown is armed.
const DISARMED: u64 = u64::MAX;

/// The control of one wrapped disk, shared between the device and whoever injects.
///
/// Once failing, the disk stays failing until [`FaultSwitch::heal`]: a real disk that
/// returned an I/O error is not trusted again either.
#[derive(Debug)]
pub struct FaultSwitch {
    failing: AtomicBool,
    /// Writes still allowed before the disk starts failing, or [`DISARMED`].
    writes_left: AtomicU64,
    /// I/Os refused so far (for logs and tests).
    injected: AtomicU64,
    /// Extra latency added to every completion, in microseconds (0: none): a slow
    /// disk, for tests that show it slows only the requests that touch it.
    latency_us: AtomicU64,
}

impl Default for FaultSwitch {
    fn default() -> Self {
        FaultSwitch {
            failing: AtomicBool::new(false),
            writes_left: AtomicU64::new(DISARMED),
            injected: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
        }
    }
}

impl FaultSwitch {
    /// A switch that lets everything through until told otherwise.
    pub fn new() -> Arc<FaultSwitch> {
        Arc::new(FaultSwitch::default())
    }

    /// Every I/O from now on fails.
    pub fn fail_now(&self) {
        self.failing.store(true, Ordering::SeqCst);
    }

    /// `n` more writes succeed; the one after them and every I/O from then on fail.
    /// (Reads and flushes keep working until then, like a disk that dies mid-write.)
    pub fn fail_after_writes(&self, n: u64) {
        self.writes_left.store(n, Ordering::SeqCst);
    }

    /// Every operation completes `latency` later than the device finished it.
    pub fn set_latency(&self, latency: std::time::Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.store(us, Ordering::SeqCst);
    }

    /// Lets everything through again and disarms any countdown.
    pub fn heal(&self) {
        self.writes_left.store(DISARMED, Ordering::SeqCst);
        self.failing.store(false, Ordering::SeqCst);
    }

    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::SeqCst)
    }

    /// How many I/Os have been refused.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// Decides one I/O: `Err` if it must fail. `write` says whether it spends one of
    /// the countdown's writes.
    fn admit(&self, offset: u64, write: bool) -> Result<(), DevError> {
        if write && !self.is_failing() {
            // Spend one write of an armed countdown; at zero the disk starts failing.
            // `fetch_update` keeps the countdown exact if the switch is re-armed from
            // another thread at the same moment.
            let spent = self
                .writes_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| match left {
                    DISARMED | 0 => None,
                    n => Some(n - 1),
                });
            if spent.is_err() && self.writes_left.load(Ordering::SeqCst) == 0 {
                self.fail_now();
            }
        }
        if self.is_failing() {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(DevError::Injected { offset });
        }
        Ok(())
    }
}

/// A block device that fails on command; see the module documentation.
pub struct FaultyDevice {
    inner: Box<dyn BlockDevice>,
    switch: Arc<FaultSwitch>,
    /// Operations refused at submission, completed (with their error) at the next poll.
    refused: Vec<Completion>,
    /// Completions held back for the switch's latency, in the order they came.
    delayed: std::collections::VecDeque<(std::time::Instant, Completion)>,
}

impl FaultyDevice {
    pub fn new(inner: Box<dyn BlockDevice>, switch: Arc<FaultSwitch>) -> FaultyDevice {
        FaultyDevice {
            inner,
            switch,
            refused: Vec::new(),
            delayed: std::collections::VecDeque::new(),
        }
    }

    pub fn switch(&self) -> &Arc<FaultSwitch> {
        &self.switch
    }
}

impl std::fmt::Debug for FaultyDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyDevice")
            .field("inner", self.inner.info())
            .field("switch", &self.switch)
            .finish()
    }
}

impl BlockDevice for FaultyDevice {
    /// The inner device's info, unchanged: reports and superblocks must not tell a
    /// wrapped disk from a plain one.
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }

    fn submit(&mut self, tag: IoTag, op: IoOp) {
        // A flush has no offset; 0 stands for "the whole device".
        let admitted = match &op {
            IoOp::Read { offset, .. } => self.switch.admit(*offset, false),
            IoOp::Write { offset, .. } => self.switch.admit(*offset, true),
            IoOp::Flush => self.switch.admit(0, false),
        };
        match admitted {
            Ok(()) => self.inner.submit(tag, op),
            Err(e) => self.refused.push(op.complete(tag, Err(e))),
        }
    }

    fn poll(&mut self, max: usize, out: &mut Vec<Completion>) -> usize {
        let n = self.refused.len().min(max);
        out.extend(self.refused.drain(..n));
        let latency = self.switch.latency_us.load(Ordering::Relaxed);
        if latency == 0 && self.delayed.is_empty() {
            return n + self.inner.poll(max - n, out);
        }
        let now = std::time::Instant::now();
        let mut got = Vec::new();
        self.inner.poll(usize::MAX, &mut got);
        let due = now + std::time::Duration::from_micros(latency);
        self.delayed.extend(got.into_iter().map(|c| (due, c)));
        let mut m = 0;
        while n + m < max && self.delayed.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, c)) = self.delayed.pop_front() {
                out.push(c);
                m += 1;
            }
        }
        n + m
    }

    fn in_flight(&self) -> usize {
        self.refused.len() + self.delayed.len() + self.inner.in_flight()
    }

    fn wait(&mut self, timeout: std::time::Duration) {
        if !self.refused.is_empty() {
            return;
        }
        match self.delayed.front() {
            Some((at, _)) => {
                let left = at.saturating_duration_since(std::time::Instant::now());
                std::thread::sleep(left.min(timeout));
            }
            None => self.inner.wait(timeout),
        }
    }

    fn health(&mut self) -> Option<Result<crate::driver::SmartLog, DevError>> {
        self.inner.health()
    }

    fn notify_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.notify_fd()
    }

    /// Refused operations and held-back completions signal nothing: poll for them.
    fn quiescent(&self) -> bool {
        self.refused.is_empty() && self.delayed.is_empty() && self.inner.quiescent()
    }

    fn drain_notify(&mut self) {
        self.inner.drain_notify()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemDisk;
    use crate::{AlignedBuf, BLOCK_SIZE};

    const B: u64 = BLOCK_SIZE as u64;

    fn device() -> (FaultyDevice, Arc<FaultSwitch>) {
        let disk = MemDisk::new(64 * B, 1);
        let switch = FaultSwitch::new();
        let dev = FaultyDevice::new(Box::new(disk.device()), Arc::clone(&switch));
        (dev, switch)
    }

    fn filled(byte: u8) -> AlignedBuf {
        let mut b = AlignedBuf::new(BLOCK_SIZE);
        b.fill(byte);
        b
    }

    #[test]
    fn passes_everything_through_until_thrown() {
        let (mut dev, switch) = device();
        assert_eq!(dev.info().backend, "memory");
        dev.write_at(3 * B, &filled(0xab)).unwrap();
        dev.flush().unwrap();
        let mut back = AlignedBuf::new(BLOCK_SIZE);
        dev.read_at(3 * B, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0xab));
        assert!(!switch.is_failing());
        assert_eq!(switch.injected(), 0);
    }

    #[test]
    fn fail_now_refuses_every_io_and_changes_nothing() {
        let (mut dev, switch) = device();
        dev.write_at(0, &filled(1)).unwrap();
        switch.fail_now();
        assert!(matches!(
            dev.write_at(0, &filled(2)),
            Err(DevError::Injected { offset: 0 })
        ));
        let mut back = AlignedBuf::new(BLOCK_SIZE);
        assert!(matches!(
            dev.read_at(B, &mut back),
            Err(DevError::Injected { offset }) if offset == B
        ));
        assert!(matches!(dev.flush(), Err(DevError::Injected { .. })));
        assert_eq!(switch.injected(), 3);
        // The refused write never reached the device.
        switch.heal();
        dev.read_at(0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 1));
        dev.write_at(0, &filled(3)).unwrap();
    }

    #[test]
    fn a_countdown_lets_n_writes_through_then_fails_everything() {
        let (mut dev, switch) = device();
        switch.fail_after_writes(2);
        let mut back = AlignedBuf::new(BLOCK_SIZE);
        for i in 0..2 {
            dev.write_at(i * B, &filled(7)).unwrap();
            // Reads and flushes do not spend the countdown.
            dev.read_at(i * B, &mut back).unwrap();
            dev.flush().unwrap();
        }
        assert!(!switch.is_failing());
        assert!(dev.write_at(2 * B, &filled(7)).is_err());
        assert!(switch.is_failing());
        assert!(dev.read_at(0, &mut back).is_err());
        assert!(dev.flush().is_err());
        // Healing disarms the countdown too.
        switch.heal();
        for i in 0..5 {
            dev.write_at(i * B, &filled(8)).unwrap();
        }
    }

    #[test]
    fn a_zero_countdown_fails_the_next_write() {
        let (mut dev, switch) = device();
        switch.fail_after_writes(0);
        let mut back = AlignedBuf::new(BLOCK_SIZE);
        dev.read_at(0, &mut back).unwrap();
        assert!(dev.write_at(0, &filled(1)).is_err());
        assert!(switch.is_failing());
    }

    #[test]
    fn latency_holds_completions_back_and_keeps_their_order() {
        let (mut dev, switch) = device();
        switch.set_latency(std::time::Duration::from_millis(30));
        let t = std::time::Instant::now();
        dev.write_at(0, &filled(5)).unwrap();
        assert!(t.elapsed() >= std::time::Duration::from_millis(30));
        let mut back = AlignedBuf::new(BLOCK_SIZE);
        dev.read_at(0, &mut back).unwrap();
        assert_eq!(back[..], filled(5)[..]);
        assert_eq!(dev.in_flight(), 0);
    }
}
