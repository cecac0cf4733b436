//! Bearer-token check for the mutating endpoints.
//!
//! The comparison runs in time independent of where the presented token first
//! differs from the configured one (`subtle`), so the token cannot be guessed byte by
//! byte from response times. Only its length can leak, which says little about a
//! token of reasonable length.

use subtle::ConstantTimeEq;

/// Why a mutating request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "mutating endpoints are disabled on this node: start dosd with --mgmt-token TOKEN \
         (or mgmt_token in the config file) to enable them"
    )]
    Disabled,
    #[error("missing Authorization header: send Authorization: Bearer TOKEN")]
    Missing,
    #[error("the Authorization header is not of the form Bearer TOKEN")]
    Malformed,
    #[error("wrong token")]
    Wrong,
}

/// Checks an `Authorization` header value against the configured token.
pub fn check(configured: Option<&str>, header: Option<&[u8]>) -> Result<(), AuthError> {
    let Some(expected) = configured else {
        return Err(AuthError::Disabled);
    };
    let header = header.ok_or(AuthError::Missing)?;
    // RFC 6750 §2.1: the scheme is case-insensitive, one space, then the token.
    let presented = match header.split_at_checked(7) {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case(b"bearer ") => rest,
        _ => return Err(AuthError::Malformed),
    };
    if tokens_equal(expected.as_bytes(), presented) {
        Ok(())
    } else {
        Err(AuthError::Wrong)
    }
}

/// Constant-time equality (for equal lengths; unequal lengths are simply unequal).
pub fn tokens_equal(expected: &[u8], presented: &[u8]) -> bool {
    expected.ct_eq(presented).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(tokens_equal(b"s3cret-token", b"s3cret-token"));
        assert!(!tokens_equal(b"s3cret-token", b"s3cret-tokeN"));
        assert!(!tokens_equal(b"s3cret-token", b"s3cret-toke"));
        assert!(!tokens_equal(b"s3cret-token", b""));
        assert!(!tokens_equal(b"a", b"b"));
    }

    #[test]
    fn header_rules() {
        let t = Some("abc");
        assert_eq!(check(t, Some(b"Bearer abc")), Ok(()));
        assert_eq!(
            check(t, Some(b"bearer abc")),
            Ok(()),
            "scheme is case-insensitive"
        );
        assert_eq!(check(t, Some(b"Bearer abd")), Err(AuthError::Wrong));
        assert_eq!(check(t, Some(b"Bearer  abc")), Err(AuthError::Wrong));
        assert_eq!(check(t, Some(b"Basic abc")), Err(AuthError::Malformed));
        assert_eq!(check(t, Some(b"Bear")), Err(AuthError::Malformed));
        assert_eq!(check(t, None), Err(AuthError::Missing));
        // With no token configured nothing gets through, not even an empty bearer.
        assert_eq!(check(None, Some(b"Bearer ")), Err(AuthError::Disabled));
        assert_eq!(check(None, None), Err(AuthError::Disabled));
        assert!(AuthError::Disabled.to_string().contains("--mgmt-token"));
    }
}
