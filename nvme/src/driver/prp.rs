//! Physical Region Page construction (NVMe Base 2.0 "Physical Region Page Entry and
//! List", §4.3 in the 1.4 numbering): turns one transfer — a
//! buffer contiguous in the device's address space (an IOVA behind the IOMMU), and its
//! length — into the PRP1/PRP2 pair of a command, writing a PRP list when more than two
//! pages are touched.
//!
//! The rules it applies:
//! - PRP1 is the buffer address and may carry an offset into its page; the offset must
//!   be dword aligned (bits 1:0 clear).
//! - If the transfer ends within the first page, PRP2 is unused (zero).
//! - If it ends within the second page, PRP2 is that page's address.
//! - Otherwise PRP2 points at a PRP list whose entries are the page-aligned addresses of
//!   the second and following pages. This module fills one list page only; a transfer
//!   that would need a chained list is refused, as is one above MDTS.
//!
//! What it must never do: allocate (the list page is the caller's DMA memory) or panic
//! on a length or address; bad inputs are errors.
#![deny(unsafe_code)]

/// The memory page size this driver programs into CC.MPS (4 KiB, MPS = 0).
pub const PAGE_SIZE_BYTES: u64 = 4096;

/// PRP list entries that fit in one list page.
pub const LIST_ENTRIES_PER_PAGE: usize = (PAGE_SIZE_BYTES / 8) as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrpError {
    #[error("empty transfer")]
    Empty,
    #[error("buffer address {addr:#x} is not dword aligned")]
    Unaligned { addr: u64 },
    #[error("transfer of {len} bytes exceeds the controller's MDTS of {mdts_bytes} bytes")]
    ExceedsMdts { len: u64, mdts_bytes: u64 },
    #[error("transfer needs {entries} PRP list entries, more than one list page holds")]
    NeedsChainedList { entries: usize },
    #[error("PRP list page holds {have} entries, {need} needed")]
    ListTooSmall { have: usize, need: usize },
    #[error("PRP list address {addr:#x} is not page aligned")]
    ListUnaligned { addr: u64 },
    #[error("transfer at {addr:#x} of {len} bytes wraps the address space")]
    Overflow { addr: u64, len: u64 },
}

/// The data pointer of one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prp {
    pub prp1: u64,
    pub prp2: u64,
    /// Entries written to the list page (0 when no list is used).
    pub list_entries: usize,
}

/// A PRP list page the caller owns: its entries as the host writes them, and its
/// address as the controller sees it.
pub struct ListPage<'a> {
    pub entries: &'a mut [u64],
    pub iova: u64,
}

/// Build the data pointer for `len` bytes at device address `addr`, with the
/// controller's maximum data transfer size `mdts_bytes` (already converted from the
/// Identify MDTS field; 0 means no limit). `list` is used only if more than two pages
/// are touched.
pub fn build(addr: u64, len: u64, mdts_bytes: u64, list: ListPage<'_>) -> Result<Prp, PrpError> {
    if len == 0 {
        return Err(PrpError::Empty);
    }
    if addr & 0b11 != 0 {
        return Err(PrpError::Unaligned { addr });
    }
    if mdts_bytes != 0 && len > mdts_bytes {
        return Err(PrpError::ExceedsMdts { len, mdts_bytes });
    }
    let end = addr
        .checked_add(len)
        .ok_or(PrpError::Overflow { addr, len })?;
    let first_page = addr & !(PAGE_SIZE_BYTES - 1);
    // Pages touched, counting the first: from the first page to the one holding end-1.
    let pages = ((end - 1 - first_page) / PAGE_SIZE_BYTES) + 1;
    let second_page = first_page + PAGE_SIZE_BYTES;
    match pages {
        1 => Ok(Prp {
            prp1: addr,
            prp2: 0,
            list_entries: 0,
        }),
        2 => Ok(Prp {
            prp1: addr,
            prp2: second_page,
            list_entries: 0,
        }),
        _ => {
            let need = usize::try_from(pages - 1).unwrap_or(usize::MAX);
            if need > LIST_ENTRIES_PER_PAGE {
                return Err(PrpError::NeedsChainedList { entries: need });
            }
            if list.iova & (PAGE_SIZE_BYTES - 1) != 0 {
                return Err(PrpError::ListUnaligned { addr: list.iova });
            }
            let have = list.entries.len();
            let slots = list
                .entries
                .get_mut(..need)
                .ok_or(PrpError::ListTooSmall { have, need })?;
            let mut page = second_page;
            for slot in slots {
                *slot = page;
                page += PAGE_SIZE_BYTES;
            }
            Ok(Prp {
                prp1: addr,
                prp2: list.iova,
                list_entries: need,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: u64 = PAGE_SIZE_BYTES;
    const LIST_IOVA: u64 = 0x7000_0000;
    /// 2 MiB, a common MDTS (QEMU's default is MDTS 7 with 4 KiB pages = 512 KiB).
    const MDTS: u64 = 2 << 20;

    fn run(addr: u64, len: u64, mdts: u64) -> (Result<Prp, PrpError>, Vec<u64>) {
        let mut list = vec![0u64; LIST_ENTRIES_PER_PAGE];
        let r = build(
            addr,
            len,
            mdts,
            ListPage {
                entries: &mut list,
                iova: LIST_IOVA,
            },
        );
        (r, list)
    }

    /// What the controller would do: walk the PRPs and return the byte ranges.
    fn walk(prp: Prp, len: u64, list: &[u64]) -> Vec<(u64, u64)> {
        let mut ranges = Vec::new();
        let first = (P - prp.prp1 % P).min(len);
        ranges.push((prp.prp1, first));
        let mut left = len - first;
        let pages: Vec<u64> = if left == 0 {
            vec![]
        } else if left <= P {
            vec![prp.prp2]
        } else {
            assert_eq!(prp.prp2, LIST_IOVA);
            list[..prp.list_entries].to_vec()
        };
        for page in pages {
            assert_eq!(page % P, 0, "later PRP entries are page aligned");
            let n = left.min(P);
            ranges.push((page, n));
            left -= n;
        }
        assert_eq!(left, 0, "PRPs cover the whole transfer");
        ranges
    }

    #[test]
    fn prp1_only_within_one_page() {
        for (addr, len) in [
            (0x10_0000, 1),
            (0x10_0000, P),
            (0x10_0ffc, 4),
            (0x10_0800, 2048),
        ] {
            let (r, _) = run(addr, len, MDTS);
            assert_eq!(
                r,
                Ok(Prp {
                    prp1: addr,
                    prp2: 0,
                    list_entries: 0
                })
            );
        }
    }

    #[test]
    fn prp2_is_the_second_page() {
        for (addr, len) in [
            (0x10_0000, P + 1),
            (0x10_0000, 2 * P),
            (0x10_0ffc, 8),
            (0x10_0200, P),
        ] {
            let (r, _) = run(addr, len, MDTS);
            assert_eq!(
                r,
                Ok(Prp {
                    prp1: addr,
                    prp2: 0x10_1000,
                    list_entries: 0
                })
            );
        }
    }

    #[test]
    fn list_boundaries() {
        // Three pages: the first list is two entries.
        let (r, list) = run(0x10_0000, 2 * P + 1, MDTS);
        let prp = r.unwrap();
        assert_eq!((prp.prp2, prp.list_entries), (LIST_IOVA, 2));
        assert_eq!(&list[..2], &[0x10_1000, 0x10_2000]);
        // A dword offset into the first page makes a two-page transfer touch three.
        let (r, list) = run(0x10_0004, 2 * P, MDTS);
        let prp = r.unwrap();
        assert_eq!(prp.list_entries, 2);
        assert_eq!(&list[..2], &[0x10_1000, 0x10_2000]);
        // Exactly one full list page: 1 + 512 pages, aligned.
        let (r, _) = run(0x10_0000, (1 + LIST_ENTRIES_PER_PAGE as u64) * P, 0);
        assert_eq!(r.unwrap().list_entries, LIST_ENTRIES_PER_PAGE);
        // One byte more needs a chained list.
        let (r, _) = run(0x10_0000, (1 + LIST_ENTRIES_PER_PAGE as u64) * P + 1, 0);
        assert_eq!(r, Err(PrpError::NeedsChainedList { entries: 513 }));
        // Unaligned start: the same length now spills into a 514th page.
        let (r, _) = run(0x10_0100, (1 + LIST_ENTRIES_PER_PAGE as u64) * P, 0);
        assert_eq!(r, Err(PrpError::NeedsChainedList { entries: 513 }));
    }

    #[test]
    fn errors_instead_of_panics() {
        assert_eq!(run(0x1000, 0, MDTS).0, Err(PrpError::Empty));
        assert_eq!(
            run(0x1002, 8, MDTS).0,
            Err(PrpError::Unaligned { addr: 0x1002 })
        );
        assert_eq!(
            run(0x1000, MDTS + 1, MDTS).0,
            Err(PrpError::ExceedsMdts {
                len: MDTS + 1,
                mdts_bytes: MDTS
            })
        );
        assert!(run(0x1000, MDTS, MDTS).0.is_ok());
        assert!(matches!(
            run(u64::MAX - 3, 8, 0).0,
            Err(PrpError::Overflow { .. })
        ));
        let mut small = [0u64; 2];
        let r = build(
            0,
            4 * P,
            MDTS,
            ListPage {
                entries: &mut small,
                iova: LIST_IOVA,
            },
        );
        assert_eq!(r, Err(PrpError::ListTooSmall { have: 2, need: 3 }));
        let mut list = [0u64; 8];
        let r = build(
            0,
            4 * P,
            MDTS,
            ListPage {
                entries: &mut list,
                iova: LIST_IOVA + 8,
            },
        );
        assert_eq!(
            r,
            Err(PrpError::ListUnaligned {
                addr: LIST_IOVA + 8
            })
        );
    }

    proptest! {
        /// Every size from 1 byte to MDTS at every dword offset in the first page is
        /// covered exactly, in order, by page-aligned entries after the first (an MDTS
        /// of 512 pages plus an offset needs at most 512 list entries: one list page).
        #[test]
        fn prps_cover_the_transfer_exactly(
            page in 0u64..1 << 20,
            offset_dwords in 0u64..P / 4,
            len in 1u64..=MDTS,
        ) {
            let addr = page * P + offset_dwords * 4;
            let (r, list) = run(addr, len, MDTS);
            let prp = r.unwrap();
            let ranges = walk(prp, len, &list);
            let mut next = addr;
            for (start, n) in ranges {
                prop_assert_eq!(start, next);
                next += n;
            }
            prop_assert_eq!(next, addr + len);
        }
    }
}
