//! A window of a device: `len` bytes starting at `base`, seen as a device of its own.
//!
//! The store carves each disk into one region per dataplane loop (its own log space,
//! see the dataplane's `store::label`), and each loop opens the disk through its own
//! queue pair or ring. A [`Region`] adds `base` to every offset on the way in and
//! subtracts it from completions on the way out, so the store above never knows it
//! shares the disk; an operation that would leave the window completes with
//! [`DevError::OutOfRange`] without reaching the device.

use crate::{check_transfer, BlockDevice, Completion, DevError, DeviceInfo, IoOp, IoTag};

/// `len` bytes of `dev` from `base`.
pub struct Region<D: BlockDevice> {
    dev: D,
    base: u64,
    info: DeviceInfo,
    /// Operations refused before reaching the device, returned by the next `poll`.
    refused: Vec<Completion>,
}

impl<D: BlockDevice> std::fmt::Debug for Region<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("base", &self.base)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl<D: BlockDevice> Region<D> {
    /// The window `[base, base + len)` of `dev`. Both must be multiples of
    /// [`crate::BLOCK_SIZE`] and the window must lie inside the device.
    pub fn new(dev: D, base: u64, len: u64) -> Result<Self, DevError> {
        let size = dev.info().size_bytes;
        let block = crate::BLOCK_SIZE as u64;
        if !base.is_multiple_of(block) || !len.is_multiple_of(block) || len == 0 {
            return Err(DevError::Misaligned {
                offset: base,
                len: usize::try_from(len).unwrap_or(usize::MAX),
            });
        }
        if base.checked_add(len).is_none_or(|end| end > size) {
            return Err(DevError::OutOfRange {
                offset: base,
                len: usize::try_from(len).unwrap_or(usize::MAX),
                size,
            });
        }
        let info = DeviceInfo {
            size_bytes: len,
            backend: dev.info().backend,
            location: format!("{}@{}+{}", dev.info().location, base, len),
        };
        Ok(Region {
            dev,
            base,
            info,
            refused: Vec::new(),
        })
    }

    /// Where the window starts on the device.
    pub fn base(&self) -> u64 {
        self.base
    }
}

impl<D: BlockDevice> BlockDevice for Region<D> {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, tag: IoTag, op: IoOp) {
        let op = match op {
            IoOp::Read { offset, buf } => {
                match check_transfer(offset, &buf, self.info.size_bytes) {
                    Ok(()) => IoOp::Read {
                        offset: offset + self.base,
                        buf,
                    },
                    Err(e) => {
                        return self
                            .refused
                            .push(IoOp::Read { offset, buf }.complete(tag, Err(e)))
                    }
                }
            }
            IoOp::Write { offset, buf } => {
                match check_transfer(offset, &buf, self.info.size_bytes) {
                    Ok(()) => IoOp::Write {
                        offset: offset + self.base,
                        buf,
                    },
                    Err(e) => {
                        return self
                            .refused
                            .push(IoOp::Write { offset, buf }.complete(tag, Err(e)))
                    }
                }
            }
            IoOp::Flush => IoOp::Flush,
        };
        self.dev.submit(tag, op);
    }

    fn poll(&mut self, max: usize, out: &mut Vec<Completion>) -> usize {
        let mut n = 0;
        while n < max {
            let Some(c) = self.refused.pop() else { break };
            out.push(c);
            n += 1;
        }
        let from = out.len();
        n += self.dev.poll(max - n, out);
        for c in &mut out[from..] {
            if c.kind != crate::IoKind::Flush {
                c.offset = c.offset.saturating_sub(self.base);
            }
            rebase_error(&mut c.result, self.base);
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.dev.in_flight() + self.refused.len()
    }

    fn wait(&mut self, timeout: std::time::Duration) {
        if self.refused.is_empty() {
            self.dev.wait(timeout);
        }
    }

    fn health(&mut self) -> Option<Result<crate::driver::SmartLog, DevError>> {
        self.dev.health()
    }

    fn notify_fd(&self) -> Option<std::os::fd::RawFd> {
        self.dev.notify_fd()
    }

    fn quiescent(&self) -> bool {
        self.refused.is_empty() && self.dev.quiescent()
    }

    fn drain_notify(&mut self) {
        self.dev.drain_notify()
    }
}

/// Error offsets are reported as the region sees them.
fn rebase_error(result: &mut Result<(), DevError>, base: u64) {
    if let Err(
        DevError::Io { offset, .. }
        | DevError::Misaligned { offset, .. }
        | DevError::OutOfRange { offset, .. }
        | DevError::Short { offset, .. }
        | DevError::Injected { offset }
        | DevError::Nvme { offset, .. },
    ) = result
    {
        *offset = offset.saturating_sub(base);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemDisk;
    use crate::{AlignedBuf, BLOCK_SIZE};

    #[test]
    fn a_region_is_a_window_of_the_device() {
        let disk = MemDisk::new(16 * BLOCK_SIZE as u64, 1);
        let bs = BLOCK_SIZE as u64;
        let mut a = Region::new(disk.device(), 4 * bs, 4 * bs).unwrap();
        let mut b = Region::new(disk.device(), 8 * bs, 8 * bs).unwrap();
        assert_eq!(a.info().size_bytes, 4 * bs);
        let mut buf = AlignedBuf::new(BLOCK_SIZE);
        buf.fill(0xA5);
        a.write_at(bs, &buf).unwrap();
        a.flush().unwrap();
        // The write landed at block 5 of the device, not in b's window.
        let mut whole = disk.device();
        let mut got = AlignedBuf::new(BLOCK_SIZE);
        whole.read_at(5 * bs, &mut got).unwrap();
        assert!(got.iter().all(|&x| x == 0xA5));
        b.read_at(0, &mut got).unwrap();
        assert!(got.iter().all(|&x| x == 0));
        // Past the window: refused with the region's own offsets, device untouched.
        match a.write_at(4 * bs, &buf) {
            Err(DevError::OutOfRange { offset, size, .. }) => {
                assert_eq!((offset, size), (4 * bs, 4 * bs))
            }
            other => panic!("expected OutOfRange, got {other:?}"),
        }
        whole.read_at(8 * bs, &mut got).unwrap();
        assert!(got.iter().all(|&x| x == 0));
    }

    #[test]
    fn a_window_outside_the_device_is_refused() {
        let disk = MemDisk::new(4 * BLOCK_SIZE as u64, 1);
        let bs = BLOCK_SIZE as u64;
        assert!(Region::new(disk.device(), 2 * bs, 4 * bs).is_err());
        assert!(Region::new(disk.device(), 100, bs).is_err());
        assert!(Region::new(disk.device(), 0, 4 * bs).is_ok());
    }
}
