//! The object fingerprint: the MD5 of the object's bytes, the object's only name.

use std::fmt;
use std::str::FromStr;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// MD5 of an object's bytes. Printed and parsed as 32 lowercase hex characters.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(transparent)]
pub struct Fingerprint(pub [u8; 16]);

/// Why a string is not a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FingerprintError {
    #[error("a fingerprint is 32 hex characters, got {0} characters")]
    Length(usize),
    #[error("a fingerprint is 32 hex characters, found a non-hex character {0:?}")]
    NotHex(char),
}

impl Fingerprint {
    pub const ZERO: Fingerprint = Fingerprint([0; 16]);

    /// MD5 of `data`, for callers that have the whole object at hand (tests, small
    /// objects). The node itself hashes inline while it moves data.
    pub fn of(data: &[u8]) -> Fingerprint {
        use md5::{Digest, Md5};
        Fingerprint(Md5::digest(data).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Fingerprint {
    type Err = FingerprintError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 {
            return Err(FingerprintError::Length(s.chars().count()));
        }
        if let Some(c) = s.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(FingerprintError::NotHex(c));
        }
        let mut out = [0u8; 16];
        // Cannot fail: length and alphabet were checked above.
        hex::decode_to_slice(s, &mut out).map_err(|_| FingerprintError::Length(s.len()))?;
        Ok(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_of_empty_is_the_known_value() {
        assert_eq!(
            Fingerprint::of(b"").to_hex(),
            "d41d8cd98f00b204e9800998ecf8427e"
        );
    }

    #[test]
    fn parse_rejects_bad_input() {
        assert_eq!(
            "abc".parse::<Fingerprint>(),
            Err(FingerprintError::Length(3))
        );
        let bad = "zz1d8cd98f00b204e9800998ecf8427e";
        assert_eq!(
            bad.parse::<Fingerprint>(),
            Err(FingerprintError::NotHex('z'))
        );
        let good: Fingerprint = "D41D8CD98F00B204E9800998ECF8427E".parse().unwrap();
        assert_eq!(good, Fingerprint::of(b""));
    }
}
