//! Decoding of the data structures the controller returns: Identify Controller,
//! Identify Namespace, the SMART / Health Information log page and Error Information
//! log entries (NVMe Base 2.0 §5.17.2 "Identify Controller data structure" and the
//! NVM Command Set's "Identify Namespace data structure"; §5.16.1 log pages).
//!
//! Pure functions over byte buffers, so they are tested on the host; every field is
//! read with bounds checks and no value the controller returns can make them panic.

/// What the driver needs from Identify Controller (CNS 01h).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerInfo {
    pub vendor_id: u16,
    /// Serial number, bytes 23:04, ASCII, trailing spaces removed.
    pub serial: String,
    /// Model number, bytes 63:24.
    pub model: String,
    /// Firmware revision, bytes 71:64.
    pub firmware: String,
    /// Maximum Data Transfer Size, byte 77: a power of two in units of the minimum
    /// memory page size; 0 means no limit.
    pub mdts: u8,
    pub controller_id: u16,
    /// Number of namespaces, bytes 519:516.
    pub namespaces: u32,
    /// Optional NVM Command Support, bytes 521:520.
    pub oncs: u16,
    /// Volatile Write Cache present, byte 525 bit 0.
    pub volatile_write_cache: bool,
}

impl ControllerInfo {
    pub fn supports_dataset_management(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }

    pub fn supports_write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }

    /// MDTS in bytes for a minimum page size of `min_page` bytes; 0 = no limit.
    pub fn mdts_bytes(&self, min_page: u64) -> u64 {
        if self.mdts == 0 {
            0
        } else {
            min_page.checked_shl(u32::from(self.mdts)).unwrap_or(0)
        }
    }
}

/// What the driver needs from Identify Namespace (CNS 00h).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Namespace size in logical blocks.
    pub size_blocks: u64,
    /// Logical block size in bytes (2^LBADS of the format in use).
    pub block_size: u32,
    /// Metadata bytes per block in the format in use (this driver requires 0).
    pub metadata_size: u16,
    /// Deallocate Logical Block Features, byte 33: bits 2:0 = 001b means a read of a
    /// deallocated block returns zeroes.
    pub dlfeat: u8,
}

impl NamespaceInfo {
    pub fn size_bytes(&self) -> u64 {
        self.size_blocks.saturating_mul(u64::from(self.block_size))
    }

    pub fn deallocated_reads_zero(&self) -> bool {
        self.dlfeat & 0b111 == 0b001
    }
}

/// The SMART / Health Information log page (Log Identifier 02h), the fields a storage
/// operator watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmartLog {
    /// Critical Warning bits, byte 0 (0 = none).
    pub critical_warning: u8,
    /// Composite Temperature in kelvins, bytes 2:1.
    pub temperature_kelvin: u16,
    /// Available Spare %, byte 3.
    pub available_spare: u8,
    /// Percentage Used, byte 5 (may exceed 100).
    pub percentage_used: u8,
    /// Data Units Read / Written (thousands of 512-byte units), bytes 47:32 / 63:48.
    pub data_units_read: u128,
    pub data_units_written: u128,
    /// Power Cycles, bytes 127:112.
    pub power_cycles: u128,
    /// Power On Hours, bytes 143:128.
    pub power_on_hours: u128,
    /// Unsafe Shutdowns, bytes 159:144.
    pub unsafe_shutdowns: u128,
    /// Media and Data Integrity Errors, bytes 175:160.
    pub media_errors: u128,
    /// Number of Error Information Log Entries, bytes 191:176.
    pub error_log_entries: u128,
}

/// One Error Information log entry (Log Identifier 01h), 64 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ErrorLogEntry {
    pub error_count: u64,
    pub sq_id: u16,
    pub command_id: u16,
    /// Status field (bits 15:1 as in a completion, bit 0 the phase tag).
    pub status: u16,
    pub lba: u64,
    pub nsid: u32,
}

pub const SMART_LOG_ID: u8 = 0x02;
pub const SMART_LOG_BYTES: usize = 512;
pub const ERROR_LOG_ID: u8 = 0x01;
pub const ERROR_LOG_ENTRY_BYTES: usize = 64;

fn u8_at(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

fn le<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(s) = b.get(at..at + N) {
        out.copy_from_slice(s);
    }
    out
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(le(b, at))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(le(b, at))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(le(b, at))
}

fn u128_at(b: &[u8], at: usize) -> u128 {
    u128::from_le_bytes(le(b, at))
}

/// An ASCII field, space padded; anything non-printable becomes '?'.
fn ascii(b: &[u8], from: usize, to: usize) -> String {
    let s: String = b
        .get(from..to)
        .unwrap_or(&[])
        .iter()
        .map(|&c| {
            if (0x20..0x7f).contains(&c) {
                c as char
            } else {
                '?'
            }
        })
        .collect();
    s.trim_end_matches([' ', '?']).trim_start().to_string()
}

pub fn parse_identify_controller(b: &[u8]) -> ControllerInfo {
    ControllerInfo {
        vendor_id: u16_at(b, 0),
        serial: ascii(b, 4, 24),
        model: ascii(b, 24, 64),
        firmware: ascii(b, 64, 72),
        mdts: u8_at(b, 77),
        controller_id: u16_at(b, 78),
        namespaces: u32_at(b, 516),
        oncs: u16_at(b, 520),
        volatile_write_cache: u8_at(b, 525) & 1 != 0,
    }
}

/// Decodes Identify Namespace; `None` when the format in use is out of range or its
/// block size is not a sane power of two (512 B – 64 KiB).
pub fn parse_identify_namespace(b: &[u8]) -> Option<NamespaceInfo> {
    let nlbaf = u8_at(b, 25); // zero-based count of formats
    let flbas = u8_at(b, 26);
    // Bits 3:0 are the low index; bits 6:5 extend it when more than 16 formats exist.
    let index = usize::from(flbas & 0x0f) | (usize::from((flbas >> 5) & 0b11) << 4);
    if index > usize::from(nlbaf) || index >= 64 {
        return None;
    }
    let lbaf = u32_at(b, 128 + 4 * index);
    let metadata_size = (lbaf & 0xffff) as u16;
    let lbads = (lbaf >> 16) & 0xff;
    if !(9..=16).contains(&lbads) {
        return None;
    }
    Some(NamespaceInfo {
        size_blocks: u64_at(b, 0),
        block_size: 1 << lbads,
        metadata_size,
        dlfeat: u8_at(b, 33),
    })
}

pub fn parse_smart_log(b: &[u8]) -> SmartLog {
    SmartLog {
        critical_warning: u8_at(b, 0),
        temperature_kelvin: u16_at(b, 1),
        available_spare: u8_at(b, 3),
        percentage_used: u8_at(b, 5),
        data_units_read: u128_at(b, 32),
        data_units_written: u128_at(b, 48),
        power_cycles: u128_at(b, 112),
        power_on_hours: u128_at(b, 128),
        unsafe_shutdowns: u128_at(b, 144),
        media_errors: u128_at(b, 160),
        error_log_entries: u128_at(b, 176),
    }
}

pub fn parse_error_log_entry(b: &[u8]) -> ErrorLogEntry {
    ErrorLogEntry {
        error_count: u64_at(b, 0),
        sq_id: u16_at(b, 8),
        command_id: u16_at(b, 10),
        status: u16_at(b, 12),
        lba: u64_at(b, 16),
        nsid: u32_at(b, 24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn identify_controller_fields_at_their_offsets() {
        let mut b = vec![0u8; 4096];
        b[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        b[4..24].copy_from_slice(b"DOSDNVME0           ");
        b[24..64].copy_from_slice(&[b' '; 40]);
        b[24..34].copy_from_slice(b"QEMU NVMe ");
        b[64..72].copy_from_slice(b"7.2.0   ");
        b[77] = 7;
        b[78..80].copy_from_slice(&3u16.to_le_bytes());
        b[516..520].copy_from_slice(&1u32.to_le_bytes());
        b[520..522].copy_from_slice(&0b1100u16.to_le_bytes());
        b[525] = 1;
        let c = parse_identify_controller(&b);
        assert_eq!(c.vendor_id, 0x1b36);
        assert_eq!(c.serial, "DOSDNVME0");
        assert_eq!(c.model, "QEMU NVMe");
        assert_eq!(c.firmware, "7.2.0");
        assert_eq!(c.mdts_bytes(4096), 512 * 1024);
        assert_eq!(c.controller_id, 3);
        assert_eq!(c.namespaces, 1);
        assert!(c.supports_dataset_management() && c.supports_write_zeroes());
        assert!(c.volatile_write_cache);
    }

    #[test]
    fn identify_namespace_uses_the_format_in_use() {
        let mut b = vec![0u8; 4096];
        b[0..8].copy_from_slice(&262_144u64.to_le_bytes());
        b[25] = 1; // two formats
        b[26] = 1; // second in use
        b[33] = 0b001;
        b[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        b[132..136].copy_from_slice(&(12u32 << 16).to_le_bytes());
        let n = parse_identify_namespace(&b).unwrap();
        assert_eq!(n.block_size, 4096);
        assert_eq!(n.size_bytes(), 1 << 30);
        assert!(n.deallocated_reads_zero());
        b[26] = 2; // beyond NLBAF
        assert_eq!(parse_identify_namespace(&b), None);
    }

    #[test]
    fn smart_log_fields_at_their_offsets() {
        let mut b = vec![0u8; 512];
        b[0] = 0x04;
        b[1..3].copy_from_slice(&310u16.to_le_bytes());
        b[5] = 3;
        b[144..160].copy_from_slice(&7u128.to_le_bytes());
        b[160..176].copy_from_slice(&2u128.to_le_bytes());
        b[128..144].copy_from_slice(&5000u128.to_le_bytes());
        let s = parse_smart_log(&b);
        assert_eq!(s.critical_warning, 4);
        assert_eq!(s.temperature_kelvin, 310);
        assert_eq!(s.percentage_used, 3);
        assert_eq!(s.unsafe_shutdowns, 7);
        assert_eq!(s.media_errors, 2);
        assert_eq!(s.power_on_hours, 5000);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = parse_identify_controller(&b);
            let _ = parse_identify_namespace(&b);
            let _ = parse_smart_log(&b);
            let _ = parse_error_log_entry(&b);
        }
    }
}
