//! NVMe 2.0 wire structures shared by the host and the controller: the 64-byte
//! Submission Queue Entry, the 16-byte Completion Queue Entry, the opcodes this driver
//! issues, and a typed decode of the completion status.
//!
//! These are the bytes the controller reads and writes by DMA, so their layout is fixed
//! by the specification and asserted at compile time. Fields are stored in the host's
//! byte order; NVMe is little-endian, so the crate refuses to build for big-endian
//! targets rather than silently swapping nothing.
//!
//! This module never panics on anything read from a completion: every field value,
//! including reserved and vendor-specific status codes, decodes to a value.
#![deny(unsafe_code)]

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

#[cfg(not(target_endian = "little"))]
compile_error!("the NVMe driver stores queue entries in host order, which must be little-endian");

/// Admin command opcodes (NVMe Base 2.0 §5, "Admin Command Set").
pub mod admin {
    /// Delete I/O Submission Queue (NVMe Base 2.0 §5.7).
    pub const DELETE_IO_SQ: u8 = 0x00;
    /// Create I/O Submission Queue (NVMe Base 2.0 §5.5).
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Get Log Page (NVMe Base 2.0 §5.16).
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue (NVMe Base 2.0 §5.6).
    pub const DELETE_IO_CQ: u8 = 0x04;
    /// Create I/O Completion Queue (NVMe Base 2.0 §5.4).
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Identify (NVMe Base 2.0 §5.17).
    pub const IDENTIFY: u8 = 0x06;
    /// Abort (NVMe Base 2.0 §5.1).
    pub const ABORT: u8 = 0x08;
    /// Set Features (NVMe Base 2.0 §5.27).
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features (NVMe Base 2.0 §5.15).
    pub const GET_FEATURES: u8 = 0x0A;
}

/// NVM command set I/O opcodes (NVM Command Set Specification 1.0 §3, "I/O Commands").
pub mod nvm {
    /// Flush (NVMe Base 2.0 §7.1).
    pub const FLUSH: u8 = 0x00;
    /// Write (NVM Command Set 1.0 §3.2.6).
    pub const WRITE: u8 = 0x01;
    /// Read (NVM Command Set 1.0 §3.2.4).
    pub const READ: u8 = 0x02;
    /// Write Zeroes (NVM Command Set 1.0 §3.2.8).
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management (NVM Command Set 1.0 §3.2.3); attribute AD in CDW11 bit 2
    /// is deallocate.
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// The identifier the host puts in CDW0 and the controller echoes in the completion
/// (NVMe Base 2.0 §4.2, Command Dword 0 bits 31:16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommandId(pub u16);

/// Submission Queue Entry, 64 bytes (NVMe Base 2.0 §4.2 "Submission Queue Entry",
/// common command format). The command-specific dwords CDW10–CDW15 are left to the command builders.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SubmissionEntry {
    /// CDW0: opcode (7:0), fused operation (9:8), PSDT (15:14), command identifier (31:16)
    /// (NVMe Base 2.0 §4.2, Command Dword 0).
    pub cdw0: u32,
    /// Namespace identifier; 0 when the command does not use one.
    pub nsid: u32,
    /// CDW2, command specific.
    pub cdw2: u32,
    /// CDW3, command specific.
    pub cdw3: u32,
    /// Metadata pointer (MPTR).
    pub mptr: u64,
    /// Data pointer, PRP entry 1 (see [`super::prp`]).
    pub prp1: u64,
    /// Data pointer, PRP entry 2 or the address of a PRP list.
    pub prp2: u64,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}
const _: () = assert!(size_of::<SubmissionEntry>() == 64);
const _: () = assert!(align_of::<SubmissionEntry>() <= 64);

/// Fused operation, CDW0 bits 9:8 (NVMe Base 2.0 §4.2, Command Dword 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fuse {
    Normal = 0b00,
    First = 0b01,
    Second = 0b10,
}

/// PRP or SGL for data transfer, CDW0 bits 15:14 (NVMe Base 2.0 §4.2, Command Dword 0).
/// This driver only builds PRPs.
pub const PSDT_PRP: u8 = 0b00;

impl SubmissionEntry {
    /// A zeroed entry with CDW0 set to `opcode`, normal (unfused), PRP data pointer.
    /// The command id is filled in by the queue when the entry is submitted.
    pub fn new(opcode: u8, nsid: u32) -> Self {
        Self {
            cdw0: u32::from(opcode),
            nsid,
            ..Self::default()
        }
    }

    pub fn opcode(&self) -> u8 {
        (self.cdw0 & 0xff) as u8
    }

    pub fn fuse(&self) -> u8 {
        ((self.cdw0 >> 8) & 0b11) as u8
    }

    pub fn set_fuse(&mut self, fuse: Fuse) {
        self.cdw0 = (self.cdw0 & !(0b11 << 8)) | (u32::from(fuse as u8) << 8);
    }

    pub fn psdt(&self) -> u8 {
        ((self.cdw0 >> 14) & 0b11) as u8
    }

    pub fn command_id(&self) -> CommandId {
        CommandId((self.cdw0 >> 16) as u16)
    }

    pub fn set_command_id(&mut self, cid: CommandId) {
        self.cdw0 = (self.cdw0 & 0x0000_ffff) | (u32::from(cid.0) << 16);
    }
}

/// Completion Queue Entry, 16 bytes (NVMe Base 2.0 §4.6 "Completion Queue Entry",
/// common layout).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CompletionEntry {
    /// DW0, command specific.
    pub dw0: u32,
    /// DW1, command specific.
    pub dw1: u32,
    /// SQ Head Pointer: the controller's head of the submission queue when it posted this
    /// entry, which tells the host how many slots are free again (§4.6, Dword 2).
    pub sq_head: u16,
    /// SQ Identifier the completed command came from.
    pub sq_id: u16,
    /// Command identifier, as submitted.
    pub command_id: u16,
    /// Bit 0: phase tag; bits 15:1: status field (§4.6.1 "Status Field Definition").
    pub status: u16,
}
const _: () = assert!(size_of::<CompletionEntry>() == 16);

impl CompletionEntry {
    /// The phase tag (§4.6, Dword 3 bit 16): inverted by the controller on each
    /// pass through the ring, so a new entry is one whose tag equals the host's
    /// expected phase.
    pub fn phase(&self) -> bool {
        self.status & 1 == 1
    }

    pub fn status_field(&self) -> StatusField {
        StatusField(self.status >> 1)
    }
}

/// The 15-bit status field of a completion (NVMe Base 2.0 §4.6.1), phase
/// tag removed: SC (7:0), SCT (10:8), CRD (12:11), More (13), DNR (14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusField(pub u16);

impl StatusField {
    /// Build a status field (used by the test controller and by tests).
    pub fn new(sct: u8, sc: u8, dnr: bool) -> Self {
        Self(u16::from(sc) | (u16::from(sct & 0b111) << 8) | (u16::from(dnr) << 14))
    }

    pub fn sc(&self) -> u8 {
        (self.0 & 0xff) as u8
    }

    pub fn sct(&self) -> u8 {
        ((self.0 >> 8) & 0b111) as u8
    }

    /// Command Retry Delay: index into CRDT1–3 of Identify Controller.
    pub fn crd(&self) -> u8 {
        ((self.0 >> 11) & 0b11) as u8
    }

    /// More information is available in the Error Information log page.
    pub fn more(&self) -> bool {
        self.0 & (1 << 13) != 0
    }

    /// Do Not Retry: the same command would fail again.
    pub fn dnr(&self) -> bool {
        self.0 & (1 << 14) != 0
    }

    pub fn is_success(&self) -> bool {
        self.sct() == 0 && self.sc() == 0
    }

    /// The typed status; never panics, unknown codes keep their raw value.
    pub fn decode(&self) -> Status {
        let sc = self.sc();
        match self.sct() {
            0 => match GenericStatus::from_code(sc) {
                Some(g) => Status::Generic(g),
                None => Status::GenericOther(sc),
            },
            1 => Status::CommandSpecific(sc),
            2 => Status::MediaDataIntegrity(sc),
            3 => Status::PathRelated(sc),
            7 => Status::VendorSpecific(sc),
            sct => Status::Reserved { sct, sc },
        }
    }
}

/// A completion status by Status Code Type (NVMe Base 2.0 §4.6.1, "Status Code Type
/// Values").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Status {
    /// SCT 0 with a code this driver names.
    #[error("{}", .0.name())]
    Generic(GenericStatus),
    /// SCT 0 with a code this driver does not name (reserved or command-set specific).
    #[error("generic command status {0:#04x}")]
    GenericOther(u8),
    /// SCT 1: meaning depends on the opcode (e.g. Invalid Queue Identifier on Create SQ).
    #[error("command specific status {0:#04x}")]
    CommandSpecific(u8),
    /// SCT 2: media and data integrity errors (unrecovered read, write fault, ...).
    #[error("media and data integrity error {0:#04x}")]
    MediaDataIntegrity(u8),
    /// SCT 3: path related status.
    #[error("path related status {0:#04x}")]
    PathRelated(u8),
    /// SCT 7: vendor specific.
    #[error("vendor specific status {0:#04x}")]
    VendorSpecific(u8),
    /// SCT 4–6 are reserved.
    #[error("reserved status code type {sct} code {sc:#04x}")]
    Reserved { sct: u8, sc: u8 },
}

impl Status {
    pub fn is_success(&self) -> bool {
        matches!(self, Status::Generic(GenericStatus::Success))
    }
}

macro_rules! generic_status {
    ($($variant:ident = $code:literal, $name:literal;)*) => {
        /// Generic Command Status values, SCT 0 (NVMe Base 2.0 §4.6.1 "Generic Command
        /// Status Values" 00h–24h, and the I/O command set specific codes 80h–84h as the
        /// NVM Command Set defines them).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u8)]
        pub enum GenericStatus {
            $($variant = $code,)*
        }

        impl GenericStatus {
            /// Every named generic status, for tests and reports.
            pub const ALL: &'static [GenericStatus] = &[$(GenericStatus::$variant,)*];

            pub fn from_code(code: u8) -> Option<Self> {
                match code {
                    $($code => Some(GenericStatus::$variant),)*
                    _ => None,
                }
            }

            /// The specification's name for the status.
            pub fn name(self) -> &'static str {
                match self {
                    $(GenericStatus::$variant => $name,)*
                }
            }

            pub fn code(self) -> u8 {
                self as u8
            }
        }
    };
}

generic_status! {
    Success = 0x00, "Successful Completion";
    InvalidOpcode = 0x01, "Invalid Command Opcode";
    InvalidField = 0x02, "Invalid Field in Command";
    CommandIdConflict = 0x03, "Command ID Conflict";
    DataTransferError = 0x04, "Data Transfer Error";
    AbortedPowerLoss = 0x05, "Commands Aborted due to Power Loss Notification";
    InternalError = 0x06, "Internal Error";
    AbortRequested = 0x07, "Command Abort Requested";
    AbortedSqDeletion = 0x08, "Command Aborted due to SQ Deletion";
    AbortedFailedFused = 0x09, "Command Aborted due to Failed Fused Command";
    AbortedMissingFused = 0x0A, "Command Aborted due to Missing Fused Command";
    InvalidNamespaceOrFormat = 0x0B, "Invalid Namespace or Format";
    CommandSequenceError = 0x0C, "Command Sequence Error";
    InvalidSglSegmentDescriptor = 0x0D, "Invalid SGL Segment Descriptor";
    InvalidSglDescriptorCount = 0x0E, "Invalid Number of SGL Descriptors";
    DataSglLengthInvalid = 0x0F, "Data SGL Length Invalid";
    MetadataSglLengthInvalid = 0x10, "Metadata SGL Length Invalid";
    SglDescriptorTypeInvalid = 0x11, "SGL Descriptor Type Invalid";
    InvalidCmbUse = 0x12, "Invalid Use of Controller Memory Buffer";
    PrpOffsetInvalid = 0x13, "PRP Offset Invalid";
    AtomicWriteUnitExceeded = 0x14, "Atomic Write Unit Exceeded";
    OperationDenied = 0x15, "Operation Denied";
    SglOffsetInvalid = 0x16, "SGL Offset Invalid";
    HostIdInconsistentFormat = 0x18, "Host Identifier Inconsistent Format";
    KeepAliveExpired = 0x19, "Keep Alive Timer Expired";
    KeepAliveTimeoutInvalid = 0x1A, "Keep Alive Timeout Invalid";
    AbortedPreemptAbort = 0x1B, "Command Aborted due to Preempt and Abort";
    SanitizeFailed = 0x1C, "Sanitize Failed";
    SanitizeInProgress = 0x1D, "Sanitize In Progress";
    SglDataBlockGranularityInvalid = 0x1E, "SGL Data Block Granularity Invalid";
    NotSupportedForCmbQueue = 0x1F, "Command Not Supported for Queue in CMB";
    NamespaceWriteProtected = 0x20, "Namespace is Write Protected";
    CommandInterrupted = 0x21, "Command Interrupted";
    TransientTransportError = 0x22, "Transient Transport Error";
    ProhibitedByLockdown = 0x23, "Command Prohibited by Command and Feature Lockdown";
    AdminMediaNotReady = 0x24, "Admin Command Media Not Ready";
    LbaOutOfRange = 0x80, "LBA Out of Range";
    CapacityExceeded = 0x81, "Capacity Exceeded";
    NamespaceNotReady = 0x82, "Namespace Not Ready";
    ReservationConflict = 0x83, "Reservation Conflict";
    FormatInProgress = 0x84, "Format In Progress";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdw0_fields_round_trip() {
        let mut e = SubmissionEntry::new(nvm::WRITE, 1);
        e.set_command_id(CommandId(0xbeef));
        e.set_fuse(Fuse::First);
        assert_eq!(e.opcode(), nvm::WRITE);
        assert_eq!(e.command_id(), CommandId(0xbeef));
        assert_eq!(e.fuse(), Fuse::First as u8);
        assert_eq!(e.psdt(), PSDT_PRP);
        e.set_command_id(CommandId(7));
        assert_eq!(e.cdw0, 0x0007_0101);
    }

    #[test]
    fn entry_byte_offsets_match_the_spec() {
        let mut e = SubmissionEntry::new(0xAB, 0x1122_3344);
        e.prp1 = 0x0102_0304_0506_0708;
        e.cdw10 = 0xdead_beef;
        e.cdw15 = 0x5555_aaaa;
        let b = e.as_bytes();
        assert_eq!(b[0], 0xAB);
        assert_eq!(&b[4..8], &0x1122_3344u32.to_le_bytes());
        assert_eq!(&b[24..32], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[40..44], &0xdead_beefu32.to_le_bytes());
        assert_eq!(&b[60..64], &0x5555_aaaau32.to_le_bytes());

        // DW3 of a completion: command id in bits 15:0, phase bit 16, status 31:17.
        let mut raw = [0u8; 16];
        raw[12..16].copy_from_slice(&((0x8123u32 << 17) | (1 << 16) | 0x0042).to_le_bytes());
        raw[8..10].copy_from_slice(&9u16.to_le_bytes());
        let c = CompletionEntry::read_from_bytes(&raw).unwrap();
        assert_eq!(c.command_id, 0x42);
        assert_eq!(c.sq_head, 9);
        assert!(c.phase());
        assert_eq!(c.status_field().0, 0x8123 & 0x7fff);
    }

    #[test]
    fn every_generic_status_decodes_by_name() {
        for &g in GenericStatus::ALL {
            for dnr in [false, true] {
                let f = StatusField::new(0, g.code(), dnr);
                assert_eq!(f.decode(), Status::Generic(g));
                assert_eq!(f.dnr(), dnr);
                assert_eq!(f.decode().to_string(), g.name());
            }
        }
        assert!(StatusField::new(0, 0, false).decode().is_success());
        assert!(StatusField::new(0, 0, false).is_success());
        assert!(!StatusField::new(0, 0x80, false).decode().is_success());
    }

    #[test]
    fn every_status_value_decodes_without_panicking() {
        for raw in 0..=0x7fffu16 {
            let f = StatusField(raw);
            let s = f.decode();
            let _ = s.to_string();
            match (f.sct(), s) {
                (0, Status::Generic(g)) => assert_eq!(g.code(), f.sc()),
                (0, Status::GenericOther(sc)) => {
                    assert_eq!(sc, f.sc());
                    assert!(GenericStatus::from_code(sc).is_none());
                }
                (1, Status::CommandSpecific(sc))
                | (2, Status::MediaDataIntegrity(sc))
                | (3, Status::PathRelated(sc))
                | (7, Status::VendorSpecific(sc)) => assert_eq!(sc, f.sc()),
                (4..=6, Status::Reserved { sct, sc }) => {
                    assert_eq!((sct, sc), (f.sct(), f.sc()))
                }
                other => panic!("raw {raw:#x} decoded as {other:?}"),
            }
        }
        assert_eq!(
            StatusField::new(0, 0x17, false).decode(),
            Status::GenericOther(0x17)
        );
        assert_eq!(
            StatusField::new(2, 0x81, true).decode(),
            Status::MediaDataIntegrity(0x81)
        );
    }

    #[test]
    fn status_field_flags() {
        let f = StatusField((1 << 14) | (1 << 13) | (2 << 11) | (1 << 8) | 0x0C);
        assert!(f.dnr());
        assert!(f.more());
        assert_eq!(f.crd(), 2);
        assert_eq!(f.decode(), Status::CommandSpecific(0x0C));
    }
}
