//! The disk label: how a disk is carved into one region per shard.
//!
//! Every dataplane loop owns one shard of the store: its own log space on each disk
//! (a region, formatted and recovered exactly as a whole disk was before: superblock,
//! checkpoint slots, circular log; see the store's `format` module) and its own queue
//! pair or ring to reach it. Block 0 of the disk says how it is carved:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `b"DOSDLABL"` |
//! | 8 | 4 | format_version (the store's `FORMAT_VERSION`) |
//! | 12 | 4 | shards: regions on this disk, one per dataplane loop |
//! | 16 | 8 | first: byte offset of region 0 (1 MiB) |
//! | 24 | 8 | region_bytes: size of each region, a multiple of 1 MiB |
//! | 32 | 8 | disk_bytes: the disk's size when labelled |
//! | 40 | 16 | identity (random at labelling; the disk's serial in reports) |
//! | 56 | 68 | reserved, zero |
//! | 124 | 4 | crc32c of bytes 0..124 |
//!
//! Region `k` is `[first + k * region_bytes, first + (k + 1) * region_bytes)`. The label
//! is written once, when a blank disk is first used, and flushed before any region is
//! formatted; a crash in between leaves a labelled disk with blank regions, which the
//! next start formats. The number of shards is fixed from then on: a node started
//! with another number of loops is refused with both numbers named.
//!
//! A disk whose block 0 holds a superblock is of format 2 or older (one log over the
//! whole disk, before shards): refused, naming both versions. None was deployed.

use nvme::{AlignedBuf, BlockDevice};
use rand::Rng;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::format::{BLOCK, FORMAT_VERSION, SB_MAGIC};

/// Label magic.
pub const LABEL_MAGIC: [u8; 8] = *b"DOSDLABL";
/// Where region 0 starts, and the granule of region sizes.
pub const REGION_ALIGN: u64 = 1 << 20;
/// Smallest region worth formatting.
pub const REGION_MIN: u64 = 4 << 20;
/// Most shards a disk may be carved into.
pub const SHARDS_MAX: u16 = 64;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct LabelRaw {
    magic: [u8; 8],
    format_version: U32,
    shards: U32,
    first: U64,
    region_bytes: U64,
    disk_bytes: U64,
    identity: [u8; 16],
    reserved: [u8; 68],
    crc: U32,
}
const LABEL_SIZE: usize = 128;
const LABEL_CRC_AT: usize = 124;
const _: () = assert!(size_of::<LabelRaw>() == LABEL_SIZE);

/// A disk's carving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Label {
    pub shards: u16,
    pub first: u64,
    pub region_bytes: u64,
    pub disk_bytes: u64,
    pub identity: [u8; 16],
}

impl Label {
    /// Carves a disk of `disk_bytes` into `shards` equal regions.
    pub fn carve(disk_bytes: u64, shards: u16, identity: [u8; 16]) -> Result<Label, String> {
        if shards == 0 || shards > SHARDS_MAX {
            return Err(format!(
                "cannot carve a disk into {shards} shards (1 to {SHARDS_MAX})"
            ));
        }
        let usable = disk_bytes.saturating_sub(REGION_ALIGN);
        let region_bytes = usable / u64::from(shards) / REGION_ALIGN * REGION_ALIGN;
        if region_bytes < REGION_MIN {
            return Err(format!(
                "a disk of {disk_bytes} bytes is too small for {shards} shards of at least {REGION_MIN} bytes each (needs {} bytes)",
                REGION_ALIGN + REGION_MIN * u64::from(shards)
            ));
        }
        Ok(Label {
            shards,
            first: REGION_ALIGN,
            region_bytes,
            disk_bytes,
            identity,
        })
    }

    /// Byte offset and length of shard `k`'s region.
    pub fn region(&self, k: u16) -> (u64, u64) {
        (
            self.first + u64::from(k) * self.region_bytes,
            self.region_bytes,
        )
    }

    pub fn encode(&self, block: &mut [u8]) {
        let mut raw = LabelRaw {
            magic: LABEL_MAGIC,
            format_version: U32::new(FORMAT_VERSION),
            shards: U32::new(u32::from(self.shards)),
            first: U64::new(self.first),
            region_bytes: U64::new(self.region_bytes),
            disk_bytes: U64::new(self.disk_bytes),
            identity: self.identity,
            reserved: [0; 68],
            crc: U32::new(0),
        };
        raw.crc = U32::new(crc32c::crc32c(&raw.as_bytes()[..LABEL_CRC_AT]));
        block[..LABEL_SIZE].copy_from_slice(raw.as_bytes());
    }
}

/// What block 0 of a disk holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// All zero: never used.
    Blank,
    Label(Label),
    /// A label or superblock of another format version.
    OtherVersion(u32),
    /// Something that is not a dosd disk, or a damaged label.
    Unrecognised(String),
}

/// Decodes block 0. Never panics, whatever the bytes.
pub fn decode(block: &[u8], disk_bytes: u64) -> Found {
    if block.iter().all(|&b| b == 0) {
        return Found::Blank;
    }
    let Ok((raw, _)) = LabelRaw::ref_from_prefix(block) else {
        return Found::Unrecognised("block 0 is short".into());
    };
    if raw.magic == SB_MAGIC {
        // Formats up to 2 kept a superblock here; its version sits where ours does.
        let version = raw.format_version.get();
        if version == FORMAT_VERSION {
            // A region's superblock at the start of the disk: a store was opened on
            // the whole device directly (a test tool does that), never by dosd.
            return Found::Unrecognised(
                "block 0 holds a log superblock but no shard label: the whole disk was \
                 used as one region by a tool, not by dosd; wipe it to use it"
                    .into(),
            );
        }
        return Found::OtherVersion(version);
    }
    if raw.magic != LABEL_MAGIC {
        return Found::Unrecognised("block 0 holds neither a dosd label nor zeros".into());
    }
    let version = raw.format_version.get();
    if version != FORMAT_VERSION {
        return Found::OtherVersion(version);
    }
    if crc32c::crc32c(&raw.as_bytes()[..LABEL_CRC_AT]) != raw.crc.get() {
        return Found::Unrecognised("the disk label fails its checksum".into());
    }
    let label = Label {
        shards: u16::try_from(raw.shards.get()).unwrap_or(u16::MAX),
        first: raw.first.get(),
        region_bytes: raw.region_bytes.get(),
        disk_bytes: raw.disk_bytes.get(),
        identity: raw.identity,
    };
    let fits = label
        .region_bytes
        .checked_mul(u64::from(label.shards))
        .and_then(|r| r.checked_add(label.first))
        .is_some_and(|end| end <= disk_bytes);
    if label.shards == 0
        || label.shards > SHARDS_MAX
        || !label.first.is_multiple_of(BLOCK as u64)
        || label.first < BLOCK as u64
        || label.region_bytes < REGION_MIN
        || !label.region_bytes.is_multiple_of(BLOCK as u64)
        || !fits
    {
        return Found::Unrecognised(format!(
            "the disk label describes {} regions of {} bytes from {}, which do not fit a disk of {disk_bytes} bytes",
            label.shards, label.region_bytes, label.first
        ));
    }
    Found::Label(label)
}

/// Reads a disk's label, labelling it for `want` shards (or 1) if it is blank.
/// `want` is what the operator asked for: `None` takes whatever the label says.
/// Blocking: for start-up only.
pub fn open_or_label(
    dev: &mut dyn BlockDevice,
    want: Option<u16>,
    rng: &mut impl Rng,
) -> Result<Label, String> {
    let disk_bytes = dev.info().size_bytes;
    let mut block = AlignedBuf::new(BLOCK);
    let mut early = Vec::new();
    let (buf, r) = nvme::run_blocking(
        dev,
        nvme::IoOp::Read {
            offset: 0,
            buf: std::mem::replace(&mut block, AlignedBuf::new(0)),
        },
        &mut early,
    );
    block = buf;
    r.map_err(|e| format!("cannot read the disk label: {e}"))?;
    match decode(&block, disk_bytes) {
        Found::Label(l) => match want {
            Some(w) if w != l.shards => Err(format!(
                "the disk is carved for {} dataplane loops, but {w} were asked for: \
                 start with --dataplane-cores {} (or reformat the disk)",
                l.shards, l.shards
            )),
            _ => Ok(l),
        },
        Found::OtherVersion(v) => Err(format!(
            "the disk holds dosd format version {v}; this dosd reads and writes version {FORMAT_VERSION} \
             (small objects packed into shared blocks): wipe it to reuse it"
        )),
        Found::Unrecognised(why) => Err(format!("not a usable dosd disk: {why}")),
        Found::Blank => {
            let label = Label::carve(disk_bytes, want.unwrap_or(1), rng.gen())?;
            // A blank disk's regions are new whatever bytes lie in them: their
            // superblock slots are zeroed first, so each formats as blank instead of
            // being taken for a damaged region. Then the label, then one flush: a crash
            // before it completes leaves block 0 zero, a blank disk again.
            let zero = AlignedBuf::new(2 * BLOCK);
            let mut zero = Some(zero);
            for k in 0..label.shards {
                let (base, _) = label.region(k);
                let buf = zero.take().unwrap_or_else(|| AlignedBuf::new(2 * BLOCK));
                let (buf, r) = nvme::run_blocking(
                    dev,
                    nvme::IoOp::Write { offset: base, buf },
                    &mut early,
                );
                r.map_err(|e| format!("cannot clear region {k}: {e}"))?;
                zero = Some(buf);
            }
            block.fill(0);
            label.encode(&mut block);
            let (_, r) = nvme::run_blocking(
                dev,
                nvme::IoOp::Write {
                    offset: 0,
                    buf: block,
                },
                &mut early,
            );
            r.map_err(|e| format!("cannot write the disk label: {e}"))?;
            let (_, r) = nvme::run_blocking(dev, nvme::IoOp::Flush, &mut early);
            r.map_err(|e| format!("cannot flush the disk label: {e}"))?;
            tracing::info!(
                shards = label.shards,
                region_bytes = label.region_bytes,
                "labelled blank disk"
            );
            Ok(label)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvme::mem::MemDisk;
    use rand::SeedableRng;

    #[test]
    fn a_blank_disk_is_labelled_once_and_then_read_back() {
        let disk = MemDisk::new(64 << 20, 7);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut dev = disk.device();
        let l = open_or_label(&mut dev, Some(3), &mut rng).unwrap();
        assert_eq!(l.shards, 3);
        assert_eq!(l.first, REGION_ALIGN);
        assert_eq!(l.region_bytes, 21 << 20);
        assert!(l.region(2).0 + l.region(2).1 <= 64 << 20);
        // Read back without a wish: the label's number; with another: refused.
        assert_eq!(open_or_label(&mut disk.device(), None, &mut rng), Ok(l));
        let e = open_or_label(&mut disk.device(), Some(2), &mut rng).unwrap_err();
        assert!(
            e.contains("carved for 3") && e.contains("2 were asked"),
            "{e}"
        );
    }

    #[test]
    fn labelling_clears_whatever_lay_where_the_regions_start() {
        let disk = MemDisk::new(64 << 20, 7);
        let mut dev = disk.device();
        let mut junk = AlignedBuf::new(2 * BLOCK);
        junk.fill(0x5A);
        dev.write_at(REGION_ALIGN, &junk).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let l = open_or_label(&mut dev, Some(2), &mut rng).unwrap();
        let mut got = AlignedBuf::new(2 * BLOCK);
        for k in 0..2 {
            dev.read_at(l.region(k).0, &mut got).unwrap();
            assert!(got.iter().all(|&b| b == 0), "region {k} not cleared");
        }
    }

    #[test]
    fn an_older_format_is_refused_naming_both_versions() {
        let mut block = vec![0u8; BLOCK];
        block[..8].copy_from_slice(&SB_MAGIC);
        block[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(decode(&block, 1 << 30), Found::OtherVersion(2));
        let disk = MemDisk::new(64 << 20, 7);
        let mut dev = disk.device();
        let mut buf = AlignedBuf::new(BLOCK);
        buf.copy_from_slice(&block);
        dev.write_at(0, &buf).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let e = open_or_label(&mut dev, None, &mut rng).unwrap_err();
        assert!(e.contains("version 2") && e.contains(&format!("version {FORMAT_VERSION}")));
    }

    #[test]
    fn a_version_3_label_is_refused_naming_both_versions() {
        // Version 3 carved disks the same way but gave every record a header block of
        // its own: its logs cannot be read as version 4's.
        let disk = MemDisk::new(64 << 20, 8);
        let mut dev = disk.device();
        let mut buf = AlignedBuf::new(BLOCK);
        Label::carve(64 << 20, 1, [9; 16]).unwrap().encode(&mut buf);
        buf[8..12].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(decode(&buf, 64 << 20), Found::OtherVersion(3));
        dev.write_at(0, &buf).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let e = open_or_label(&mut dev, None, &mut rng).unwrap_err();
        assert!(
            e.contains("version 3") && e.contains("version 4") && FORMAT_VERSION == 4,
            "{e}"
        );
    }

    #[test]
    fn an_unlabelled_region_superblock_is_refused_as_such() {
        let mut block = vec![0u8; BLOCK];
        block[..8].copy_from_slice(&SB_MAGIC);
        block[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        match decode(&block, 1 << 30) {
            Found::Unrecognised(why) => assert!(why.contains("no shard label"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn damaged_or_impossible_labels_are_refused() {
        let l = Label::carve(1 << 30, 4, [9; 16]).unwrap();
        let mut block = vec![0u8; BLOCK];
        l.encode(&mut block);
        assert_eq!(decode(&block, 1 << 30), Found::Label(l));
        // A smaller disk than the label describes.
        assert!(matches!(decode(&block, 1 << 20), Found::Unrecognised(_)));
        block[20] ^= 1;
        assert!(matches!(decode(&block, 1 << 30), Found::Unrecognised(_)));
        assert!(Label::carve(8 << 20, 4, [0; 16]).is_err());
        assert!(Label::carve(1 << 30, 0, [0; 16]).is_err());
    }

    #[test]
    fn decode_never_panics() {
        use rand::RngCore;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..2000 {
            let mut block = vec![0u8; BLOCK];
            rng.fill_bytes(&mut block[..LABEL_SIZE]);
            if rng.gen_bool(0.5) {
                block[..8].copy_from_slice(&LABEL_MAGIC);
                block[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
            }
            let _ = decode(&block, rng.gen());
        }
    }
}
